"""codexserver: a Codex-style app-server on Django Channels."""

__version__ = "0.1.0"

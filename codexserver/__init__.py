"""codexserver: a Codex-style app-server on Django Channels."""

# The Codex app-server release whose protocol this server speaks (its JSON
# Schema is tests/schema/). It is the "server version" of every User-Agent
# (PROTOCOL §4): Codex clients compare it with their own and warn about an
# older server, and upstream reports group requests by it.
__version__ = "0.169.0"

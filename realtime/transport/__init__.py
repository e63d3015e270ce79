"""The WebSocket transport: the consumer (upgrade checks, frame limit, the
connection's row opened and closed), its bounded outbox, and the upgrade
policy (Origin, auth). Hands each decoded text frame to ``rpc``."""

"""The app-server: WebSocket transport, JSON-RPC protocol, method handlers, upstream services."""

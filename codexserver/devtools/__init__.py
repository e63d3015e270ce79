"""Tools for the demo, the test suite and the benchmarks: a recording local
upstream that answers with canned replies (never a real model), a JSON-RPC
WebSocket client, and a helper that runs `manage.py serve` as a process."""

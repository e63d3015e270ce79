"""JSON-RPC: message parsing and errors (``protocol``), params checks
(``params``), one connection's protocol state (``connection``), what a
handler gets (``request_context``), and one handler module per method family
(``handlers/``)."""

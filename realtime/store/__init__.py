"""Conversation state and its storage: the domain objects (``threads``:
Thread, Turn, ItemRecord), the database store and the turn lock
(``thread_store``), the batched turn writes (``turn_writes``), and the text
rules every stored value follows (``storable_text``, ``json_text``).

The lowest part of ``realtime``: it imports none of the others."""

"""This server process in the database: its boot row, its heartbeat, the
rows of processes that died, and an orderly shutdown (``process``)."""

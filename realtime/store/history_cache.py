"""The history of threads whose last turn ended on this process, so their next
turn need not read it back from the database.

Each turn start replays its thread's earlier turns (up to
``CODEX_MAX_HISTORY_BYTES``, 4 MiB), read in the start's batch. A thread that
is talked to here usually had its last turn here too, and that turn's end
wrote exactly what the read would return: the history it replayed plus its
own input. So the end keeps both here, with the number the database gave that
turn (``StoredTurn.sequence``), and the next start sends that number with its
write: its batch reads the history only if another turn of the thread began
since (on any process: every start takes the next number). A match needs no
read, and nothing else changes a stored turn's input once its end is written
(the fence refuses a lost turn's end; the sweep and takeovers only mark turns
that never ended, whose input is empty).

Bounded in bytes over all threads (``CODEX_HISTORY_CACHE_BYTES``), least
recently used first out; one per event loop, as the threads it serves are.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from dataclasses import dataclass

from django.conf import settings

from codexserver.loop_local import LoopLocal

from .threads import History

# What an entry costs beyond its text: the objects that hold it.
ENTRY_OVERHEAD_BYTES = 300
TURN_OVERHEAD_BYTES = 150  # its (start, end, size) tuple


@dataclass(frozen=True, slots=True)
class CachedHistory:
    sequence: int  # the number of the thread's newest turn it includes
    max_bytes: int  # the bound it was kept within (CODEX_MAX_HISTORY_BYTES)
    history: History  # what the thread's next turn replays, if no other turn began since

    @property
    def cost(self) -> int:
        # In memory, not in characters: text from PostgreSQL's jsonb may hold
        # characters past Latin-1, four bytes each in a str.
        return ENTRY_OVERHEAD_BYTES + sys.getsizeof(self.history.text) + TURN_OVERHEAD_BYTES * len(self.history.turns)


class HistoryCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, CachedHistory] = OrderedDict()
        self._bytes = 0

    def get(self, thread_id: str, max_bytes: int) -> CachedHistory | None:
        """The thread's kept history, if it was kept within ``max_bytes``."""
        found = self._entries.get(thread_id)
        if found is None:
            return None
        if found.max_bytes != max_bytes:
            self.forget(thread_id)  # kept within another bound: of no use
            return None
        self._entries.move_to_end(thread_id)
        return found

    def remember(self, thread_id: str, sequence: int, history: History, max_bytes: int) -> None:
        """The thread's history once its turn numbered ``sequence`` ended here, stored."""
        earlier = self._entries.get(thread_id)
        if earlier is not None and earlier.sequence > sequence:
            return  # a later turn's already (ends settle in order; never go back)
        self.forget(thread_id)
        entry = CachedHistory(sequence, max_bytes, history)
        if entry.cost > self.max_bytes:
            return
        self._entries[thread_id] = entry
        self._bytes += entry.cost
        while self._bytes > self.max_bytes:
            _, oldest = self._entries.popitem(last=False)
            self._bytes -= oldest.cost

    def forget(self, thread_id: str) -> None:
        """What is kept of the thread is not what the database holds, or soon
        will not be: a turn of it started here, or another process's heard."""
        gone = self._entries.pop(thread_id, None)
        if gone is not None:
            self._bytes -= gone.cost

    @property
    def size(self) -> int:
        return self._bytes


_caches: LoopLocal[HistoryCache] = LoopLocal(lambda: HistoryCache(settings.CODEX_HISTORY_CACHE_BYTES))


def history_cache() -> HistoryCache:
    return _caches.get()

"""Threads, turns and items: the conversation state, in the Codex app-server's shapes.

Threads live in one process-wide store, not in a connection: a client that
quits can resume its thread later on the same process (PROTOCOL §8-9; the
database store is a later step). A connection *subscribes* to the threads it
starts or resumes, and every notification of a thread's turn reaches every
subscriber. Identity is the request's, never the thread's: each turn records
the originator and connection that started it.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from codexserver import __version__ as SERVER_VERSION

if TYPE_CHECKING:
    from .connection import AppServerConnection

# The wire values of a turn's status (schema TurnStatus).
IN_PROGRESS, COMPLETED, INTERRUPTED, FAILED = "inProgress", "completed", "interrupted", "failed"
PREVIEW_CHARS = 200
DELTA_SUFFIXES = ("/delta", "Delta")  # item/agentMessage/delta, item/reasoning/summaryTextDelta, …


def new_id() -> str:
    return str(uuid.uuid4())


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(eq=False)
class ItemRecord:
    """One ThreadItem (schema shape) with its timing."""

    item: dict[str, Any]
    started_at_ms: int
    completed_at_ms: int | None = None

    def entry_json(self, turn_id: str) -> dict[str, Any]:
        """A ``ThreadItemEntry`` of ``thread/items/list``."""
        return {
            "turnId": turn_id,
            "item": self.item,
            "startedAtMs": self.started_at_ms,
            "completedAtMs": self.completed_at_ms,
        }


@dataclass(eq=False)
class Turn:
    id: str
    originator: str
    connection_id: str
    status: str = IN_PROGRESS
    items: list[ItemRecord] = field(default_factory=list)
    started_at_ms: int = field(default_factory=now_ms)
    completed_at_ms: int | None = None
    error: dict[str, Any] | None = None
    usage: dict[str, int] | None = None  # the schema's TokenUsageBreakdown, as the upstream reported it
    # Model input items of this turn (user message, reply), replayed by later turns.
    model_input: list[dict[str, Any]] = field(default_factory=list)
    input_bytes: int = 0
    task: asyncio.Task | None = None

    def interrupt(self) -> None:
        if self.task is not None:
            self.task.cancel()

    def finish(self, status: str, error: dict[str, Any] | None) -> None:
        self.status, self.error = status, error
        self.completed_at_ms = now_ms()

    def remember_input(self, items: list[dict[str, Any]]) -> None:
        self.model_input = items
        self.input_bytes = sum(len(json.dumps(item)) for item in items)

    def to_json(self, include_items: bool = True) -> dict[str, Any]:
        """The schema's ``Turn``; ``startedAt``/``completedAt`` in Unix seconds."""
        return {
            "id": self.id,
            "status": self.status,
            "items": [record.item for record in self.items] if include_items else [],
            "itemsView": "full" if include_items else "notLoaded",
            "error": self.error,
            "startedAt": self.started_at_ms // 1000,
            "completedAt": None if self.completed_at_ms is None else self.completed_at_ms // 1000,
            "durationMs": None if self.completed_at_ms is None else self.completed_at_ms - self.started_at_ms,
        }


@dataclass(eq=False)
class RealtimeSession:
    """A realtime call of a thread; its task holds the sideband socket open."""

    call_id: str | None = None  # None while the call is being created
    task: asyncio.Task | None = None


@dataclass(eq=False)
class Thread:
    id: str
    model: str
    model_provider: str
    cwd: str
    originator: str  # of the connection that started it; turns carry their own
    base_instructions: str | None = None
    ephemeral: bool = False  # not listed, and forgotten when its last subscriber leaves
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)  # sub-second: list order needs it
    preview: str = ""
    turns: list[Turn] = field(default_factory=list)
    active_turn: Turn | None = None
    realtime: RealtimeSession | None = None
    read_revision: int = 0
    total_usage: dict[str, int] = field(default_factory=dict)  # every turn's usage, summed
    subscribers: weakref.WeakSet[AppServerConnection] = field(default_factory=weakref.WeakSet)

    # --- conversation -------------------------------------------------------

    def history(self, max_bytes: int) -> list[dict[str, Any]]:
        """Model input of the earlier turns, newest kept first within ``max_bytes``."""
        kept: list[list[dict[str, Any]]] = []
        budget = max_bytes
        for turn in reversed(self.turns):
            if turn is self.active_turn or not turn.model_input:
                continue
            if turn.input_bytes > budget:
                break
            budget -= turn.input_bytes
            kept.append(turn.model_input)
        return [item for items in reversed(kept) for item in items]

    @property
    def stored_bytes(self) -> int:
        return sum(turn.input_bytes for turn in self.turns)

    def trim(self, max_bytes: int) -> int:
        """Drop the oldest finished turns past ``max_bytes`` of stored input;
        returns the bytes dropped."""
        total = before = self.stored_bytes
        while total > max_bytes and self.turns and self.turns[0] is not self.active_turn:
            total -= self.turns.pop(0).input_bytes
        return before - total

    @property
    def unused(self) -> bool:
        """Nobody subscribed and no turn running: the store may let it go."""
        return not self.loaded and self.active_turn is None

    def add_usage(self, usage: dict[str, int]) -> None:
        for name, value in usage.items():
            self.total_usage[name] = self.total_usage.get(name, 0) + value

    def touch(self) -> None:
        self.updated_at = time.time()

    # --- subscribers --------------------------------------------------------

    def notify(self, method: str, params: dict[str, Any], pace_setter: AppServerConnection | None = None) -> None:
        """Send a notification to every connection subscribed to this thread.

        The turn waits for ``pace_setter`` (its own client) only. Another
        subscriber that falls behind misses deltas rather than its
        connection: ``item/completed`` still brings it the whole text.
        """
        droppable = method.endswith(DELTA_SUFFIXES)
        for connection in list(self.subscribers):
            if droppable and connection is not pace_setter and connection.outbox.overloaded:
                continue
            connection.notify(method, params)

    @property
    def loaded(self) -> bool:
        return len(self.subscribers) > 0

    def status_json(self) -> dict[str, Any]:
        if self.active_turn is not None:
            return {"type": "active", "activeFlags": []}
        return {"type": "idle"} if self.loaded else {"type": "notLoaded"}

    # --- wire shape ---------------------------------------------------------

    def to_json(self, include_turns: bool = False) -> dict[str, Any]:
        """The schema's ``Thread``."""
        return {
            "id": self.id,
            "sessionId": self.id,
            "createdAt": int(self.created_at),
            "updatedAt": int(self.updated_at),
            "model": self.model,
            "modelProvider": self.model_provider,
            "cwd": self.cwd,
            "cliVersion": SERVER_VERSION,
            "source": "appServer",
            "originator": self.originator,
            "ephemeral": self.ephemeral,
            "preview": self.preview,
            "projectId": None,
            "name": None,
            "path": None,
            "status": self.status_json(),
            "turns": [turn.to_json() for turn in self.turns] if include_turns else [],
        }


class ThreadStore:
    """Every thread of this process, within two bounds: a number of threads
    (the least recently updated one without a subscriber goes first) and a
    number of bytes of stored turns across all threads (threads without a
    subscriber go first, then the oldest turns of the least recently updated
    ones). Per thread, ``Thread.trim`` keeps ``CODEX_MAX_HISTORY_BYTES``."""

    def __init__(self) -> None:
        self._threads: dict[str, Thread] = {}
        self.total_bytes = 0

    def add(self, thread: Thread, max_threads: int) -> None:
        self._threads[thread.id] = thread
        self._forget_unused_oldest(lambda: len(self._threads) > max_threads)

    def resized(self, thread: Thread, change: int, max_total_bytes: int) -> None:
        """A thread's stored turns grew or shrank by ``change`` bytes."""
        if thread.id in self._threads:
            self.total_bytes += change
        if self.total_bytes <= max_total_bytes:
            return  # the usual case: no sorting on a turn's way out
        self._forget_unused_oldest(lambda: self.total_bytes > max_total_bytes)
        for old in self._oldest_first():  # still over: the oldest turns of threads in use
            if self.total_bytes <= max_total_bytes:
                return
            self.total_bytes -= old.trim(old.stored_bytes - (self.total_bytes - max_total_bytes))

    def _forget(self, thread: Thread) -> None:
        if self._threads.pop(thread.id, None) is not None:
            self.total_bytes -= thread.stored_bytes

    def get(self, thread_id: str) -> Thread | None:
        return self._threads.get(thread_id)

    def newest_first(self) -> list[Thread]:
        """The listed threads (not ephemeral ones), most recently updated first."""
        listed = (thread for thread in self._threads.values() if not thread.ephemeral)
        return sorted(listed, key=lambda t: (t.updated_at, t.created_at), reverse=True)

    def forget_if_unused(self, thread: Thread) -> None:
        """An ephemeral thread goes once nobody is subscribed and no turn runs."""
        if thread.ephemeral and thread.unused:
            self._forget(thread)

    def loaded(self) -> list[Thread]:
        return [thread for thread in self._threads.values() if thread.loaded]

    def _oldest_first(self) -> list[Thread]:
        return sorted(self._threads.values(), key=lambda t: t.updated_at)

    def _forget_unused_oldest(self, over_bound: Callable[[], bool]) -> None:
        """Forget unused threads, least recently updated first, while ``over_bound()``."""
        if not over_bound():
            return
        for thread in self._oldest_first():
            if not over_bound():
                return
            if thread.unused:
                self._forget(thread)


# The process's threads. Conversation data, not identity: nothing here is
# read to decide how an outbound call is labelled.
thread_store = ThreadStore()

"""Threads, turns and items: the conversation state, in the Codex app-server's shapes.

These are the in-process objects: a ``Thread`` here is one this process has
loaded (the fan-out's hub keeps those) or read from the store
(``thread_store``, the database). A connection *subscribes* to the threads it
starts or resumes, and every notification of a thread's turn reaches every
subscriber, on every process; the parts above publish them through the
fan-out (``realtime.fanout``), which these objects know nothing of. Identity
is the request's, never the thread's: each turn records the originator and
connection that started it.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from codexserver import __version__ as SERVER_VERSION

from .json_text import array_items
from .subscriber_set import SubscriberSet

if TYPE_CHECKING:
    from realtime.rpc.connection import AppServerConnection

# The wire values of a turn's status (schema TurnStatus).
IN_PROGRESS, COMPLETED, INTERRUPTED, FAILED = "inProgress", "completed", "interrupted", "failed"
PREVIEW_CHARS = 200


def new_id() -> str:
    return str(uuid.uuid4())


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class History:
    """What a turn replays: its thread's earlier turns' model input.

    ``text`` is their items, oldest first, as one JSON array's text: joined,
    never decoded (a thread's history may be CODEX_MAX_HISTORY_BYTES, 4 MiB,
    which each turn start would otherwise decode on the row writer and encode
    again on the event loop: 15 ms of held GIL per turn for 4 MiB, every
    connection of the process waiting). ``turns`` says where each turn's
    items are in it, newest first: (start, end, its size as this server
    encoded it, ASCII-escaped); (1, 1, size) for a turn with none. The text
    is held once; a turn's items are a slice of it."""

    text: str = "[]"
    turns: tuple[tuple[int, int, int], ...] = ()

    @classmethod
    def within(cls, earlier: Iterable[tuple[str, int]], max_bytes: int) -> History:
        """The newest of ``earlier`` ((input items as a JSON array's text,
        size), newest first) that fit in ``max_bytes``: whole turns only, and
        none older than the first that does not fit."""
        kept: list[tuple[str, int]] = []
        budget = max_bytes
        for items, size in earlier:
            if size > budget:
                break
            budget -= size
            kept.append((array_items(items), size))
        return cls._joined(kept[::-1])

    def then(self, model_input: str, input_bytes: int, max_bytes: int) -> History:
        """This history followed by one more turn's input, within ``max_bytes``
        (a turn with none adds nothing, as the database skips it)."""
        if input_bytes <= 0:
            return self
        budget, kept = max_bytes - input_bytes, 0
        if budget < 0:
            return History()  # the newest turn alone is past the bound: nothing is replayed
        for _, _, size in self.turns:
            if size > budget:
                break
            budget -= size
            kept += 1
        # The kept turns are the end of the text: one slice of it, not a copy per turn.
        earlier = self.turns[:kept]
        starts = [start for start, end, _ in earlier if end > start]  # (a turn with no items has no place)
        first = starts[-1] if starts else len(self.text) - 1  # where the oldest kept items begin
        kept_items = self.text[first:-1]
        items = array_items(model_input)
        shift = 1 - first  # each kept span, in the new text
        spans = [(start + shift, end + shift, size) if end > start else (1, 1, size) for start, end, size in earlier]
        joint = ", " if kept_items and items else ""
        newest = (len(kept_items) + len(joint) + 1, len(kept_items) + len(joint) + 1 + len(items), input_bytes)
        return History("[" + kept_items + joint + items + "]", (newest, *spans))

    @classmethod
    def _joined(cls, oldest_first: list[tuple[str, int]]) -> History:
        """(items between a JSON array's brackets, size) of each turn, oldest first."""
        pieces: list[str] = []
        spans: list[tuple[int, int, int]] = []
        at = 1  # after "["
        for items, size in oldest_first:
            if items:
                at += 2 if pieces else 0  # ", "
                pieces.append(items)
                spans.append((at, at + len(items), size))
                at += len(items)
            else:  # no place in the text, but counted toward the bound all the same
                spans.append((1, 1, size))
        return cls("[" + ", ".join(pieces) + "]", tuple(spans[::-1]))


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
    client_name: str = ""  # the starting connection's clientInfo.name
    status: str = IN_PROGRESS
    items: list[ItemRecord] = field(default_factory=list)
    started_at_ms: int = field(default_factory=now_ms)
    completed_at_ms: int | None = None
    error: dict[str, Any] | None = None
    usage: dict[str, int] | None = None  # the schema's TokenUsageBreakdown, as the upstream reported it
    # Model input items of this turn (user message, reply), replayed by later
    # turns: a JSON array's text, encoded once when the turn ends and stored
    # and replayed as it is.
    model_input: str = "[]"
    input_bytes: int = 0
    task: asyncio.Task | None = None
    row_id: int | None = None  # its StoredTurn's key once stored: its end then needs no lookup
    sequence: int = 0  # its place in its thread, as the database numbered it (stored threads only)

    def interrupt(self) -> None:
        if self.task is not None:
            self.task.cancel()

    def finish(self, status: str, error: dict[str, Any] | None) -> None:
        self.status, self.error = status, error
        self.completed_at_ms = now_ms()

    def remember_input(self, items: list[dict[str, Any]]) -> None:
        self.model_input = json.dumps(items)  # ASCII: as many bytes as characters
        self.input_bytes = len(self.model_input)

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
    notify_owner: Any = None  # the starting connection's notify: it hears the call close, whoever stops it


@dataclass(eq=False)
class Thread:
    id: str
    model: str
    model_provider: str
    cwd: str
    originator: str  # of the connection that started it; turns carry their own
    principal_id: int  # whose (PROTOCOL §12): only its connections may see or use it
    base_instructions: str | None = None
    # What its commands may do (PROTOCOL §11): thread/start's sandbox and approval policy.
    sandbox_mode: str = "read-only"
    network_access: bool = False
    approval_policy: Any = "on-request"  # "untrusted" | "on-request" | "never" | {"granular": {…}}
    ephemeral: bool = False  # never stored: not listed, and gone when unloaded
    # The tools a client declared in thread/start (tools.dynamic_tools.DeclaredTools):
    # this process's, never stored; they go with the connection that runs them.
    dynamic_tools: Any = None
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)  # sub-second: list order needs it
    preview: str = ""
    turns: list[Turn] = field(default_factory=list)  # an ephemeral thread's; stored threads' are in the database
    active_turn: Turn | None = None
    realtime: RealtimeSession | None = None
    read_revision: int = 0
    turn_sequence: int = 0  # an ephemeral thread's last turn's number (stored threads: the database's)
    total_usage: dict[str, int] = field(default_factory=dict)  # every turn's usage, summed
    subscribers: SubscriberSet[AppServerConnection] = field(default_factory=SubscriberSet)

    # --- conversation -------------------------------------------------------

    def history(self, max_bytes: int) -> History:
        """Model input of the earlier turns, newest kept first within ``max_bytes``."""
        earlier = ((turn.model_input, turn.input_bytes) for turn in reversed(self.turns) if turn is not self.active_turn)
        return History.within(earlier, max_bytes)

    def trim(self, max_bytes: int) -> None:
        """Drop the oldest finished turns past ``max_bytes`` of stored input."""
        total = sum(turn.input_bytes for turn in self.turns)
        while total > max_bytes and self.turns and self.turns[0] is not self.active_turn:
            total -= self.turns.pop(0).input_bytes

    def refresh_from(self, stored: Thread) -> None:
        """Take what other processes may have changed since this one loaded it."""
        self.model, self.preview = stored.model, stored.preview
        self.updated_at, self.read_revision = stored.updated_at, stored.read_revision
        if self.active_turn is None:  # a running turn's commands keep the policy it started with
            self.sandbox_mode, self.network_access = stored.sandbox_mode, stored.network_access
            self.approval_policy = stored.approval_policy

    def add_usage(self, usage: dict[str, int]) -> None:
        for name, value in usage.items():
            self.total_usage[name] = self.total_usage.get(name, 0) + value

    def touch(self) -> None:
        self.updated_at = time.time()

    # --- subscribers --------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return len(self.subscribers) > 0

    def status_json(self, running_elsewhere: bool = False) -> dict[str, Any]:
        if self.active_turn is not None or running_elsewhere:
            return {"type": "active", "activeFlags": []}
        return {"type": "idle"} if self.loaded else {"type": "notLoaded"}

    # --- wire shape ---------------------------------------------------------

    def to_json(self, turns: list[Turn] | None = None, running_elsewhere: bool = False) -> dict[str, Any]:
        """The schema's ``Thread``, with ``turns`` if given."""
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
            "status": self.status_json(running_elsewhere),
            "turns": [turn.to_json() for turn in turns or ()],
        }

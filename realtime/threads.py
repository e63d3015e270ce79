"""Threads and turns: per-connection conversation state."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any


# Messages replayed to the model per thread: a bound on memory and on the
# request body encoded for each turn.
MAX_HISTORY_ITEMS = 200


def new_id() -> str:
    return str(uuid.uuid4())


@dataclass(eq=False)
class Turn:
    id: str
    task: asyncio.Task | None = None
    interrupt_requested: bool = False

    def interrupt(self) -> None:
        self.interrupt_requested = True
        if self.task is not None:
            self.task.cancel()

    def to_json(self, status: str) -> dict[str, Any]:
        return {"id": self.id, "status": status}


@dataclass(eq=False)
class RealtimeSession:
    """A realtime call of a thread; its task holds the sideband socket open."""

    call_id: str | None = None  # None while the call is being created
    task: asyncio.Task | None = None


@dataclass(eq=False)
class Thread:
    id: str
    model: str
    base_instructions: str | None = None
    created_at: int = field(default_factory=lambda: int(time.time()))
    # Responses API input items of earlier turns, replayed on each request.
    history: list[dict[str, Any]] = field(default_factory=list)
    active_turn: Turn | None = None
    realtime: RealtimeSession | None = None

    def remember(self, item: dict[str, Any]) -> None:
        """Keep an item for later turns; the oldest go first past the bound."""
        self.history.append(item)
        if len(self.history) > MAX_HISTORY_ITEMS:
            del self.history[: len(self.history) - MAX_HISTORY_ITEMS]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "createdAt": self.created_at, "model": self.model}

"""The bounded outbound queue of one connection, drained by one writer task.

Every frame to the client (replies and notifications) passes through here, so
order is kept and a client that stops reading costs a bounded amount of memory:
past ``capacity`` queued messages the connection is dropped (PROTOCOL §3).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from .protocol import encode

logger = logging.getLogger(__name__)

OUTBOX_CAPACITY = 1024
# Above this many queued messages, new requests are refused with -32001
# instead of adding to a backlog the client is not draining.
OVERLOAD_THRESHOLD = OUTBOX_CAPACITY // 2


class Outbox:
    def __init__(
        self,
        send_text: Callable[[str], Awaitable[None]],
        on_overflow: Callable[[], None],
        capacity: int = OUTBOX_CAPACITY,
    ):
        self._send_text = send_text
        self._on_overflow = on_overflow
        self._queue: asyncio.Queue[str] = asyncio.Queue(maxsize=capacity)
        self._overflowed = False

    @property
    def overloaded(self) -> bool:
        return self._queue.qsize() >= OVERLOAD_THRESHOLD

    def __len__(self) -> int:
        return self._queue.qsize()

    def put(self, message: dict[str, Any]) -> None:
        if self._overflowed:
            return
        try:
            self._queue.put_nowait(encode(message))
        except asyncio.QueueFull:
            self._overflowed = True
            logger.warning("outbound queue full (%d messages): disconnecting slow client", self._queue.maxsize)
            self._on_overflow()

    async def run(self) -> None:
        """The writer task: sends queued frames in order until cancelled."""
        while True:
            text = await self._queue.get()
            await self._send_text(text)

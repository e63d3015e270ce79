"""The bounded outbound queue of one connection, drained by one writer task.

Every frame to the client (replies and notifications) passes through here, so
order is kept and a client that stops reading costs a bounded amount of memory:
past ``capacity`` queued messages, or ``MAX_QUEUED_BYTES`` of them, the
connection is dropped (PROTOCOL §3).

A slow client is not a stopped one: a streaming turn waits in
``wait_for_room`` while the queue is above the overload threshold, so the
model's pace adapts to the client's. Only when the client makes no progress
at all for ``stall_seconds`` does the turn stop waiting, the queue fill up,
and the connection get dropped.

Under our daphne (``codexserver.daphne_server``) a frame is written at once
when nothing is queued before it and the socket's buffer has room: the ASGI
``send`` costs a task switch and a dozen awaits per frame, a sixth of the
server's work for a streamed reply. Queued frames, and every frame under a
server without the extension, go through the writer task and ``send``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from realtime.rpc.protocol import encode

logger = logging.getLogger(__name__)

OUTBOX_CAPACITY = 1024
# Above this many queued messages (or half the bytes), new requests are
# refused with -32001 instead of adding to a backlog the client is not draining.
OVERLOAD_THRESHOLD = OUTBOX_CAPACITY // 2
# Bytes queued for one client: a message count alone let a client that never
# read queue 511 replies of 31 MB each.
MAX_QUEUED_BYTES = 32 * 1024 * 1024
# The ASGI scope extension under which our daphne offers ``{"write": f}``:
# f(text) writes a text frame now and returns True, or returns False when the
# socket is not open or its write buffer is full.
WRITE_NOW_EXTENSION = "codex.websocket.write_now"


class Outbox:
    def __init__(
        self,
        send_text: Callable[[str], Awaitable[None]],
        on_overflow: Callable[[], None],
        capacity: int = OUTBOX_CAPACITY,
        stall_seconds: float = 10.0,
        max_bytes: int = MAX_QUEUED_BYTES,
        write_now: Callable[[str], bool] | None = None,
        on_write_failure: Callable[[], None] | None = None,
    ):
        self._send_text = send_text
        # The server's synchronous write (WRITE_NOW_EXTENSION), or None: True
        # when the frame went to the socket, False when it cannot take one now.
        self._write_now = write_now
        self._on_overflow = on_overflow
        self._on_write_failure = on_write_failure or on_overflow
        self._queue: deque[str] = deque()
        self._capacity = capacity
        self._max_bytes = max_bytes
        self.queued_bytes = 0  # encoded as ASCII: characters are bytes
        self.peak_bytes = 0  # the most it held at once
        self._overflowed = False
        self._stall_seconds = stall_seconds
        self._sent = 0
        self._stalled_at = -1
        self._room = asyncio.Event()
        self._wakeup: asyncio.Future | None = None  # the writer, waiting for a frame
        self._sending = False  # the writer holds a frame it has not handed over yet
        self._writer: asyncio.Task | None = None
        self._stopped = False

    @property
    def overloaded(self) -> bool:
        return len(self._queue) >= OVERLOAD_THRESHOLD or self.queued_bytes >= self._max_bytes // 2

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, message: dict[str, Any]) -> None:
        if self._overflowed:
            return
        text = encode(message)
        # Nothing before it waits, and the socket takes it: written now, with
        # no turn of the loop for the writer task. Most frames go this way.
        if not self._queue and not self._sending and not self._stopped and self._write_now is not None:
            try:
                written = self._write_now(text)
            except Exception:  # part of it may be on the wire: nothing after it can be trusted
                logger.exception("a frame could not be written: closing the connection")
                self._stop_sending(self._on_write_failure)
                return
            if written:
                self._sent += 1
                if len(text) > self.peak_bytes:  # it was held, if only for this call
                    self.peak_bytes = len(text)
                return
        if len(self._queue) >= self._capacity:
            self._overflow(f"{self._capacity} messages")
            return
        if self.queued_bytes + len(text) > self._max_bytes and self.queued_bytes:
            self._overflow(f"{self.queued_bytes} bytes")
            return
        self._queue.append(text)
        self.queued_bytes += len(text)
        if self.queued_bytes > self.peak_bytes:
            self.peak_bytes = self.queued_bytes
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _overflow(self, how_full: str) -> None:
        logger.warning("outbound queue full (%s): disconnecting slow client", how_full)
        self._stop_sending(self._on_overflow)

    def _stop_sending(self, then: Callable[[], None]) -> None:
        """Nothing more is sent; ``then`` drops the connection."""
        self._overflowed = True
        self._queue.clear()  # what it held goes now, not when the socket closes
        self.queued_bytes = 0
        then()

    async def wait_for_room(self) -> None:
        """Hold a producer while the queue is above the overload threshold and
        the client is draining it; return at once when it has stalled."""
        while self.overloaded and not self._overflowed and self._sent != self._stalled_at:
            progress = self._sent
            self._room.clear()
            try:
                await asyncio.wait_for(self._room.wait(), self._stall_seconds)
            except TimeoutError:
                if self._sent == progress:
                    self._stalled_at = progress  # stop waiting until the client moves again
                    return

    def start(self) -> asyncio.Task:
        """Start the writer task (at once cancelled if ``stop`` came first);
        ``stop`` ends it."""
        self._writer = asyncio.create_task(self.run(), name="outbox writer")
        if self._stopped:
            self._writer.cancel()
        return self._writer

    def stop(self) -> None:
        """End the writer: the connection is closed (at disconnect, or at the
        server's shutdown, where daphne cancels its consumers without one)."""
        self._stopped = True
        if self._writer is not None:
            self._writer.cancel()

    async def run(self) -> None:
        """The writer task: sends queued frames in order until cancelled."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self._queue:
                    self._wakeup = loop.create_future()
                    await self._wakeup
                    continue
                text = self._queue.popleft()
                self.queued_bytes -= len(text)
                self._sending = True
                try:
                    await self._send_text(text)
                finally:
                    self._sending = False
                self._sent += 1
                if not self.overloaded:
                    self._room.set()
        finally:
            # However it ends: a frame after one it could not send must not
            # be written through before the connection closes.
            self._stopped = True

"""A turn's first model request, sent while its start is still being written.

A stored thread's turn waits for its start's batch (the thread's lock, the
turn's rows) before it may say anything; the model's time to first byte need
not wait with it. Where this process kept the thread's history
(``history_cache``), ``turn/start`` sends the first request at once, with the
policy and model it expects the start to confirm, and this holds what comes
back until then: the turn takes the stream over only if the start took the
lock and gave the same request (no other turn began since the kept history,
no other process changed the thread's model or policy). Otherwise the
request is cancelled at once and the turn sends its own: the cost is one
request cut short, on a thread that another process just used.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from identity.client_identity import ClientIdentity
from realtime.services.config import UpstreamConfig
from realtime.services.responses import ModelRequest, stream_model_response
from realtime.services.upstream_errors import UpstreamError

if TYPE_CHECKING:
    from realtime.rpc.connection import AppServerConnection

# Events held before the turn takes them: then the upstream waits (TCP).
HELD_EVENTS = 64
_EVENT, _RETRY, _FAILED, _END = range(4)


class EarlyStream:
    def __init__(self, connection: AppServerConnection, identity: ClientIdentity, request: ModelRequest, config: UpstreamConfig):
        self.request = request
        # Unbounded, so the request's end (however it ends) is always put;
        # ``_read`` keeps it within HELD_EVENTS. A deque and one waiting
        # future a side, not an asyncio.Queue: every event of a stored turn's
        # first response passes here, and the queue's get and put cost about
        # fifteen calls an event (cProfile).
        self._held: deque[tuple[int, Any]] = deque()
        self._arrived: asyncio.Future | None = None  # the turn, waiting for the next event
        self._room: asyncio.Future | None = None  # the reader, waiting for the turn to take some
        # The connection's: its identity scope, and cancelled when it closes.
        self._task = connection.spawn(self._read(identity, config), name=f"first model request of thread {request.thread_id}")
        self._task.add_done_callback(self._ended)

    async def _read(self, identity: ClientIdentity, config: UpstreamConfig) -> None:
        try:
            async with aclosing(stream_model_response(identity, self.request, config, on_retry=self._retried)) as events:
                async for event in events:
                    while len(self._held) >= HELD_EVENTS:
                        self._room = asyncio.get_running_loop().create_future()
                        await self._room
                    self._put(_EVENT, event)
        except Exception as exc:  # the turn's to tell (an UpstreamError, as it would have met it)
            self._put(_FAILED, exc)
            return
        self._put(_END, None)

    def _put(self, kind: int, value: Any) -> None:
        self._held.append((kind, value))
        if self._arrived is not None and not self._arrived.done():
            self._arrived.set_result(None)

    def _retried(self, error: UpstreamError) -> None:
        self._put(_RETRY, error)

    def _ended(self, task: asyncio.Task) -> None:
        # (An Exception, and a normal end, were put by ``_read`` itself.)
        if task.cancelled():  # the connection closed, or the turn stopped it: the turn is being stopped too
            self._put(_FAILED, asyncio.CancelledError())
        elif task.exception() is not None:  # not an Exception (SystemExit, say): the turn must not wait for ever
            self._put(_FAILED, task.exception())

    async def events(self, on_retry: Callable[[UpstreamError], None]) -> AsyncIterator[dict[str, Any]]:
        """What came back, as ``stream_model_response`` yields it; closing this
        (the turn interrupted, or done) stops the request."""
        held = self._held
        try:
            while True:
                while not held:
                    self._arrived = asyncio.get_running_loop().create_future()
                    await self._arrived
                kind, value = held.popleft()
                if self._room is not None and not self._room.done():
                    self._room.set_result(None)
                if kind == _EVENT:
                    yield value
                elif kind == _RETRY:
                    on_retry(value)
                elif kind == _FAILED:
                    raise value
                else:
                    return
        finally:
            self.cancel()
            self._held.clear()  # (what it held, freed now, not with the turn)

    def cancel(self) -> None:
        """Stop the request (and close its stream), if it still runs."""
        self._task.cancel()

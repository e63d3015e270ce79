"""Analytics events: ``POST {chatgpt}/codex/analytics-events/events``, batched per identity.

One sender per event loop buffers events by identity and flushes a batch when
it is full or when the flush interval passes. A request holds the events of
one identity only and carries that identity's headers, so
``product_client_id`` and the ``originator`` header always agree.
Telemetry never fails the work it describes: errors are logged and dropped,
and a full buffer drops its oldest event (counted in ``dropped``).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import OrderedDict
from typing import Any

from django.conf import settings

from codexserver.loop_local import LoopLocal
from identity.client_identity import ClientIdentity

from .config import UpstreamConfig

logger = logging.getLogger(__name__)

EVENTS_PATH = "codex/analytics-events/events"
THREAD_STARTED = "codex_thread_started"
TURN_COMPLETED = "codex_turn_completed"


MAX_CONCURRENT_POSTS = 16
# A flush of many identities must not crowd the model streams out of the shared pool.
_post_slots: LoopLocal[asyncio.Semaphore] = LoopLocal(lambda: asyncio.Semaphore(MAX_CONCURRENT_POSTS))


def analytics_event(
    identity: ClientIdentity,
    event_type: str,
    thread_id: str,
    turn_id: str | None = None,
    usage: dict[str, int] | None = None,
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "product_client_id": identity.originator,
        "client_version": identity.client_version,
        "thread_id": thread_id,
        "turn_id": turn_id,
    }
    if usage is not None:
        params["token_usage"] = usage  # the turn's tokens, attributed to whoever sent turn/start
    return {"event_type": event_type, "event_params": params}


async def post_events(
    identity: ClientIdentity, events: list[dict[str, Any]], config: UpstreamConfig | None = None
) -> bool:
    """Send one batch for one identity; True when the upstream accepted it."""
    config = config or UpstreamConfig.from_settings()
    try:
        async with _post_slots.get():
            response = await config.chatgpt_client(identity).post(EVENTS_PATH, json={"events": events})
    except Exception as exc:  # telemetry never takes anything down with it
        # The transport's own error where httpx wraps one: httpx-aiohttp calls
        # a refused or unresolved connection ConnectTimeout.
        logger.warning("telemetry not sent (%d event(s)): %s", len(events), type(exc.__cause__ or exc).__name__)
        return False
    if response.status_code >= 400:
        logger.warning("telemetry refused (%d event(s)): HTTP %d", len(events), response.status_code)
        return False
    return True


class TelemetrySender:
    def __init__(self, max_batch: int, flush_interval: float, max_buffered: int):
        self.max_batch = max_batch
        self.flush_interval = flush_interval
        self.max_buffered = max_buffered
        self.dropped = 0
        self.sent = 0
        self._pending: OrderedDict[ClientIdentity, list[dict[str, Any]]] = OrderedDict()
        self._buffered = 0
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task | None = None

    @classmethod
    def from_settings(cls) -> TelemetrySender:
        return cls(
            max_batch=settings.CODEX_TELEMETRY_MAX_BATCH,
            flush_interval=settings.CODEX_TELEMETRY_FLUSH_INTERVAL,
            max_buffered=settings.CODEX_TELEMETRY_MAX_BUFFERED,
        )

    def record(self, identity: ClientIdentity, event: dict[str, Any]) -> None:
        """Buffer an event of ``identity``; never blocks, never raises."""
        if self._buffered >= self.max_buffered and self._pending:
            self._drop_oldest()
        self._pending.setdefault(identity, []).append(event)
        self._buffered += 1
        if len(self._pending[identity]) >= self.max_batch:
            self._wake.set()
        self._ensure_flusher()

    def _drop_oldest(self) -> None:
        # The first event of the identity buffered longest: the oldest event
        # still waiting, as each identity's list is in arrival order.
        identity, events = next(iter(self._pending.items()))
        events.pop(0)
        if not events:
            del self._pending[identity]
        self._buffered -= 1
        self.dropped += 1

    def _ensure_flusher(self) -> None:
        if self._flusher is None or self._flusher.done():
            # An empty context: this process-wide task must not inherit the
            # identity scope of whichever connection happened to start it.
            self._flusher = asyncio.create_task(
                self._run(), name="telemetry flusher", context=contextvars.Context()
            )

    async def _run(self) -> None:
        while self._buffered:
            try:
                await asyncio.wait_for(self._wake.wait(), self.flush_interval)
            except TimeoutError:
                pass
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        """Send everything buffered: one request per identity per batch."""
        pending, self._pending, self._buffered = self._pending, OrderedDict(), 0
        config = UpstreamConfig.from_settings()
        batches = [
            (identity, events[start : start + self.max_batch])
            for identity, events in pending.items()
            for start in range(0, len(events), self.max_batch)
        ]
        results = await asyncio.gather(*(post_events(identity, batch, config) for identity, batch in batches))
        self.sent += sum(len(batch) for (_, batch), ok in zip(batches, results) if ok)

    async def aclose(self) -> None:
        """Flush what is left (at shutdown); a batch already being sent is awaited, not dropped."""
        if self._flusher is not None and not self._flusher.done():
            self._wake.set()
            await asyncio.wait([self._flusher], timeout=10)
        await self.flush()


_senders: LoopLocal[TelemetrySender] = LoopLocal(TelemetrySender.from_settings)


def telemetry_sender() -> TelemetrySender:
    """The sender of the running event loop."""
    return _senders.get()


def record_event(
    identity: ClientIdentity,
    event_type: str,
    thread_id: str,
    turn_id: str | None = None,
    usage: dict[str, int] | None = None,
) -> None:
    telemetry_sender().record(identity, analytics_event(identity, event_type, thread_id, turn_id, usage))


async def flush_at_shutdown() -> None:
    """Send what the running loop's sender still holds (called at server shutdown)."""
    sender = _senders.peek()
    if sender is not None:
        await sender.aclose()

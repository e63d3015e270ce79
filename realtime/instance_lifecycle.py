"""What this process does for its rows at start and at shutdown (PROTOCOL §7)."""

from __future__ import annotations

import asyncio
import logging

from django.conf import settings
from django.utils import timezone

from identity.actions import reconcile_restarted_instance, record_instance_stopped

from identity.http_clients import client_factory

from .connection import live_connections
from .services.telemetry import flush_at_shutdown

logger = logging.getLogger(__name__)

PROCESS_STARTED_AT = timezone.now()
SHUTDOWN_SECONDS = 10.0
_reconcile: asyncio.Task | None = None  # one run per process, shared by whoever asks first


async def reconcile_once() -> None:
    """Close the rows an earlier run of this instance left open; once per process.

    Called at server start (``manage.py serve``) and before each connection's
    row is written (so plain ``daphne`` deployments get it too); a burst of
    connections waits for the one run instead of starting its own.
    """
    global _reconcile
    if _reconcile is None or (_reconcile.done() and not _succeeded_here(_reconcile)):
        _reconcile = asyncio.ensure_future(_reconcile_instance())
    await asyncio.shield(_reconcile)


def _succeeded_here(run: asyncio.Future) -> bool:
    # A run that failed (the database was down) is tried again by the next
    # connection rather than failing every connection until a restart.
    return (
        run.get_loop() is asyncio.get_running_loop() and not run.cancelled() and run.exception() is None
    )


async def _reconcile_instance() -> None:
    closed = await reconcile_restarted_instance(settings.CODEX_SERVER_INSTANCE, PROCESS_STARTED_AT)
    if closed:
        logger.info("closed %d connection row(s) left open by an earlier run of %s", closed, settings.CODEX_SERVER_INSTANCE)


async def shut_down() -> None:
    """At server shutdown, within SHUTDOWN_SECONDS: stop every connection's
    tasks (closing their upstream streams), close their rows, send buffered
    telemetry and release the upstream pool."""
    try:
        await asyncio.wait_for(_shut_down(), SHUTDOWN_SECONDS)
    except TimeoutError:
        logger.error("shutdown steps did not finish within %ss", SHUTDOWN_SECONDS)


async def _shut_down() -> None:
    try:
        await asyncio.gather(*(connection.close() for connection in list(live_connections)))
        closed = await record_instance_stopped(settings.CODEX_SERVER_INSTANCE, PROCESS_STARTED_AT)
        logger.info("shutting down: closed %d open connection row(s)", closed)
    finally:
        await flush_at_shutdown()
        await client_factory().aclose()

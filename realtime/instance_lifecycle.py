"""What this process does for its rows at start and at shutdown (PROTOCOL §7)."""

from __future__ import annotations

import asyncio
import logging

from django.conf import settings
from django.utils import timezone

from identity.actions import reconcile_restarted_instance, record_instance_stopped

from .services.telemetry import flush_at_shutdown

logger = logging.getLogger(__name__)

PROCESS_STARTED_AT = timezone.now()
_reconciled = asyncio.Event()  # set once the predecessor's rows are closed


async def reconcile_once() -> None:
    """Close the rows an earlier run of this instance left open; once per process.

    Called at server start (``manage.py serve``) and before the first
    connection's row is written (so plain ``daphne`` deployments get it too).
    """
    if _reconciled.is_set():
        return
    closed = await reconcile_restarted_instance(settings.CODEX_SERVER_INSTANCE, PROCESS_STARTED_AT)
    if closed:
        logger.info("closed %d connection row(s) left open by an earlier run of %s", closed, settings.CODEX_SERVER_INSTANCE)
    _reconciled.set()


async def shut_down() -> None:
    """At server shutdown: close this process's open rows and send buffered telemetry."""
    try:
        closed = await record_instance_stopped(settings.CODEX_SERVER_INSTANCE, PROCESS_STARTED_AT)
        logger.info("shutting down: closed %d open connection row(s)", closed)
    finally:
        await flush_at_shutdown()

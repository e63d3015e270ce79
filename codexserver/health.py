"""Liveness and readiness probes (PROTOCOL §2)."""

import asyncio
import logging

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.db import connection
from django.http import JsonResponse

logger = logging.getLogger(__name__)

READINESS_TIMEOUT = 2.0


async def healthz(request):
    return JsonResponse({"status": "ok"})


def _database_answers() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()


async def _channel_layer_answers() -> None:
    # A round trip through the layer proves it both stores and delivers.
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.send(channel, {"type": "readyz.ping"})
    await layer.receive(channel)


async def readyz(request):
    checks = {}
    for name, check in (
        ("database", database_sync_to_async(_database_answers)),
        ("channel_layer", _channel_layer_answers),
    ):
        try:
            await asyncio.wait_for(check(), READINESS_TIMEOUT)
            checks[name] = "ok"
        except Exception as exc:  # any failure means "not ready", never a 500
            logger.warning("readiness check %s failed: %s", name, type(exc).__name__)
            checks[name] = "unavailable"
    ready = all(state == "ok" for state in checks.values())
    return JsonResponse({"status": "ready" if ready else "unavailable", "checks": checks}, status=200 if ready else 503)

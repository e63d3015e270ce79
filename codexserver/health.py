"""Liveness and readiness probes (PROTOCOL §2)."""

import asyncio
import logging
import time

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.db import connection
from django.http import JsonResponse

from codexserver.loop_local import LoopLocal

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


# Upgrades ask whether the layer answers; a burst of them shares one probe a second.
LAYER_PROBE_SECONDS = 1.0


class _LayerProbe:
    def __init__(self) -> None:
        self.started_at = 0.0
        self.run: asyncio.Future | None = None


_layer_probes: LoopLocal[_LayerProbe] = LoopLocal(_LayerProbe)


async def channel_layer_available() -> bool:
    """Whether the channel layer answered a round trip (probed at most once a second)."""
    probe = _layer_probes.get()
    if probe.run is None or (probe.run.done() and time.monotonic() - probe.started_at >= LAYER_PROBE_SECONDS):
        probe.started_at = time.monotonic()
        probe.run = asyncio.ensure_future(_probe_layer())
    return await asyncio.shield(probe.run)


async def _probe_layer() -> bool:
    # Down is an error from the layer (refused, reset, auth). A round trip that
    # is merely slow usually means this process is busy (a burst of upgrades
    # shares the loop with the probe), and refusing a whole burst for that
    # would turn load into an outage; /readyz still reports slowness.
    try:
        await asyncio.wait_for(_channel_layer_answers(), READINESS_TIMEOUT)
    except TimeoutError:
        logger.info("channel layer slow to answer a probe; upgrades still accepted")
    except Exception as exc:
        logger.warning("channel layer unavailable: %s", type(exc).__name__)
        return False
    return True


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

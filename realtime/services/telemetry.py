"""Analytics events: ``POST {chatgpt}/codex/analytics-events/events`` under one identity.

A request holds the events of one identity only, and carries that identity's
headers: ``product_client_id`` and the ``originator`` header always agree.
Telemetry never fails the work it describes: errors are logged and dropped.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx

from identity.client_identity import ClientIdentity

from .config import UpstreamConfig

logger = logging.getLogger(__name__)

EVENTS_PATH = "codex/analytics-events/events"
THREAD_STARTED = "codex_thread_started"
TURN_COMPLETED = "codex_turn_completed"


def analytics_event(
    identity: ClientIdentity, event_type: str, thread_id: str, turn_id: str | None = None
) -> dict[str, Any]:
    return {
        "event_type": event_type,
        "event_params": {
            "product_client_id": identity.originator,
            "client_version": identity.client_version,
            "thread_id": thread_id,
            "turn_id": turn_id,
        },
    }


async def post_events(
    identity: ClientIdentity, events: list[dict[str, Any]], config: UpstreamConfig | None = None
) -> bool:
    """Send one batch for one identity; True when the upstream accepted it."""
    config = config or UpstreamConfig.from_settings()
    try:
        response = await config.chatgpt_client(identity).post(EVENTS_PATH, json={"events": events})
    except httpx.HTTPError as exc:
        logger.warning("telemetry not sent (%d event(s)): %s", len(events), type(exc).__name__)
        return False
    if response.status_code >= 400:
        logger.warning("telemetry refused (%d event(s)): HTTP %d", len(events), response.status_code)
        return False
    return True

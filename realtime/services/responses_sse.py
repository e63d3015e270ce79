"""Responses API over server-sent events: ``POST {api}/responses`` with ``stream: true``."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from httpx_sse import aconnect_sse

from identity.client_identity import ClientIdentity

from . import upstream_errors
from .config import UpstreamConfig

logger = logging.getLogger(__name__)


async def stream_events(
    identity: ClientIdentity, request, config: UpstreamConfig
) -> AsyncIterator[dict[str, Any]]:
    client = config.api_client(identity)
    body = {**request.body(), "stream": True}
    headers = {**request.session_headers(), "Accept": "text/event-stream"}
    async with upstream_errors.http_failures():
        async with aconnect_sse(client, "POST", "responses", json=body, headers=headers) as source:
            status = source.response.status_code
            if status >= 400:
                raise upstream_errors.error_for_status(status, await source.response.aread())
            async for sse in source.aiter_sse():
                event = _decode(sse.event, sse.data)
                if event is not None:
                    yield event


def _decode(event_name: str, data: str) -> dict[str, Any] | None:
    if not data or data == "[DONE]":
        return None
    try:
        event = json.loads(data)
    except ValueError:
        logger.warning("skipping an SSE event whose data is not JSON (event %r)", event_name)
        return None
    if not isinstance(event, dict):
        return None
    if event_name and event_name != "message":
        event.setdefault("type", event_name)
    return event

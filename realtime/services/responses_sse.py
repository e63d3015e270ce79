"""Responses API over server-sent events: ``POST {api}/responses`` with ``stream: true``."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import suppress
from typing import Any

import aiohttp
import httpx
from httpx_sse import SSEError, aconnect_sse

from identity.client_identity import ClientIdentity

from . import upstream_errors
from .config import UpstreamConfig
from .response_events import TERMINAL_EVENTS

# A turn ends within a second of its terminal event, drained or not (PROTOCOL §10).
DRAIN_SECONDS = 0.5

logger = logging.getLogger(__name__)


async def stream_events(
    identity: ClientIdentity, request, config: UpstreamConfig
) -> AsyncIterator[dict[str, Any]]:
    client = config.api_client(identity)
    body = request.body_json(stream=True).encode()
    headers = {**request.session_headers(), "Accept": "text/event-stream", "Content-Type": "application/json"}
    async with upstream_errors.http_failures():
        async with aconnect_sse(client, "POST", "responses", content=body, headers=headers) as source:
            status = source.response.status_code
            if status >= 400:
                raise upstream_errors.error_for_status(status, await source.response.aread())
            sse_events = source.aiter_sse()
            async for sse in sse_events:
                event = _decode(sse.event, sse.data)
                if event is None:
                    continue
                yield event
                if event.get("type") in TERMINAL_EVENTS:
                    await _drain(sse_events)
                    return


async def _drain(sse_events: AsyncIterator) -> None:
    """Read to the end of the body, briefly, so httpx can pool the connection."""
    with suppress(TimeoutError, httpx.HTTPError, SSEError, aiohttp.ClientError):
        async with asyncio.timeout(DRAIN_SECONDS):
            async for _ in sse_events:
                pass


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

"""Responses API over WebSocket: handshake to ``{ws api}/responses``, send ``response.create``."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from identity.client_identity import ClientIdentity

from . import upstream_errors
from .config import UpstreamConfig, join_url, websocket_url
from .identity_websocket import connect_as
from .response_events import TERMINAL_EVENTS

logger = logging.getLogger(__name__)

OPENAI_BETA = "responses_websockets=2026-02-06"


async def stream_events(
    identity: ClientIdentity, request, config: UpstreamConfig
) -> AsyncIterator[dict[str, Any]]:
    url = join_url(websocket_url(config.api_base_url), "responses")
    headers = {**request.session_headers(), "OpenAI-Beta": OPENAI_BETA}
    async with upstream_errors.websocket_failures(url):
        async with connect_as(identity, url, config, bearer_token=config.api_key, extra_headers=headers) as socket:
            await socket.send(request.body_json(type="response.create"))
            while True:
                try:
                    async with asyncio.timeout(config.idle_timeout):
                        raw = await socket.recv()
                except TimeoutError:
                    raise upstream_errors.stream_disconnected("no event within the idle timeout") from None
                event = _decode(raw)
                if event is not None:
                    yield event
                    if event.get("type") in TERMINAL_EVENTS:
                        return  # one socket per turn: leaving closes it


def _decode(raw: str | bytes) -> dict[str, Any] | None:
    try:
        event = json.loads(raw)
    except ValueError:
        logger.warning("skipping a Responses WebSocket frame that is not JSON")
        return None
    return event if isinstance(event, dict) else None

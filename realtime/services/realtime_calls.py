"""Realtime calls: ``POST {api}/realtime/calls`` (SDP offer), then the sideband WebSocket."""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from identity.client_identity import ClientIdentity

from . import upstream_errors
from .config import UpstreamConfig, join_url, websocket_url
from .identity_websocket import connect_as


@dataclass(frozen=True, slots=True)
class CreatedCall:
    call_id: str
    sdp_answer: str


async def create_call(identity: ClientIdentity, sdp_offer: str, config: UpstreamConfig) -> CreatedCall:
    """Raises UpstreamError when the upstream refuses or cannot be reached."""
    async with upstream_errors.http_failures():
        response = await config.api_client(identity).post(
            "realtime/calls", content=sdp_offer.encode(), headers={"Content-Type": "application/sdp"}
        )
    upstream_errors.raise_for_status(response)
    location = response.headers.get("Location", "")
    call_id = location.rstrip("/").rsplit("/realtime/calls/", 1)[-1] if "/realtime/calls/" in location else ""
    if not call_id:
        raise upstream_errors.UpstreamError("realtime call answer has no call id in Location", "other")
    return CreatedCall(call_id=call_id, sdp_answer=response.text)


def open_sideband(identity: ClientIdentity, call_id: str, config: UpstreamConfig):
    """``{ws api}/realtime?call_id=…`` with the call owner's identity headers."""
    url = join_url(websocket_url(config.api_base_url), "realtime") + "?" + str(httpx.QueryParams(call_id=call_id))
    return connect_as(identity, url, config, bearer_token=config.api_key)

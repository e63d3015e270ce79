"""Outbound WebSockets opened for an identity (Responses transport, realtime sideband).

The ``websockets`` client sends its own User-Agent unless told otherwise, so
the identity's User-Agent goes in ``user_agent_header`` and the rest of the
identity headers in ``additional_headers``: one of each on the wire.
"""

from __future__ import annotations

from websockets.asyncio.client import connect

from identity.client_identity import ClientIdentity
from identity.headers import build_outbound_headers
from identity.http_clients import shared_ssl_context

from .config import UpstreamConfig

MAX_UPSTREAM_MESSAGE_BYTES = 16 * 1024 * 1024


def connect_as(
    identity: ClientIdentity,
    url: str,
    config: UpstreamConfig,
    *,
    bearer_token: str | None = None,
    extra_headers: dict[str, str] | None = None,
) -> connect:
    headers = build_outbound_headers(identity, bearer_token=bearer_token)
    user_agent = headers.pop("User-Agent")
    headers.update(extra_headers or {})
    return connect(
        url,
        additional_headers=headers,
        user_agent_header=user_agent,
        # The same SSL context as the httpx pool: no TLS set-up per socket.
        ssl=shared_ssl_context() if url.startswith("wss:") else None,
        proxy=None,
        open_timeout=config.connect_timeout,
        close_timeout=1,
        max_size=MAX_UPSTREAM_MESSAGE_BYTES,
    )

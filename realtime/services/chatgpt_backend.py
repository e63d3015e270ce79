"""Reading listings from ``CODEX_CHATGPT_BASE_URL`` (connectors, plugins)."""

from __future__ import annotations

from typing import Any

from identity.client_identity import ClientIdentity

from . import upstream_errors
from .config import UpstreamConfig


async def get_listing(identity: ClientIdentity, path: str, key: str, config: UpstreamConfig) -> list[dict[str, Any]]:
    """GET ``path`` as ``identity`` and return the objects under ``key``; raises UpstreamError."""
    async with upstream_errors.http_failures():
        response = await config.chatgpt_client(identity).get(path)
    upstream_errors.raise_for_status(response)
    try:
        body = response.json()
    except ValueError as exc:
        raise upstream_errors.UpstreamError(f"{path} did not answer JSON", "other") from exc
    items = body.get(key) if isinstance(body, dict) else None
    return [item for item in items or [] if isinstance(item, dict)]

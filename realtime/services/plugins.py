"""Plugins: ``GET {chatgpt}/plugins/list``, for first-party originators only."""

from __future__ import annotations

from typing import Any

from identity.client_identity import ClientIdentity

from .chatgpt_backend import get_listing
from .config import UpstreamConfig

PLUGINS_PATH = "plugins/list"


async def list_plugins(identity: ClientIdentity, config: UpstreamConfig) -> list[dict[str, Any]]:
    if not identity.is_first_party:
        return []  # no upstream call at all for anyone else
    plugins = await get_listing(identity, PLUGINS_PATH, "plugins", config)
    return [{"id": plugin.get("id"), "name": plugin.get("name")} for plugin in plugins]

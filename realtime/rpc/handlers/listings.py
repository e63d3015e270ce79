"""``app/list`` and ``plugin/list``: upstream listings seen through the caller's identity."""

from __future__ import annotations

from typing import Any

from realtime.services.config import UpstreamConfig
from realtime.services.connectors import list_apps
from realtime.services.plugins import list_plugins

from ..params import params_object


async def list_app_connectors(context, params: Any) -> dict[str, Any]:
    params_object(params)
    return {"data": await list_apps(context.identity, UpstreamConfig.from_settings())}


async def list_plugin_entries(context, params: Any) -> dict[str, Any]:
    params_object(params)
    # ``data`` is PROTOCOL §5's list; ``marketplaces`` keeps the schema's
    # PluginListResponse valid (this server serves no marketplace).
    return {"data": await list_plugins(context.identity, UpstreamConfig.from_settings()), "marketplaces": []}

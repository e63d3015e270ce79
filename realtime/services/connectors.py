"""Connectors: ``GET {chatgpt}/connectors/directory/list``, filtered by the caller's originator."""

from __future__ import annotations

from typing import Any

from identity.client_identity import ClientIdentity

from .chatgpt_backend import get_listing
from .config import UpstreamConfig

DIRECTORY_PATH = "connectors/directory/list"


def visible_to(app: dict[str, Any], originator: str) -> bool:
    """An app that lists ``originators`` is shown only to those originators."""
    originators = app.get("originators")
    return originators is None or (isinstance(originators, list) and originator in originators)


async def list_apps(identity: ClientIdentity, config: UpstreamConfig) -> list[dict[str, Any]]:
    apps = await get_listing(identity, DIRECTORY_PATH, "apps", config)
    return [
        {"id": app.get("id"), "name": app.get("name"), "description": app.get("description")}
        for app in apps
        if visible_to(app, identity.originator)
    ]

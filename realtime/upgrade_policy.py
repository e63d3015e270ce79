"""Who may open the WebSocket (PROTOCOL §2): browsers by allowed Origin, and the bearer token."""

from __future__ import annotations

import hmac
from typing import Any

from django.conf import settings

# ASGI extension that lets a consumer refuse the upgrade with any HTTP status.
DENIAL_EXTENSION = "websocket.http.response"

FORBIDDEN = 403
UNAUTHORIZED = 401


def _header(scope: dict[str, Any], name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


def upgrade_refusal(scope: dict[str, Any]) -> int | None:
    """The HTTP status to refuse the upgrade with, or None to accept it."""
    origin = _header(scope, b"origin")
    if origin is not None and origin.decode("latin-1") not in settings.CODEX_ALLOWED_ORIGINS:
        return FORBIDDEN
    token = settings.CODEX_WS_AUTH_TOKEN
    if token:
        expected = b"Bearer " + token.encode()
        supplied = _header(scope, b"authorization") or b""
        if not hmac.compare_digest(supplied, expected):
            return UNAUTHORIZED
    return None

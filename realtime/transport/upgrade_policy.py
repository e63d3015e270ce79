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
    if token and not _bearer_matches(_header(scope, b"authorization") or b"", token.encode()):
        return UNAUTHORIZED
    return None


def _bearer_matches(authorization: bytes, token: bytes) -> bool:
    # RFC 9110: the scheme name is case-insensitive; the token is compared
    # in constant time.
    scheme, _, supplied = authorization.strip().partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(supplied.strip(), token)


def refusal_headers(status: int) -> list[tuple[bytes, bytes]]:
    """Headers of the refusal: a 401 names the scheme it wants (PROTOCOL §2)."""
    return [(b"www-authenticate", b"Bearer")] if status == UNAUTHORIZED else []

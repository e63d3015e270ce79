"""Who may open the WebSocket (PROTOCOL §2): browsers by allowed Origin; the
bearer token is read here and checked with the row's write (``identity.principals``)."""

from __future__ import annotations

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
    """The HTTP status to refuse the upgrade with before any token is looked
    at, or None to go on."""
    origin = _header(scope, b"origin")
    if origin is not None and origin.decode("latin-1") not in settings.CODEX_ALLOWED_ORIGINS:
        return FORBIDDEN
    return None


def bearer_token(scope: dict[str, Any]) -> str | None:
    """The token of ``Authorization: Bearer <token>``, or None. RFC 9110: the
    scheme name is case-insensitive."""
    authorization = _header(scope, b"authorization")
    if authorization is None:
        return None
    scheme, _, supplied = authorization.strip().partition(b" ")
    token = supplied.strip()
    if scheme.lower() != b"bearer" or not token:
        return None
    return token.decode("latin-1")


def refusal_headers(status: int) -> list[tuple[bytes, bytes]]:
    """Headers of the refusal: a 401 names the scheme it wants (PROTOCOL §2)."""
    return [(b"www-authenticate", b"Bearer")] if status == UNAUTHORIZED else []

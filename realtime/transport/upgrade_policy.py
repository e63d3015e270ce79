"""Who may open the WebSocket (PROTOCOL §2): browsers by allowed Origin; the
bearer token is read here and checked with the row's write (``identity.principals``),
unless it can be refused without the database (``TokenGate``)."""

from __future__ import annotations

from typing import Any

from django.conf import settings

from codexserver.loop_local import LoopLocal
from identity.principals import AuthenticatedPrincipal, is_configured_token, looks_like_issued_token

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


class TokenGate:
    """What an upgrade can be refused for in memory, before the database or
    the channel layer is asked: once any token is configured, a missing
    token, or one that is neither CODEX_WS_AUTH_TOKEN nor shaped like an
    issued one, is 401 at once. Whether issued tokens exist is learned from
    the upgrades' lookups; tokens are never deleted, so once true it stays."""

    def __init__(self) -> None:
        self.tokens_configured = False

    def refuses(self, bearer: str | None) -> bool:
        if not (settings.CODEX_WS_AUTH_TOKEN or self.tokens_configured):
            return False  # with no token configured, anyone is the local principal
        if bearer is None:
            return True
        return not (is_configured_token(bearer) or looks_like_issued_token(bearer))

    def learn(self, principal: AuthenticatedPrincipal | None) -> None:
        """What the lookup decided: refused, or let in by an issued token, means tokens exist."""
        if principal is None or principal.token_id is not None:
            self.tokens_configured = True


_gates: LoopLocal[TokenGate] = LoopLocal(TokenGate)


def token_gate() -> TokenGate:
    return _gates.get()


def refusal_headers(status: int) -> list[tuple[bytes, bytes]]:
    """Headers of the refusal: a 401 names the scheme it wants (PROTOCOL §2)."""
    return [(b"www-authenticate", b"Bearer")] if status == UNAUTHORIZED else []

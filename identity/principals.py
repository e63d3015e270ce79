"""Principals and their tokens (PROTOCOL §12): whose a connection is.

A token is 32 random bytes (``cxs_`` + 43 URL-safe characters), shown once
when it is issued and stored only as its SHA-256 digest and a visible
prefix. A fast, unsalted hash is right for such a token, unlike for a
password: with 256 random bits there is no dictionary to try, so a stolen
digest gives nothing away, while a deliberately slow hash (PBKDF2, argon2)
would spend tens of milliseconds of CPU on every upgrade and could not be
looked up by one index. An upgrade costs one indexed lookup of the digest.

``CODEX_WS_AUTH_TOKEN`` is one token of the local principal, compared in
memory (constant time) and never stored. With no token configured at all,
neither that nor any issued one (even revoked: revoking the last token must
not open the server), every connection is the local principal.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from .models import AccessToken, Principal

TOKEN_PREFIX = "cxs_"
URL_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
VISIBLE_CHARS = 12  # "cxs_" and the first 8 random characters: enough to tell tokens apart
LOCAL_PRINCIPAL = "local"
# A token's ``last_used_at`` is written at most this often: a burst of
# connections with one token must not queue a write of one row each.
LAST_USED_RESOLUTION = timedelta(seconds=60)


@dataclass(frozen=True, slots=True)
class AuthenticatedPrincipal:
    """Who a connection is, fixed at the upgrade. The budget is what it was
    then; the process's principal watch keeps each connection's own copy
    current (``realtime.lifecycle``)."""

    id: int
    name: str
    token_id: int | None  # None: the local principal (no token, or CODEX_WS_AUTH_TOKEN)
    token_budget: int | None
    workspace_roots: tuple[str, ...]
    # Let in with no token because none was configured: once one is, it is
    # closed like a revoked one (every connection must then hold a token).
    anonymous: bool = False


class TokenError(Exception):
    """Issuing or revoking was refused; the message says why."""


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    return hashlib.sha256(_header_bytes(token)).hexdigest()


def _header_bytes(text: str) -> bytes:
    """A token as the header carried it (ours are ASCII; a header is Latin-1)."""
    return text.encode("latin-1", "replace")


def is_configured_token(bearer: str) -> bool:
    """Whether ``bearer`` is CODEX_WS_AUTH_TOKEN, compared in constant time."""
    configured = settings.CODEX_WS_AUTH_TOKEN
    return bool(configured) and hmac.compare_digest(_header_bytes(bearer), configured.encode())


def looks_like_issued_token(bearer: str) -> bool:
    """Whether ``bearer`` has the shape of a token we issue: anything else is
    refused without a lookup once tokens are configured."""
    body = bearer[len(TOKEN_PREFIX) :]
    return bearer.startswith(TOKEN_PREFIX) and len(body) == 43 and all(c in URL_SAFE for c in body)


def _authenticated(principal: Principal, token_id: int | None, anonymous: bool = False) -> AuthenticatedPrincipal:
    return AuthenticatedPrincipal(
        id=principal.pk,
        name=principal.name,
        token_id=token_id,
        token_budget=principal.token_budget,
        workspace_roots=tuple(principal.workspace_roots or ()),
        anonymous=anonymous,
    )


def local_principal() -> Principal:
    principal, _ = Principal.objects.get_or_create(name=LOCAL_PRINCIPAL)
    return principal


def tokens_configured() -> bool:
    """Whether any token is configured: then every upgrade needs one."""
    return bool(settings.CODEX_WS_AUTH_TOKEN) or AccessToken.objects.exists()


def authenticate(bearer: str | None) -> AuthenticatedPrincipal | None:
    """The principal a bearer token (or none) stands for, or None: refused.
    Synchronous: it runs on a row writer's thread with the row's write."""
    if bearer is not None:
        if is_configured_token(bearer):
            return _authenticated(local_principal(), None)
        if looks_like_issued_token(bearer):
            row = (
                AccessToken.objects.select_related("principal")
                .filter(digest=token_digest(bearer), revoked_at__isnull=True)
                .first()
            )
            if row is not None:
                _note_use(row)
                return _authenticated(row.principal, row.pk)
    if tokens_configured():
        return None
    return _authenticated(local_principal(), None, anonymous=True)


def _note_use(row: AccessToken) -> None:
    now = timezone.now()
    if row.last_used_at is None or row.last_used_at < now - LAST_USED_RESOLUTION:
        AccessToken.objects.filter(pk=row.pk).update(last_used_at=now)


def issue_token(principal_name: str, token_name: str | None = None) -> tuple[AccessToken, str]:
    """A new token of ``principal_name`` (created if new): its row, and the
    token itself, which nothing keeps; show it once."""
    principal_name = principal_name_of(principal_name)
    token = new_token()
    name = (token_name or token[:VISIBLE_CHARS]).strip()
    if not name or len(name) > 150:
        raise TokenError("a token's name is 1 to 150 characters")
    try:
        with transaction.atomic():
            principal, _ = Principal.objects.get_or_create(name=principal_name)
            row = AccessToken.objects.create(
                principal=principal, name=name, prefix=token[:VISIBLE_CHARS], digest=token_digest(token)
            )
    except IntegrityError:  # the name is taken (perhaps by an issue that ran at the same moment)
        raise TokenError(f"{principal_name} already has a token named {name!r}") from None
    return row, token


def principal_name_of(text: str) -> str:
    """A principal's name as the commands and the admin take it."""
    name = text.strip()
    if not name or len(name) > 150:
        raise TokenError("a principal's name is 1 to 150 characters")
    return name


def revoke_token(principal_name: str, token_name: str) -> tuple[AccessToken, bool]:
    """Revoke one token; every process closes its live connections within
    ``CODEX_PRINCIPAL_CHECK_SECONDS``. Gives the row, and whether it was
    revoked now (False: it already was)."""
    row = AccessToken.objects.filter(principal__name=principal_name, name=token_name).first()
    if row is None:
        raise TokenError(f"{principal_name} has no token named {token_name!r}")
    revoked_now = revoke(AccessToken.objects.filter(pk=row.pk)) == 1
    row.refresh_from_db()
    return row, revoked_now


def revoke(tokens) -> int:
    """Revoke the tokens of a queryset that are not revoked yet; how many."""
    return tokens.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())

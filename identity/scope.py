"""A contextvars scope that carries the identity into everything a request starts.

Like sentry-sdk's scopes: each request task enters the scope once; tasks it
creates copy the context and so inherit the identity; nothing leaks between
tasks. Outside any scope the process default applies.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from .client_identity import ClientIdentity, process_default_identity


@dataclass(frozen=True, slots=True)
class IdentityScope:
    identity: ClientIdentity
    connection_id: str | None = None


_current_scope: ContextVar[IdentityScope | None] = ContextVar(
    "codex_identity_scope", default=None
)


@contextmanager
def identity_scope(
    identity: ClientIdentity, connection_id: str | None = None
) -> Iterator[IdentityScope]:
    scope = IdentityScope(identity, connection_id)
    token = _current_scope.set(scope)
    try:
        yield scope
    finally:
        _current_scope.reset(token)


def current_scope() -> IdentityScope | None:
    return _current_scope.get()


def current_identity() -> ClientIdentity:
    scope = _current_scope.get()
    return scope.identity if scope is not None else process_default_identity()

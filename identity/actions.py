"""The only functions that change ConnectionIdentity and ServerBoot rows.

opened (at the upgrade, with the token's check), initialized (one write of
every identity field), closed (at disconnect) and reconciled (rows a dead
process left open); a process's boot: started, beating, stopped.
The async ones run through channels' ``database_sync_to_async``, which also
retires stale database connections around each call, as a request would.

Row writes do not queue behind every other ORM call of the process on
asgiref's one thread-sensitive thread: they run on their own small pool of
threads (one for SQLite, which takes one writer at a time anyway), each
holding a pooled PostgreSQL connection. A burst of a thousand connects and
disconnects must fit in daphne's connect timeout.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from typing import TypeVar

from channels.db import DatabaseSyncToAsync
from django.conf import settings
from django.db import connection, connections, transaction
from django.db.models import DateTimeField, ExpressionWrapper, Value
from django.db.models.functions import Now
from django.utils import timezone

from .client_identity import ClientIdentity
from .models import AccessToken, ConnectionIdentity, Principal, ServerBoot
from .principals import AuthenticatedPrincipal, authenticate, tokens_configured

T = TypeVar("T")


@cache
def row_writers() -> ThreadPoolExecutor:
    threads = 1 if connection.vendor == "sqlite" else settings.CODEX_DB_WRITE_THREADS
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="row-writer")


@cache
def store_readers() -> ThreadPoolExecutor:
    """Threads reading threads, turns and items for clients: a client paging
    a long thread never delays a turn's start, lock extension or end, which
    go to the row writers (one thread on SQLite, whose WAL lets these read
    beside it)."""
    return ThreadPoolExecutor(max_workers=settings.CODEX_DB_READ_THREADS, thread_name_prefix="store-reader")


def close_row_writer_connections() -> None:
    """Close the connection each row-writer and store-reader thread holds
    (tests drop the database after this; a stopping process lets its
    sessions go)."""
    for pool in (row_writers(), store_readers()):
        _close_connections_of(pool)


def _close_connections_of(pool: ThreadPoolExecutor) -> None:
    threads = pool._max_workers
    barrier = threading.Barrier(threads)

    def close_in_this_thread() -> None:
        barrier.wait(timeout=10)  # one call per thread: each waits for the others
        connections.close_all()

    for future in [pool.submit(close_in_this_thread) for _ in range(threads)]:
        future.result()


def database_sync_to_async(func):
    """channels' wrapper (it retires stale connections around each call), on
    the row writers' threads."""

    def call(*args, **kwargs):
        return DatabaseSyncToAsync(func, thread_sensitive=False, executor=row_writers())(*args, **kwargs)

    return call


def database_read_to_async(func):
    """The same, on the store readers' threads: for reads only."""

    def call(*args, **kwargs):
        return DatabaseSyncToAsync(func, thread_sensitive=False, executor=store_readers())(*args, **kwargs)

    return call


@database_sync_to_async
def record_connection_opened(
    connection_id: uuid.UUID, server_instance: str, boot_id: uuid.UUID, remote_addr: str | None, bearer: str | None
) -> AuthenticatedPrincipal | None:
    """At the upgrade, in one trip to a row writer: who ``bearer`` stands for
    (``identity.principals``), and the connection's row, of that principal.
    None: the token is refused, and nothing is written."""
    principal = authenticate(bearer)
    if principal is None:
        return None
    ConnectionIdentity.objects.create(
        connection_id=connection_id,
        principal_id=principal.id,
        server_instance=server_instance,
        boot_id=boot_id,
        remote_addr=remote_addr,
        connected_at=timezone.now(),
    )
    return principal


@dataclass(frozen=True, slots=True)
class PrincipalState:
    """What a process's live connections need re-read (``read_principal_state``)."""

    revoked_tokens: set[int]
    budgets: dict[int, int]  # of the principals that have one
    tokens_configured: bool  # only read while anonymous connections are open


@database_sync_to_async
def read_principal_state(token_ids: set[int], principal_ids: set[int], anonymous_open: bool) -> PrincipalState:
    """For a process's live connections: which of their tokens are revoked,
    their principals' budgets, and (when some came in with no token)
    whether any token is configured now. Indexed reads, 500 ids a
    statement (within every backend's parameter limit)."""
    revoked: set[int] = set()
    for chunk in _chunks(token_ids):
        revoked.update(AccessToken.objects.filter(pk__in=chunk, revoked_at__isnull=False).values_list("pk", flat=True))
    budgets: dict[int, int] = {}
    for chunk in _chunks(principal_ids):
        budgets.update(
            Principal.objects.filter(pk__in=chunk, token_budget__isnull=False).values_list("pk", "token_budget")
        )
    return PrincipalState(revoked, budgets, anonymous_open and tokens_configured())


def _chunks(ids: Iterable[T], size: int = 500) -> list[list[T]]:
    """``ids`` 500 a statement: a long ``IN`` list stays under every backend's parameter limit."""
    listed = list(ids)
    return [listed[start : start + size] for start in range(0, len(listed), size)]


def identity_fields(identity: ClientIdentity) -> dict:
    """The row's fields that come from the identity, by model field name."""
    return {
        "client_name": identity.client_name,
        "client_title": identity.client_title,
        "client_version": identity.client_version,
        "originator": identity.originator,
        "user_agent": identity.user_agent,
        "is_infrastructure": identity.is_infrastructure,
        "is_first_party": identity.is_first_party,
    }


@database_sync_to_async
def record_connection_initialized(
    connection_id: uuid.UUID, identity: ClientIdentity, capabilities: dict
) -> None:
    ConnectionIdentity.objects.filter(connection_id=connection_id).update(
        **identity_fields(identity), capabilities=capabilities, initialized_at=timezone.now()
    )


@database_sync_to_async
def record_connection_closed(connection_id: uuid.UUID) -> None:
    ConnectionIdentity.objects.filter(
        connection_id=connection_id, disconnected_at__isnull=True
    ).update(disconnected_at=timezone.now())


def close_stale_connections(
    server_instance: str | None = None, connected_before: datetime | None = None
) -> int:
    """Close open rows a dead process left behind; returns how many.

    ``connected_before`` keeps a live process's own rows out of reach: a
    restarted instance closes only rows older than its own start.
    """
    rows = ConnectionIdentity.objects.filter(disconnected_at__isnull=True)
    if server_instance is not None:
        rows = rows.filter(server_instance=server_instance)
    if connected_before is not None:
        rows = rows.filter(connected_at__lt=connected_before)
    return rows.update(disconnected_at=timezone.now())


@database_sync_to_async
def record_boot_started(boot_id: uuid.UUID, server_instance: str, started_at: datetime) -> None:
    # Idempotent: a start-up interrupted after this write runs it again.
    ServerBoot.objects.update_or_create(
        boot_id=boot_id,
        defaults={"server_instance": server_instance, "started_at": started_at, "heartbeat_at": Now(), "stopped_at": None},
    )


@database_sync_to_async
def record_heartbeat(boot_id: uuid.UUID, live_connection_ids: frozenset[uuid.UUID], orphan_age: timedelta) -> int:
    """Beat, on the database's clock (hosts' clocks may disagree). Then set
    this process's rows straight; returns how many changed:
    - declared dead while it could not beat (a database outage, a stalled
      loop), it comes back: its boot and its live connections' rows reopen;
    - rows of its own boot with no live connection behind them (a close that
      failed to write, a connect cancelled after its row) are closed.
    """
    with transaction.atomic():
        beating = ServerBoot.objects.filter(boot_id=boot_id, stopped_at__isnull=True).update(heartbeat_at=Now())
        changed = 0
        if not beating:
            ServerBoot.objects.filter(boot_id=boot_id).update(heartbeat_at=Now(), stopped_at=None)
            changed += _set_disconnected_at(boot_id, live_connection_ids, None)
        open_rows = ConnectionIdentity.objects.filter(
            boot_id=boot_id, disconnected_at__isnull=True, connected_at__lt=timezone.now() - orphan_age
        ).values_list("connection_id", flat=True)
        orphans = [connection_id for connection_id in open_rows if connection_id not in live_connection_ids]
        changed += _set_disconnected_at(boot_id, orphans, timezone.now())
    return changed


def _set_disconnected_at(boot_id: uuid.UUID, connection_ids, value: datetime | None) -> int:
    """One UPDATE per chunk of ids (``_chunks``)."""
    return sum(
        ConnectionIdentity.objects.filter(boot_id=boot_id, connection_id__in=chunk).update(disconnected_at=value)
        for chunk in _chunks(str(connection_id) for connection_id in connection_ids)
    )


@database_sync_to_async
def close_rows_of_dead_processes(
    server_instance: str, process_started_at: datetime, heartbeat_timeout: timedelta
) -> int:
    """Close the open rows of every process whose heartbeat stopped, whatever
    its instance name; never those of a process still beating, even one that
    shares ours. Rows from before boot ids existed are closed by the old rule:
    same instance, connected before this process started."""
    now = timezone.now()
    silent_since = ExpressionWrapper(Now() - Value(heartbeat_timeout), output_field=DateTimeField())
    with transaction.atomic():
        dead = list(
            ServerBoot.objects.filter(stopped_at__isnull=True, heartbeat_at__lt=silent_since)
            .values_list("boot_id", flat=True)
        )
        closed = ConnectionIdentity.objects.filter(disconnected_at__isnull=True, boot_id__in=dead).update(
            disconnected_at=now
        )
        ServerBoot.objects.filter(boot_id__in=dead).update(stopped_at=now)
        closed += ConnectionIdentity.objects.filter(
            disconnected_at__isnull=True,
            boot_id__isnull=True,
            server_instance=server_instance,
            connected_at__lt=process_started_at,
        ).update(disconnected_at=now)
    return closed


@database_sync_to_async
def prune_closed_rows(closed_before: datetime, batch: int = 5_000) -> int:
    """Delete up to ``batch`` connection rows closed before ``closed_before``
    (CODEX_CONNECTION_ROW_RETENTION_DAYS): every connection writes one, and
    nothing else ever removes them. One batch a call, so a first prune of a
    large table never holds up its caller (the heartbeat) for long."""
    ids = list(ConnectionIdentity.objects.filter(disconnected_at__lt=closed_before).values_list("pk", flat=True)[:batch])
    return ConnectionIdentity.objects.filter(pk__in=ids).delete()[0] if ids else 0


@database_sync_to_async
def record_boot_stopped(boot_id: uuid.UUID) -> int:
    """At shutdown: close this process's rows still open, and its boot."""
    now = timezone.now()
    closed = ConnectionIdentity.objects.filter(boot_id=boot_id, disconnected_at__isnull=True).update(
        disconnected_at=now
    )
    ServerBoot.objects.filter(boot_id=boot_id).update(stopped_at=now)
    return closed

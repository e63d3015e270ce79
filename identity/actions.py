"""The only functions that change ConnectionIdentity rows.

opened (at the upgrade), initialized (one write of every identity field),
closed (at disconnect) and reconciled (rows a dead process left open).
The async ones run through channels' ``database_sync_to_async``, which also
retires stale database connections around each call, as a request would.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from channels.db import database_sync_to_async
from django.utils import timezone

from .client_identity import ClientIdentity
from .models import ConnectionIdentity


@database_sync_to_async
def record_connection_opened(
    connection_id: uuid.UUID, server_instance: str, remote_addr: str | None
) -> None:
    ConnectionIdentity.objects.create(
        connection_id=connection_id,
        server_instance=server_instance,
        remote_addr=remote_addr,
        connected_at=timezone.now(),
    )


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
def reconcile_restarted_instance(server_instance: str, process_started_at: datetime) -> int:
    """At a process's start: close what an earlier run of this instance left open."""
    return close_stale_connections(server_instance, process_started_at)


@database_sync_to_async
def record_instance_stopped(server_instance: str, process_started_at: datetime) -> int:
    """At shutdown: close the rows of this process's connections still open."""
    return ConnectionIdentity.objects.filter(
        server_instance=server_instance, disconnected_at__isnull=True, connected_at__gte=process_started_at
    ).update(disconnected_at=timezone.now())

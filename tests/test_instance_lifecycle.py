"""This process's boot and heartbeat (PROTOCOL §7), against the test database."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from django.utils import timezone

from identity import actions
from identity.models import ConnectionIdentity, ServerBoot
from identity.principals import local_principal
from realtime.lifecycle import process as instance_lifecycle
from realtime.lifecycle.process import ProcessLifecycle

pytestmark = pytest.mark.django_db(transaction=True)


@database_sync_to_async
def make_rows(boot_id: uuid.UUID, count: int, age: timedelta) -> list[uuid.UUID]:
    ids = [uuid.uuid4() for _ in range(count)]
    local = local_principal()
    for connection_id in ids:
        ConnectionIdentity.objects.create(
            connection_id=connection_id,
            principal=local,
            server_instance="here",
            boot_id=boot_id,
            connected_at=timezone.now() - age,
        )
    return ids


@database_sync_to_async
def open_ids() -> set[uuid.UUID]:
    return set(ConnectionIdentity.objects.filter(disconnected_at__isnull=True).values_list("connection_id", flat=True))


async def test_a_start_interrupted_after_the_boot_write_can_run_again(monkeypatch):
    real = instance_lifecycle.close_rows_of_dead_processes
    calls = 0

    async def fails_once(*args):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("database blip")
        return await real(*args)

    monkeypatch.setattr(instance_lifecycle, "close_rows_of_dead_processes", fails_once)
    lifecycle = ProcessLifecycle()
    with pytest.raises(RuntimeError):
        await lifecycle.ensure_started()
    await lifecycle.ensure_started()  # the boot row exists already: no IntegrityError
    assert await database_sync_to_async(ServerBoot.objects.filter(boot_id=lifecycle.boot_id).count)() == 1
    await lifecycle.shut_down()


async def test_a_process_declared_dead_comes_back_with_its_live_rows_and_closes_its_orphans():
    boot = uuid.uuid4()
    await actions.record_boot_started(boot, "here", timezone.now())
    live = await make_rows(boot, 2, timedelta(minutes=5))
    orphan = await make_rows(boot, 1, timedelta(minutes=5))
    young = await make_rows(boot, 1, timedelta(seconds=1))  # an upgrade still in progress

    # Silent past the timeout (a database outage): another process closes its rows.
    await database_sync_to_async(ServerBoot.objects.filter(boot_id=boot).update)(heartbeat_at=timezone.now() - timedelta(minutes=5))
    assert await actions.close_rows_of_dead_processes("elsewhere", timezone.now(), timedelta(seconds=60)) == 4
    assert await open_ids() == set()

    changed = await actions.record_heartbeat(boot, frozenset(live), timedelta(seconds=60))
    assert changed == 2 and await open_ids() == set(live)
    # Beating again: an orphan of ours that was open is closed, a young row is left alone.
    await database_sync_to_async(ConnectionIdentity.objects.filter(connection_id__in=orphan + young).update)(disconnected_at=None)
    assert await actions.record_heartbeat(boot, frozenset(live), timedelta(seconds=60)) == 1
    assert await open_ids() == set(live) | set(young)
    stored = await database_sync_to_async(ServerBoot.objects.get)(boot_id=boot)
    assert stored.stopped_at is None

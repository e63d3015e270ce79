"""The read-only admin, the stale-row command and the health probes."""

import uuid
from datetime import timedelta

import httpx
import pytest
from django.core.management import call_command
from django.urls import reverse
from django.utils import timezone

from identity.actions import identity_fields
from identity.client_identity import ClientIdentity
from identity.models import ConnectionIdentity
from identity.principals import local_principal

pytestmark = pytest.mark.django_db


def make_row(name="codex_ios", *, instance="host-1", open_=True, age=timedelta(0)):
    identity = ClientIdentity.from_client_info(name, "1.4.0")
    return ConnectionIdentity.objects.create(
        connection_id=uuid.uuid4(),
        principal=local_principal(),
        server_instance=instance,
        **identity_fields(identity),
        connected_at=timezone.now() - age,
        initialized_at=timezone.now() - age,
        disconnected_at=None if open_ else timezone.now(),
    )


def test_superuser_sees_rows_filters_and_search(admin_client):
    ios = make_row("codex_ios")
    make_row("codex-backend", open_=False)
    uninitialized = ConnectionIdentity.objects.create(
        connection_id=uuid.uuid4(), principal=local_principal(), server_instance="host-1", connected_at=timezone.now()
    )
    changelist = reverse("admin:identity_connectionidentity_changelist")
    page = admin_client.get(changelist)
    assert page.status_code == 200
    body = page.content.decode()
    # Who is connected now: the default view holds the open rows only.
    assert "codex_ios" in body and "codex-backend" not in body
    assert "first-party" in body and "icon-no.svg" not in body  # an uninitialized row is "—", not "no"
    assert str(uninitialized.connection_id)[:8] in body
    assert timezone.localtime(ios.connected_at).strftime("%H:%M:%S UTC") in body
    everything = admin_client.get(changelist, {"state": "all"}).content.decode()
    assert "codex-backend" in everything
    filtered = admin_client.get(changelist, {"originator": "codex_ios", "state": "all"}).content.decode()
    assert str(ios.connection_id)[:8] in filtered and "codex-backend" not in filtered
    found = admin_client.get(changelist, {"q": str(ios.connection_id)[:8]}).content.decode()
    assert str(ios.connection_id)[:8] in found


def test_add_change_and_delete_are_refused(admin_client):
    row = make_row()
    assert admin_client.get(reverse("admin:identity_connectionidentity_add")).status_code == 403
    change_url = reverse("admin:identity_connectionidentity_change", args=[row.pk])
    view = admin_client.get(change_url)
    assert view.status_code == 200 and 'name="_save"' not in view.content.decode()
    assert admin_client.post(change_url, {"client_name": "forged"}).status_code == 403
    delete_url = reverse("admin:identity_connectionidentity_delete", args=[row.pk])
    assert admin_client.post(delete_url, {"post": "yes"}).status_code == 403
    row.refresh_from_db()
    assert row.client_name == "codex_ios"


def test_admin_requires_a_staff_login(client):
    page = client.get(reverse("admin:identity_connectionidentity_changelist"))
    assert page.status_code == 302 and "/login/" in page["Location"]


def test_close_stale_connections_by_instance_and_age(capsys):
    dead = make_row(instance="dead-host")
    alive_old = make_row(instance="live-host", age=timedelta(hours=3))
    alive_new = make_row(instance="live-host")
    call_command("close_stale_connections", "--instance", "dead-host")
    call_command("close_stale_connections", "--older-than", "2h")
    for row in (dead, alive_old, alive_new):
        row.refresh_from_db()
    assert dead.disconnected_at and alive_old.disconnected_at and alive_new.disconnected_at is None
    assert "closed 1 stale connection row(s)" in capsys.readouterr().out


def test_close_stale_connections_refuses_to_close_everything():
    from django.core.management.base import CommandError

    with pytest.raises(CommandError):
        call_command("close_stale_connections")


@pytest.mark.django_db(transaction=True)  # the probe manages its own connection
def test_healthz_and_readyz(client):
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


@pytest.mark.e2e
def test_readyz_is_503_when_the_channel_layer_is_down(daphne_server):
    server = daphne_server(REDIS_URL="redis://127.0.0.1:1/0")
    assert httpx.get(server.http_url + "/healthz").status_code == 200
    ready = httpx.get(server.http_url + "/readyz", timeout=10)
    assert ready.status_code == 503
    assert ready.json()["checks"] == {"database": "ok", "channel_layer": "unavailable"}


def test_changelist_at_100000_rows_uses_a_fixed_number_of_queries_and_the_open_first_index(admin_client):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from identity.admin import ConnectionIdentityAdmin

    now = timezone.now()
    local = local_principal()
    ConnectionIdentity.objects.bulk_create(
        [
            ConnectionIdentity(
                connection_id=uuid.uuid4(),
                principal=local,
                server_instance=f"node-{i % 4}",
                client_name=f"client_{i % 10_000}",
                client_version="1.0",
                originator=f"client_{i % 10_000}",
                user_agent=f"client_{i % 10_000}/0.169.0 (Linux; x86_64) (client_{i % 10_000}; 1.0)",
                connected_at=now - timedelta(seconds=i),
                disconnected_at=None if i % 10 == 0 else now,
            )
            for i in range(100_000)
        ],
        batch_size=5000,
    )
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE identity_connectionidentity")
    changelist = reverse("admin:identity_connectionidentity_changelist")
    with CaptureQueriesContext(connection) as queries:
        page = admin_client.get(changelist, {"originator": "client_7", "state": "all"})
    assert page.status_code == 200 and "client_7" in page.content.decode()
    assert len(queries) <= 12, [q["sql"] for q in queries]  # no query per row
    # 10,000 distinct names chosen by clients never become 10,000 filter links.
    default_view = admin_client.get(changelist).content.decode()
    assert default_view.count("?originator=") <= 20 and "client_9999" not in default_view.split('id="changelist-filter"')[-1]
    assert len(default_view) < 400_000
    plan = ConnectionIdentity.objects.order_by(*ConnectionIdentityAdmin.ordering)[:100].explain()
    assert "identity_conn_open_first" in plan, plan
    listed = list(ConnectionIdentity.objects.order_by(*ConnectionIdentityAdmin.ordering).values_list("disconnected_at", flat=True)[:10_001])
    assert all(value is None for value in listed[:10_000]) and listed[10_000] is not None  # open first


def test_turn_admin_splits_usage_per_client_shows_times_and_items_by_name_and_filters_only_present_originators(admin_client):
    """Issue 24, 12: two infrastructure clients share codex_cli_rs's
    originator; the operator still tells their usage apart."""
    from realtime.models import StoredItem, StoredThread, StoredTurn

    principal = local_principal()
    thread = StoredThread.objects.create(
        thread_id=str(uuid.uuid4()), principal=principal, model="m", model_provider="openai", cwd="/",
        originator="codex_cli_rs", created_at=timezone.now(), updated_at=timezone.now(), turn_sequence=3,
    )  # fmt: skip
    for number, client in enumerate(["codex_app_server_daemon", "codex-backend", "codex-backend"], start=1):
        turn = StoredTurn.objects.create(
            turn_id=str(uuid.uuid4()), thread=thread, principal=principal, originator="codex_cli_rs", client_name=client,
            connection_id=uuid.uuid4(), status="completed", sequence=number, started_at_ms=1_796_000_000_000,
            completed_at_ms=1_796_000_002_500, has_usage=True, total_tokens=10 * number,
        )  # fmt: skip
        StoredItem.objects.create(turn=turn, position=0, item_type="userMessage", item={}, started_at_ms=0)

    page = admin_client.get(reverse("admin:realtime_storedturn_changelist")).content.decode()
    usage = page[page.index('id="usage-by-originator"') :]
    assert "<td>codex_cli_rs</td><td>codex-backend</td><td>2</td>" in usage
    assert "<td>codex_cli_rs</td><td>codex_app_server_daemon</td><td>1</td>" in usage
    filters = page[page.index("By originator") :] if "By originator" in page else page
    assert "?originator=codex_cli_rs" in filters and "?originator=codex_ios" not in filters  # no rows of codex_ios

    detail = admin_client.get(reverse("admin:realtime_storedturn_change", args=[turn.pk])).content.decode()
    assert "Started at ms" not in detail and "2026-" in detail and "2.5 s" in detail
    assert "StoredItem object" not in detail and "0: userMessage" in detail
    threads = admin_client.get(reverse("admin:realtime_storedthread_changelist")).content.decode()
    assert '<td class="field-turns">3</td>' in threads

"""Principals (PROTOCOL §12): every token is someone, and each sees only its own.

In-process here, on whichever database the suite runs on (CI runs it on
SQLite and again on PostgreSQL + Redis); across two real ``serve``
processes on PostgreSQL + Redis in ``tests/test_principals_e2e.py``.
"""

from __future__ import annotations

import asyncio
import io
import uuid

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.apps import apps as installed_apps
from django.core.management import call_command
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from identity.models import AccessToken, ConnectionIdentity, Principal
from identity.principals import LOCAL_PRINCIPAL, token_digest
from realtime.management.commands.serve import refusal_to_listen
from tests.rpc_client import CommunicatorClient

pytestmark = pytest.mark.django_db(transaction=True)

USAGE_14 = "fixture:issue-20047-openai-responses"  # a recorded stream whose usage totals 14 tokens


def issue(principal: str, name: str | None = None) -> str:
    """``manage.py issue_token``: the token is alone on the last line."""
    out = io.StringIO()
    call_command("issue_token", principal, *(["--name", name] if name else []), stdout=out)
    return out.getvalue().splitlines()[-1]


issue_async = database_sync_to_async(issue)
command = database_sync_to_async(call_command)


def bearer(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {token}".encode())]


async def upgrade_status(application, headers) -> int:
    """The HTTP status of an upgrade as daphne would answer it (101: accepted)."""
    communicator = WebsocketCommunicator(application, "/", headers=headers)
    communicator.scope["extensions"] = {"websocket.http.response": {}}  # as daphne offers it
    await communicator.send_input({"type": "websocket.connect"})
    reply = await communicator.receive_output(timeout=5)
    if reply["type"] == "websocket.accept":
        await communicator.disconnect()
        return 101
    assert reply["type"] == "websocket.http.response.start", reply
    await communicator.wait()
    return reply["status"]


@pytest.fixture
def as_principal(connect):
    async def open_client(token: str | None, name: str = "codex_vscode") -> CommunicatorClient:
        client = await connect(headers=bearer(token) if token else None)
        await client.initialize(name, "1.0.0")
        return client

    return open_client


# --- tokens --------------------------------------------------------------------


async def test_issued_tokens_are_kept_only_as_hashes_and_name_their_principal(as_principal):
    token = await issue_async("alice", "laptop")
    assert token.startswith("cxs_") and len(token) == 47
    client = await as_principal(token)
    await client.run_turn(await client.start_thread(), "hello")

    @database_sync_to_async
    def stored():
        row = AccessToken.objects.get(name="laptop")
        every_value = []
        with connection.cursor() as cursor:
            for model in installed_apps.get_models():
                cursor.execute(f"SELECT * FROM {model._meta.db_table}")
                every_value += [str(value) for found in cursor.fetchall() for value in found]
        connections = list(ConnectionIdentity.objects.values_list("principal__name", flat=True))
        return row, every_value, connections

    row, every_value, connections = await stored()
    assert row.digest == token_digest(token) and row.prefix == token[:12] and row.last_used_at is not None
    assert not any(token in value or token[4:] in value for value in every_value)  # nowhere in clear
    assert connections == ["alice"]


async def test_once_a_token_exists_an_upgrade_needs_a_valid_unrevoked_one(application, settings):
    assert await upgrade_status(application, []) == 101  # nothing configured: the local principal
    token = await issue_async("alice")
    other = await issue_async("alice", "old")
    await command("revoke_token", "alice", "old", stdout=io.StringIO())
    assert await upgrade_status(application, []) == 401
    assert await upgrade_status(application, bearer("cxs_" + "x" * 43)) == 401
    assert await upgrade_status(application, bearer(other)) == 401  # revoked
    assert await upgrade_status(application, [(b"authorization", token.encode())]) == 401  # no scheme
    assert await upgrade_status(application, [(b"authorization", f"bEaReR {token}".encode())]) == 101
    settings.CODEX_WS_AUTH_TOKEN = "shared-secret"  # still one token, of the local principal
    assert await upgrade_status(application, bearer("shared-secret")) == 101
    assert await upgrade_status(application, bearer(token)) == 101


async def test_revoking_the_last_token_does_not_open_the_server(application):
    token = await issue_async("alice", "only")
    await command("revoke_token", "alice", "only", stdout=io.StringIO())
    assert await upgrade_status(application, []) == 401
    assert await upgrade_status(application, bearer(token)) == 401


async def test_revocation_closes_the_live_connection_with_1008_within_5_seconds(as_principal, application):
    token = await issue_async("bob", "phone")
    keep = await issue_async("bob", "desktop")
    revoked, kept = await as_principal(token), await as_principal(keep)
    started = asyncio.get_running_loop().time()
    await command("revoke_token", "bob", "phone", stdout=io.StringIO())
    await revoked.close()  # stop its reader: the close is read below
    closed = await revoked.communicator.receive_output(timeout=5)
    assert closed == {"type": "websocket.close", "code": 1008}
    assert asyncio.get_running_loop().time() - started < 5
    assert (await kept.call("thread/list", {}))["data"] == []  # the principal's other token goes on
    assert await upgrade_status(application, bearer(token)) == 401


def test_issue_and_revoke_refuse_what_they_cannot_do():
    issue("alice", "laptop")
    with pytest.raises(Exception, match="already has a token named 'laptop'"):
        issue("alice", "laptop")
    with pytest.raises(Exception, match="has no token named 'tablet'"):
        call_command("revoke_token", "alice", "tablet")


# --- what a principal sees -------------------------------------------------------


def thread_methods(thread_id: str) -> list[tuple[str, dict]]:
    """Every thread method that names a thread, with params a client sends."""
    text = [{"type": "text", "text": "hi"}]
    return [
        ("thread/read", {"threadId": thread_id, "includeTurns": True}),
        ("thread/resume", {"threadId": thread_id}),
        ("thread/turns/list", {"threadId": thread_id}),
        ("thread/items/list", {"threadId": thread_id}),
        ("thread/readState/update", {"threadId": thread_id, "expectedRevision": "0", "operation": {"type": "read"}}),
        ("thread/goal/get", {"threadId": thread_id}),
        ("thread/backgroundTerminals/list", {"threadId": thread_id}),
        ("thread/unsubscribe", {"threadId": thread_id}),
        ("turn/start", {"threadId": thread_id, "input": text}),
        ("turn/interrupt", {"threadId": thread_id, "turnId": str(uuid.uuid4())}),
        ("thread/realtime/start", {"threadId": thread_id, "sdp": "v=0"}),
        ("thread/realtime/stop", {"threadId": thread_id}),
    ]


def without_id(response: dict) -> dict:
    return {key: value for key, value in response.items() if key != "id"}


async def test_another_principals_thread_answers_exactly_as_an_unknown_one(as_principal):
    alice_token, bob_token = await issue_async("alice"), await issue_async("bob")
    alice, bob = await as_principal(alice_token), await as_principal(bob_token, "codex_ios")
    ephemeral = await alice.start_thread(ephemeral=True)
    thread = await alice.start_thread()
    turn = await alice.call("turn/start", {"threadId": thread, "input": [{"type": "text", "text": "slow:10"}]})

    for alices in (thread, ephemeral):
        for (method, params), (_, made_up) in zip(thread_methods(alices), thread_methods(str(uuid.uuid4()))):
            if method == "turn/interrupt" and alices == thread:
                params = {**params, "turnId": turn["turn"]["id"]}  # the turn that really runs
            answered, unknown = await bob.request(method, params), await bob.request(method, made_up)
            assert without_id(answered) == without_id(unknown), method
            assert answered.get("error", {}).get("message") == "Invalid params: unknown threadId" or answered[
                "result"
            ] == {"status": "notLoaded"}, (method, answered)

    assert (await bob.call("thread/list", {}))["data"] == []
    assert (await bob.call("thread/loaded/list", {}))["data"] == []  # alice's is loaded on this very process
    assert {t["id"] for t in (await alice.call("thread/list", {}))["data"]} == {thread}
    assert thread in (await alice.call("thread/loaded/list", {}))["data"]
    await alice.notification("turn/completed", threadId=thread)
    assert not [m for m in bob.inbox if (m.get("params") or {}).get("threadId") in (thread, ephemeral)]


async def test_a_principals_other_token_sees_and_continues_its_threads(as_principal):
    desktop = await as_principal(await issue_async("alice", "desktop"))
    phone = await as_principal(await issue_async("alice", "phone"), "codex_ios")
    thread = await desktop.start_thread()
    await desktop.run_turn(thread, "from the desktop")
    assert [t["id"] for t in (await phone.call("thread/list", {}))["data"]] == [thread]
    await phone.call("thread/resume", {"threadId": thread})
    completed = await phone.run_turn(thread, "from the phone")
    assert completed["turn"]["status"] == "completed"
    # the desktop follows the thread, so it hears the phone's turn
    await desktop.notification("turn/completed", threadId=thread)


async def test_without_any_token_every_connection_is_the_local_principal(as_principal):
    first, second = await as_principal(None), await as_principal(None, "codex_ios")
    thread = await first.start_thread()
    assert [t["id"] for t in (await second.call("thread/list", {}))["data"]] == [thread]
    names = await database_sync_to_async(lambda: set(ConnectionIdentity.objects.values_list("principal__name", flat=True)))()
    assert names == {LOCAL_PRINCIPAL}


async def test_connections_let_in_without_a_token_close_once_the_first_token_is_issued(as_principal, settings):
    settings.CODEX_PRINCIPAL_CHECK_SECONDS = 0.2
    anonymous = await as_principal(None)
    await issue_async("alice")
    await anonymous.close()
    assert await anonymous.communicator.receive_output(timeout=5) == {"type": "websocket.close", "code": 1008}


async def test_a_token_of_the_wrong_shape_is_refused_without_the_database(application, settings):
    await issue_async("alice")
    assert await upgrade_status(application, bearer("not-a-token")) == 401  # the lookup teaches the gate

    @database_sync_to_async
    def break_the_token_table():
        with connection.cursor() as cursor:
            cursor.execute(f"ALTER TABLE {AccessToken._meta.db_table} RENAME TO broken_tokens")

    @database_sync_to_async
    def mend_it():
        with connection.cursor() as cursor:
            cursor.execute(f"ALTER TABLE broken_tokens RENAME TO {AccessToken._meta.db_table}")

    await break_the_token_table()
    try:  # a lookup would now fail (503); refused in memory, these are 401
        assert await upgrade_status(application, []) == 401
        assert await upgrade_status(application, bearer("x" * 5000)) == 401
        assert await upgrade_status(application, bearer("cxs_" + "x" * 43)) == 503  # our shape: looked up
    finally:
        await mend_it()


def test_issued_tokens_never_reach_the_log_whatever_carries_them():
    from codexserver.log_format import redact_secrets

    token = issue("alice")
    assert token not in redact_secrets(f"GET /healthz?token={token} and Bearer {token}")


# --- budgets -----------------------------------------------------------------------


async def test_the_turn_after_the_budget_is_reached_fails_and_a_running_one_finishes(as_principal, upstream):
    token = await issue_async("carol")
    await command("configure_principal", "carol", "--budget", "10", stdout=io.StringIO())
    client = await as_principal(token)
    slow_thread, thread = await client.start_thread(), await client.start_thread()
    running = await client.call("turn/start", {"threadId": slow_thread, "input": [{"type": "text", "text": "slow:15"}]})
    assert (await client.run_turn(thread, USAGE_14))["turn"]["status"] == "completed"  # 14 of 10 now used
    refused = await client.request("turn/start", {"threadId": thread, "input": [{"type": "text", "text": "more"}]})
    assert refused["error"]["data"] == {"codexErrorInfo": "usageLimitExceeded"}
    assert refused["error"]["message"] == "Usage limit reached: carol has used 14 of its 10-token budget"
    ended = await client.notification("turn/completed", threadId=slow_thread)
    assert ended["turn"]["id"] == running["turn"]["id"] and ended["turn"]["status"] == "completed"
    assert len(upstream.model_requests()) == 2  # the refused turn asked the model nothing


async def test_ephemeral_turns_count_toward_the_budget_too(as_principal):
    token = await issue_async("erin")
    await command("configure_principal", "erin", "--budget", "10", stdout=io.StringIO())
    client = await as_principal(token)
    ephemeral = await client.start_thread(ephemeral=True)
    assert (await client.run_turn(ephemeral, USAGE_14))["turn"]["status"] == "completed"
    for thread in (ephemeral, await client.start_thread(ephemeral=True), await client.start_thread()):
        refused = await client.request("turn/start", {"threadId": thread, "input": [{"type": "text", "text": "x"}]})
        assert refused["error"]["data"] == {"codexErrorInfo": "usageLimitExceeded"}


async def test_a_budget_set_while_connected_applies_within_the_check_interval(as_principal, settings):
    settings.CODEX_PRINCIPAL_CHECK_SECONDS = 0.2
    client = await as_principal(await issue_async("dave"))
    thread = await client.start_thread()
    await client.run_turn(thread, USAGE_14)
    await command("configure_principal", "dave", "--budget", "14", stdout=io.StringIO())
    await asyncio.sleep(0.6)
    refused = await client.request("turn/start", {"threadId": thread, "input": [{"type": "text", "text": "more"}]})
    assert refused["error"]["data"] == {"codexErrorInfo": "usageLimitExceeded"}
    await command("configure_principal", "dave", "--no-budget", stdout=io.StringIO())
    await asyncio.sleep(0.6)
    assert (await client.run_turn(thread, "hello"))["turn"]["status"] == "completed"


# --- serve ---------------------------------------------------------------------------


def test_serve_refuses_a_non_loopback_address_unless_a_token_is_configured_or_it_is_told(settings):
    for host in ("0.0.0.0", "::", "192.0.2.10", "codex.example"):
        refusal = refusal_to_listen(host, allow_unauthenticated=False)
        assert refusal and "issue_token" in refusal and "--allow-unauthenticated" in refusal
        assert refusal_to_listen(host, allow_unauthenticated=True) is None
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert refusal_to_listen(host, allow_unauthenticated=False) is None
    for rebinding in (["--bind", "0.0.0.0"], ["--bind=0.0.0.0"], ["-b0.0.0.0"], ["-e", "tcp:80"], ["--fd", "3"]):
        assert refusal_to_listen("127.0.0.1", False, rebinding), rebinding  # daphne's own options bind elsewhere
    assert refusal_to_listen("127.0.0.1", False, ["--proxy-headers"]) is None
    settings.CODEX_WS_AUTH_TOKEN = "shared-secret"
    assert refusal_to_listen("0.0.0.0", allow_unauthenticated=False) is None
    settings.CODEX_WS_AUTH_TOKEN = None
    issue("alice")
    assert refusal_to_listen("0.0.0.0", allow_unauthenticated=False) is None


# --- the migration ---------------------------------------------------------------------


def test_the_migration_gives_existing_rows_to_the_local_principal():
    before = [("identity", "0003_server_boot"), ("realtime", "0001_thread_store")]  # the release before principals
    executor = MigrationExecutor(connection)
    executor.migrate(before)
    old = executor.loader.project_state(before).apps
    from django.utils import timezone

    now = timezone.now()
    old.get_model("identity", "ConnectionIdentity").objects.create(
        connection_id=uuid.uuid4(), server_instance="old", connected_at=now
    )
    stored = old.get_model("realtime", "StoredThread").objects.create(
        thread_id="t-old", model="m", model_provider="openai", cwd="/", originator="codex_ios", created_at=now, updated_at=now
    )
    old.get_model("realtime", "StoredTurn").objects.create(
        turn_id="u-old", thread=stored, originator="codex_ios", connection_id=uuid.uuid4(), status="completed",
        started_at_ms=1, total_tokens=7,
    )  # fmt: skip
    executor = MigrationExecutor(connection)
    executor.migrate(executor.loader.graph.leaf_nodes())

    from realtime.models import StoredThread, StoredTurn

    local = Principal.objects.get(name=LOCAL_PRINCIPAL)
    assert local.tokens_used == 7
    assert ConnectionIdentity.objects.get().principal == local
    assert StoredThread.objects.get().principal == local and StoredTurn.objects.get().principal == local

"""Principals across two real ``serve`` processes sharing this machine's
PostgreSQL and Redis (PROTOCOL §12), and ``serve``'s refusal to listen
beyond loopback with nothing configured."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import uuid

import psycopg
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from codexserver.devtools.server_process import PROJECT_DIR, free_port
from tests.conftest import server_env
from tests.rpc_client import SocketClient
from tests.test_principals import thread_methods, without_id
from tests.test_scale_out import REDIS_URL, postgres_database  # noqa: F401 (a fixture)

pytestmark = pytest.mark.e2e


def manage(server, *args: str) -> str:
    """A management command against the server's database, as an operator runs it."""
    done = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=PROJECT_DIR, env=server.env, capture_output=True, text=True, check=True
    )
    return done.stdout


def issue(server, principal: str, name: str) -> str:
    return manage(server, "issue_token", principal, "--name", name).splitlines()[-1]


async def upgrade_status(server, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with ws_connect(server.ws_url, additional_headers=headers):
            return 101
    except InvalidStatus as refused:
        return refused.response.status_code


@contextlib.asynccontextmanager
async def client_of(server, token: str, name: str):
    async with ws_connect(server.ws_url, additional_headers={"Authorization": f"Bearer {token}"}) as websocket:
        client = SocketClient(websocket)
        await client.initialize(name, "1.0.0")
        yield client
        await client.close()


def every_stored_value(database_url: str) -> list[str]:
    with psycopg.connect(database_url) as db:
        tables = [row[0] for row in db.execute("select tablename from pg_tables where schemaname = 'public'")]
        return [str(value) for table in tables for row in db.execute(f'select * from "{table}"') for value in row]


async def test_each_principal_sees_only_its_own_on_every_process_and_revocation_closes_within_5_s(
    postgres_database, daphne_server, upstream  # noqa: F811
):
    one = daphne_server(postgres_database, REDIS_URL=REDIS_URL, CODEX_SERVER_INSTANCE="one")
    two = daphne_server(postgres_database, REDIS_URL=REDIS_URL, CODEX_SERVER_INSTANCE="two")
    desktop_token, phone_token = issue(one, "alice", "desktop"), issue(one, "alice", "phone")
    bob_token = issue(two, "bob", "laptop")

    for server in (one, two):
        assert await upgrade_status(server, None) == 401
        assert await upgrade_status(server, "cxs_" + "x" * 43) == 401

    async with (
        client_of(one, desktop_token, "codex_vscode") as desktop,
        client_of(two, bob_token, "codex_ios") as bob,
        client_of(two, phone_token, "codex_ios") as phone,
    ):
        thread = await desktop.start_thread()
        assert (await desktop.run_turn(thread, "alice's plans"))["turn"]["status"] == "completed"

        # bob, on the other process, cannot tell alice's thread from a made-up id, by any method
        assert (await bob.call("thread/list", {}))["data"] == []
        for (method, params), (_, made_up) in zip(thread_methods(thread), thread_methods(str(uuid.uuid4()))):
            assert without_id(await bob.request(method, params)) == without_id(await bob.request(method, made_up)), method

        # alice's phone, on that process too, lists, resumes and continues it; the desktop hears it live
        assert [t["id"] for t in (await phone.call("thread/list", {}))["data"]] == [thread]
        await phone.call("thread/resume", {"threadId": thread})
        assert (await phone.run_turn(thread, "and from the phone"))["turn"]["status"] == "completed"
        await desktop.notification("turn/completed", threadId=thread)
        assert not [m for m in bob.inbox if (m.get("params") or {}).get("threadId") == thread]

        # bob's token is revoked by an operator: his socket closes on process two within 5 s
        loop = asyncio.get_running_loop()
        revoked_at = loop.time()
        manage(one, "revoke_token", "bob", "laptop")
        async with asyncio.timeout(5):
            await bob.websocket.wait_closed()
        assert loop.time() - revoked_at < 5
        assert bob.websocket.close_code == 1008
        assert (await phone.call("thread/list", {}))["data"]  # alice's connections go on

    for server in (one, two):
        assert await upgrade_status(server, bob_token) == 401
        assert await upgrade_status(server, phone_token) == 101
    stored = every_stored_value(postgres_database)
    assert not any(token in value for token in (desktop_token, phone_token, bob_token) for value in stored)


def test_serve_refuses_to_listen_beyond_loopback_with_no_token_configured(upstream, tmp_path):
    env = server_env(upstream, f"sqlite:///{tmp_path / 'fresh.sqlite3'}")
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v0"], cwd=PROJECT_DIR, env=env, check=True)
    refused = subprocess.run(
        [sys.executable, "manage.py", "serve", "--host", "0.0.0.0", "--port", str(free_port())],
        cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode != 0
    assert "refusing to listen on 0.0.0.0" in refused.stderr and "--allow-unauthenticated" in refused.stderr

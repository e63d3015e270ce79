"""The scale-out path on the machine's real PostgreSQL and Redis: never skipped.

Each test gets a fresh PostgreSQL database; an unreachable service fails the
test loudly. Set CODEX_TEST_POSTGRES_URL / CODEX_TEST_REDIS_URL to point
elsewhere.
"""

import asyncio
import os
import signal
import uuid

import psycopg
import pytest
from websockets.asyncio.client import connect as ws_connect

from tests.rpc_client import SocketClient

pytestmark = pytest.mark.e2e

POSTGRES_URL = os.environ.get("CODEX_TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("CODEX_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def postgres_database():
    name = f"codexserver_e2e_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = POSTGRES_URL.rsplit("/", 1)[0] + "/" + name
    yield url
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def rows(database_url: str) -> list[dict]:
    with psycopg.connect(database_url) as db, db.cursor(row_factory=psycopg.rows.dict_row) as cursor:
        cursor.execute("select * from identity_connectionidentity order by connected_at")
        return cursor.fetchall()


async def run_client(server, name: str, version: str = "1.0.0") -> str:
    async with ws_connect(server.ws_url) as websocket:
        client = SocketClient(websocket)
        await client.initialize(name, version)
        thread = await client.start_thread()
        assert (await client.run_turn(thread, "slow:3"))["turn"]["status"] == "completed"
        return thread


async def test_two_daphne_processes_on_postgres_and_redis_attribute_every_request(
    daphne_server, postgres_database, upstream
):
    first = daphne_server(postgres_database, REDIS_URL=REDIS_URL, CODEX_SERVER_INSTANCE="node-a")
    second = daphne_server(postgres_database, REDIS_URL=REDIS_URL, CODEX_SERVER_INSTANCE="node-b")
    plan = [(first, "codex-backend"), (second, "codex_ios"), (first, "codex_vscode"), (second, "codex_app_server_daemon")]
    threads = await asyncio.gather(*(run_client(server, name) for server, name in plan))

    by_thread = {r.headers["session-id"]: r for r in upstream.model_requests()}
    for (server, name), thread in zip(plan, threads):
        expected = "codex_cli_rs" if name in ("codex-backend", "codex_app_server_daemon") else name
        assert by_thread[thread].originator == expected
        assert by_thread[thread].user_agent.endswith(f"({name}; 1.0.0)")

    await asyncio.sleep(0.3)  # disconnect rows are written as the sockets close
    stored = rows(postgres_database)
    assert len(stored) == 4
    assert {(r["client_name"], r["server_instance"]) for r in stored} == {
        ("codex-backend", "node-a"),
        ("codex_vscode", "node-a"),
        ("codex_ios", "node-b"),
        ("codex_app_server_daemon", "node-b"),
    }
    assert all(r["disconnected_at"] is not None for r in stored)


FAST_HEARTBEAT = {"CODEX_HEARTBEAT_INTERVAL": "0.3", "CODEX_HEARTBEAT_TIMEOUT": "2"}


async def wait_for_rows(database_url: str, predicate, timeout: float = 8.0) -> list[dict]:
    async with asyncio.timeout(timeout):
        while not predicate(stored := rows(database_url)):
            await asyncio.sleep(0.2)
    return stored


async def test_a_killed_instance_has_its_rows_closed_once_its_heartbeat_stops(daphne_server, postgres_database):
    server = daphne_server(postgres_database, REDIS_URL=REDIS_URL, CODEX_SERVER_INSTANCE="node-k", **FAST_HEARTBEAT)
    async with ws_connect(server.ws_url) as websocket:
        await SocketClient(websocket).initialize("codex_ios", "1")
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(10)
    [orphan] = rows(postgres_database)
    assert orphan["disconnected_at"] is None

    restarted = daphne_server(postgres_database, REDIS_URL=REDIS_URL, CODEX_SERVER_INSTANCE="node-k", **FAST_HEARTBEAT)
    async with ws_connect(restarted.ws_url) as websocket:
        await SocketClient(websocket).initialize("codex_vscode", "1")
        by_name = lambda stored: {r["client_name"]: r for r in stored}  # noqa: E731
        stored = await wait_for_rows(postgres_database, lambda s: by_name(s)["codex_ios"]["disconnected_at"] is not None)
        assert by_name(stored)["codex_vscode"]["disconnected_at"] is None


async def test_two_live_processes_sharing_an_instance_name_never_close_each_others_rows(
    daphne_server, postgres_database
):
    first = daphne_server(postgres_database, CODEX_SERVER_INSTANCE="shared", **FAST_HEARTBEAT)
    second = daphne_server(postgres_database, CODEX_SERVER_INSTANCE="shared", **FAST_HEARTBEAT)
    async with ws_connect(first.ws_url) as a, ws_connect(second.ws_url) as b:
        await SocketClient(a).initialize("codex_on_first", "1")
        await SocketClient(b).initialize("codex_on_second", "1")
        # A third process of that name starts, and the second stops gracefully.
        third = daphne_server(postgres_database, CODEX_SERVER_INSTANCE="shared", **FAST_HEARTBEAT)
        async with ws_connect(third.ws_url) as c:
            await SocketClient(c).initialize("codex_on_third", "1")
            second.stop()
            await asyncio.sleep(3)  # past the heartbeat timeout
            by_name = {r["client_name"]: r for r in rows(postgres_database)}
            assert by_name["codex_on_first"]["disconnected_at"] is None
            assert by_name["codex_on_third"]["disconnected_at"] is None
            assert by_name["codex_on_second"]["disconnected_at"] is not None  # closed by its own stop
            # kill -9 the first: its row closes within the heartbeat window, the third's stays open.
            first.process.send_signal(signal.SIGKILL)
            first.process.wait(10)
            stored = await wait_for_rows(
                postgres_database,
                lambda s: {r["client_name"]: r for r in s}["codex_on_first"]["disconnected_at"] is not None,
            )
            assert {r["client_name"]: r for r in stored}["codex_on_third"]["disconnected_at"] is None


async def test_killing_one_process_mid_turn_leaves_the_other_serving_and_loses_no_row(
    daphne_server, postgres_database, upstream
):
    doomed = daphne_server(postgres_database, REDIS_URL=REDIS_URL, CODEX_SERVER_INSTANCE="node-x", **FAST_HEARTBEAT)
    survivor = daphne_server(postgres_database, REDIS_URL=REDIS_URL, CODEX_SERVER_INSTANCE="node-y", **FAST_HEARTBEAT)
    async with ws_connect(doomed.ws_url) as doomed_ws, ws_connect(survivor.ws_url) as survivor_ws:
        victim, steady = SocketClient(doomed_ws), SocketClient(survivor_ws)
        await victim.initialize("codex_ios", "1.0.0")
        await steady.initialize("codex_vscode", "1.0.0")
        victim_thread, steady_thread = await victim.start_thread(), await steady.start_thread()
        await victim.call("turn/start", {"threadId": victim_thread, "input": [{"type": "text", "text": "slow:50"}]})
        steady_turn = asyncio.create_task(steady.run_turn(steady_thread, "slow:20"))
        await victim.notification("item/agentMessage/delta", threadId=victim_thread)
        doomed.process.send_signal(signal.SIGKILL)
        doomed.process.wait(10)
        assert (await steady_turn)["turn"]["status"] == "completed"
        assert (await steady.run_turn(steady_thread))["turn"]["status"] == "completed"

        restarted = daphne_server(postgres_database, REDIS_URL=REDIS_URL, CODEX_SERVER_INSTANCE="node-x", **FAST_HEARTBEAT)
        async with ws_connect(restarted.ws_url) as again_ws:
            await SocketClient(again_ws).initialize("codex_android", "1.0.0")
            ios_closed = lambda s: {r["client_name"]: r for r in s}["codex_ios"]["disconnected_at"] is not None  # noqa: E731
            stored = await wait_for_rows(postgres_database, ios_closed)
    assert len(stored) == 3 and len({r["connection_id"] for r in stored}) == 3
    by_name = {r["client_name"]: r for r in stored}
    assert by_name["codex_ios"]["disconnected_at"] is not None  # closed by the restart
    assert by_name["codex_vscode"]["disconnected_at"] is None  # still connected at that moment
    assert by_name["codex_android"]["server_instance"] == "node-x"
    owners = {r.headers["session-id"]: r.originator for r in upstream.model_requests()}
    assert owners[victim_thread] == "codex_ios" and owners[steady_thread] == "codex_vscode"


async def test_idle_connections_on_the_redis_layer_stay_open_and_answer(daphne_server, postgres_database):
    """redis-py gives connections a read timeout shorter than channels_redis's
    blocking pop; no such timeout may ever reach a consumer (PROTOCOL §2)."""
    first = daphne_server(postgres_database, REDIS_URL=REDIS_URL, CODEX_SERVER_INSTANCE="idle-a")
    second = daphne_server(postgres_database, REDIS_URL=REDIS_URL, CODEX_SERVER_INSTANCE="idle-b")
    async with (
        ws_connect(first.ws_url) as a,
        ws_connect(first.ws_url) as b,
        ws_connect(second.ws_url) as c,
    ):
        clients = [SocketClient(a), SocketClient(b), SocketClient(c)]
        for index, client in enumerate(clients):
            await client.initialize(f"codex_idle_{index}", "1.0.0")
        await asyncio.sleep(15)
        for client in clients:
            assert (await client.call("app/list", {}))["data"] is not None
    await asyncio.sleep(0.3)
    assert all(r["disconnected_at"] is not None for r in rows(postgres_database))


async def test_a_forged_x_forwarded_for_never_fails_the_upgrade_on_postgres(daphne_server, postgres_database):
    """Under --proxy-headers daphne takes the client-writable first address of
    X-Forwarded-For; one that is not an IP address is dropped, not a 500."""
    server = daphne_server(postgres_database, daphne_args=("--proxy-headers",))
    for forwarded in ("x", "203.0.113.9", "not an address, 198.51.100.1"):
        async with ws_connect(server.ws_url, additional_headers={"X-Forwarded-For": forwarded}) as websocket:
            await SocketClient(websocket).initialize("codex_ios", "1.0.0")
    stored = [r["remote_addr"] and str(r["remote_addr"]) for r in rows(postgres_database)]
    assert stored == [None, "203.0.113.9", None]


CHURN_CLIENTS = 1000


async def test_a_thousand_clients_connecting_and_dropping_at_once_lose_no_row_and_are_never_refused(
    daphne_server, postgres_database
):
    server = daphne_server(postgres_database, REDIS_URL=REDIS_URL)
    refused: list[BaseException] = []

    async def connect_and_drop(index: int) -> None:
        try:
            async with ws_connect(server.ws_url, open_timeout=30) as websocket:
                await websocket.send('{"id": 1, "method": "initialize", "params": {"clientInfo": {"name": "churn_%d", "version": "1"}}}' % index)
                await websocket.recv()
        except Exception as exc:  # an upgrade refused or timed out
            refused.append(exc)

    await asyncio.gather(*(connect_and_drop(index) for index in range(CHURN_CLIENTS)))
    why = [line for line in server.log().splitlines() if "refus" in line or "unavailable" in line][:5]
    assert refused == [], f"{len(refused)} refused, e.g. {refused[0]!r}; the server said {why}"
    stored = await wait_for_rows(
        postgres_database, lambda s: len(s) == CHURN_CLIENTS and all(r["disconnected_at"] for r in s), timeout=60
    )
    assert len({r["connection_id"] for r in stored}) == CHURN_CLIENTS


async def test_three_hundred_clients_starting_threads_at_once_on_redis_all_get_their_thread(
    daphne_server, postgres_database
):
    # Each new thread joins its channel-layer group: without a bound on those
    # calls in flight, redis-py's pool (100) refused the rest with -32603.
    server = daphne_server(postgres_database, REDIS_URL=REDIS_URL)

    async def start_a_thread(index: int) -> dict:
        async with ws_connect(server.ws_url, open_timeout=30) as websocket:
            client = SocketClient(websocket)
            await client.initialize(f"burst_{index}", "1.0.0")
            return await client.request("thread/start", {}, timeout=30)

    answers = await asyncio.gather(*(start_a_thread(index) for index in range(300)))
    failed = [answer for answer in answers if "error" in answer]
    assert failed == [], f"{len(failed)} of 300 thread/starts failed, e.g. {failed[0]}"
    server.stop()  # right after 300 disconnects: nothing of theirs may outlive the loop
    assert "Task was destroyed" not in server.log()

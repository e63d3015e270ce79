"""Hostile input, vanishing clients and load: nothing crashes, nothing leaks, nothing is misattributed."""

import asyncio
import json
import string

import pytest
from channels.db import database_sync_to_async
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect as ws_connect

from codexserver.devtools.hostile_frames import fuzz_server, is_valid_reply
from codexserver.devtools.rpc_client import SocketClient
from identity.client_identity import ClientIdentity, InvalidClientInfo
from identity.models import ConnectionIdentity
from identity.principals import AuthenticatedPrincipal
from realtime.rpc.connection import AppServerConnection
from realtime.rpc.protocol import JsonRpcError, parse_message
from realtime.transport.outbox import Outbox

# For connections these tests drive by hand, without an upgrade: nothing they
# do reaches a principal's rows.
NO_DATABASE_PRINCIPAL = AuthenticatedPrincipal(id=0, name="local", token_id=None, token_budget=None, workspace_roots=())

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@given(st.text())
def test_any_text_parses_to_a_message_or_a_json_rpc_error(frame):
    try:
        parse_message(frame)
    except JsonRpcError as error:
        assert error.code in (-32700, -32600)


@given(st.dictionaries(st.sampled_from(["id", "method", "params", "result", "error", "jsonrpc"]), json_values))
def test_any_json_object_parses_to_a_message_or_a_json_rpc_error(obj):
    try:
        parse_message(json.dumps(obj))
    except JsonRpcError as error:
        assert error.code in (-32700, -32600)


@given(st.text(max_size=300), st.text(max_size=300))
def test_identity_validation_accepts_only_what_is_safe_on_the_wire(name, version):
    try:
        identity = ClientIdentity.from_client_info(name, version)
    except InvalidClientInfo as error:
        assert error.field in ("name", "version")
        return
    visible = set(string.printable) - set("\t\n\r\x0b\x0c")
    assert set(identity.user_agent) <= visible and set(identity.originator) <= visible
    assert identity.user_agent.endswith(f"({name}; {version})")


class _RecordingConsumer:
    """Stands in for the transport: collects what the connection sends."""

    def __init__(self):
        self.sent: list[str] = []

    async def send_text(self, text: str) -> None:
        self.sent.append(text)


@hypothesis_settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.one_of(
            st.text(max_size=200),
            st.builds(
                lambda i, m, p: json.dumps({"id": i, "method": m, "params": p}),
                json_values,
                st.sampled_from(["initialize", "thread/start", "turn/start", "turn/interrupt", "app/list", "x"]),
                json_values,
            ),
        ),
        max_size=8,
    )
)
def test_any_frames_get_valid_json_rpc_replies_and_never_an_exception(frames):
    async def run():
        transport = _RecordingConsumer()
        outbox = Outbox(transport.send_text, on_overflow=lambda: None)
        connection = AppServerConnection(__import__("uuid").uuid4(), outbox, {}, NO_DATABASE_PRINCIPAL)
        writer = asyncio.create_task(outbox.run())
        for frame in frames:
            await connection.handle_frame(frame)
        await asyncio.sleep(0.01)
        await connection.close()
        writer.cancel()
        return transport.sent

    for raw in asyncio.run(run()):
        assert is_valid_reply(json.loads(raw)), raw


@pytest.mark.e2e
async def test_a_real_server_survives_5000_hostile_frames(daphne_server):
    server = daphne_server(CODEX_LOG_LEVEL="ERROR")
    report = await fuzz_server(server.ws_url, frames=5000, connections=6, seed=7)
    assert report.frames_sent == 5000
    assert report.invalid_replies == []
    assert report.replies > 4000
    assert report.server_closes[1007] > 0  # invalid UTF-8 text frames closed their connection
    assert server.process.poll() is None
    async with ws_connect(server.ws_url) as websocket:
        client = SocketClient(websocket)
        await client.initialize("after_fuzz", "1")
        assert (await client.run_turn(await client.start_thread()))["turn"]["status"] == "completed"


@pytest.mark.django_db(transaction=True)
async def test_a_thousand_mid_turn_disconnects_leak_no_task_and_close_every_stream(connect, upstream):
    baseline = len(asyncio.all_tasks())

    async def cycle(index: int) -> None:
        client = await connect()
        await client.initialize(f"vanishing_{index % 7}", "1")
        thread = await client.start_thread()
        await client.call("turn/start", {"threadId": thread, "input": [{"type": "text", "text": "slow:100"}]})
        await client.notification("item/agentMessage/delta", threadId=thread)
        await client.close()
        await client.communicator.disconnect()

    for start in range(0, 1000, 25):
        await asyncio.gather(*(cycle(i) for i in range(start, start + 25)))
    await upstream.await_for(lambda rs: sum(r.kind == "closed" for r in rs) >= 1000, timeout=10)
    await asyncio.sleep(0.2)
    from realtime.fanout.thread_hub import thread_hub

    # The process's heartbeat, principal watch and session sweep run for
    # good, and the telemetry flusher may be mid-interval; with Redis, so do
    # the process's thread receiver, publisher and group refresher.
    assert len(asyncio.all_tasks()) <= baseline + 4 + len(thread_hub().tasks)
    open_rows = await database_sync_to_async(ConnectionIdentity.objects.filter(disconnected_at__isnull=True).count)()
    assert open_rows == 0
    assert await database_sync_to_async(ConnectionIdentity.objects.count)() == 1000


@pytest.mark.e2e
async def test_two_hundred_concurrent_identities_on_one_process_zero_misattributed(daphne_server, upstream):
    from codexserver.devtools.attribution_load import (
        LoadReport,
        close_clients,
        count_misattributed,
        open_clients,
        run_turns,
    )

    server = daphne_server(CODEX_LOG_LEVEL="WARNING")
    clients = await open_clients(server.ws_url, 200)
    report = LoadReport(connections=200)
    owners = await run_turns(clients, "slow:3", report)
    await close_clients(clients)
    assert report.completed == report.turns == 200
    assert report.server_errors == 0
    assert len(upstream.model_requests()) == 200
    assert count_misattributed(upstream, owners) == 0


@pytest.mark.e2e
async def test_the_api_key_and_auth_token_appear_nowhere(daphne_server, tmp_path):
    import re
    import subprocess
    import sys

    import httpx

    from codexserver.devtools.server_process import PROJECT_DIR
    from tests.conftest import TEST_API_KEY

    token = "ws-token-5f1d2c3b4a"
    server = daphne_server(CODEX_WS_AUTH_TOKEN=token)
    seen: list[str] = []
    async with ws_connect(server.ws_url, additional_headers={"Authorization": f"Bearer {token}"}) as websocket:
        client = SocketClient(websocket)
        seen.append(json.dumps(await client.initialize("codex_ios", "1")))
        thread = await client.start_thread()
        for text in ("fail:401", "fail:400", "fail:500", "hello"):
            seen.append(json.dumps(await client.run_turn(thread, text)))
        seen.append(json.dumps(await client.request("thread/realtime/start", {"threadId": thread, "sdp": "v=0"})))
        seen += [json.dumps(m) for m in client.inbox]

    subprocess.run(
        [sys.executable, "manage.py", "createsuperuser", "--noinput", "--username", "op", "--email", "op@x.example"],
        cwd=PROJECT_DIR, env={**server.env, "DJANGO_SUPERUSER_PASSWORD": "pw-for-tests-123"}, check=True,
    )
    async with httpx.AsyncClient(base_url=server.http_url, follow_redirects=True) as http:
        login = await http.get("/admin/login/")
        csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', login.text).group(1)
        await http.post("/admin/login/", data={"csrfmiddlewaretoken": csrf, "username": "op", "password": "pw-for-tests-123", "next": "/admin/"})
        changelist = await http.get("/admin/identity/connectionidentity/?state=all")
        assert "codex_ios" in changelist.text
        detail_url = re.search(r'href="(/admin/identity/connectionidentity/\d+/change/)[^"]*"', changelist.text).group(1)
        seen += [changelist.text, (await http.get(detail_url)).text]

    seen.append(server.log())
    seen.append((tmp_path / "server.sqlite3").read_bytes().decode("latin-1"))
    for text in seen:
        assert TEST_API_KEY not in text
        assert token not in text


def test_frames_that_arrive_after_the_connection_closed_start_nothing():
    async def run():
        transport = _RecordingConsumer()
        outbox = Outbox(transport.send_text, on_overflow=lambda: None)
        connection = AppServerConnection(__import__("uuid").uuid4(), outbox, {}, NO_DATABASE_PRINCIPAL)
        connection.adopt_identity(ClientIdentity.from_client_info("codex_ios", "1.4.0"), frozenset())
        await connection.close()  # as the server's shutdown closes it while its socket is still open
        await connection.handle_frame(json.dumps({"id": 2, "method": "thread/start", "params": {}}))
        started = list(connection._tasks)
        for task in started:
            task.cancel()
        return started

    assert asyncio.run(run()) == []  # nothing that a later close would have to cancel


@pytest.mark.e2e
async def test_an_interrupt_from_a_client_that_stopped_reading_mid_stream_is_honoured(daphne_server, upstream):
    # Issue 24, 8: the reply {} came, yet the turn streamed on to its end (and billed) as completed.
    server = daphne_server()
    async with ws_connect(server.ws_url, max_queue=1, max_size=None) as websocket:
        client = SocketClient(websocket)
        await client.initialize("slow_reader", "1")
        thread = await client.start_thread()
        turn = (await client.call("turn/start", {"threadId": thread, "input": [{"type": "text", "text": "flood:100000:64"}]}))["turn"]
        websocket.transport.pause_reading()  # the client stops reading the stream
        await asyncio.sleep(4)
        await websocket.send(json.dumps({"id": "stop", "method": "turn/interrupt", "params": {"threadId": thread, "turnId": turn["id"]}}))
        await asyncio.sleep(1)
        websocket.transport.resume_reading()
        completed = await client.notification("turn/completed", threadId=thread, timeout=30)
        assert completed["turn"]["status"] == "interrupted"
    streamed = [r for r in upstream.records if r.kind == "closed" and r.path.endswith("/responses")]
    assert streamed  # the upstream stream was closed, not read to its end

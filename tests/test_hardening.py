"""Hostile input, vanishing clients and load: nothing crashes, nothing leaks, nothing is misattributed."""

import asyncio
import json
import string

import pytest
from channels.db import database_sync_to_async
from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st
from websockets.asyncio.client import connect as ws_connect

from codexserver.devtools.hostile_frames import fuzz_server, is_valid_reply
from codexserver.devtools.rpc_client import SocketClient
from identity.client_identity import ClientIdentity, InvalidClientInfo
from identity.models import ConnectionIdentity
from realtime.connection import AppServerConnection
from realtime.outbox import Outbox
from realtime.protocol import JsonRpcError, parse_message

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
        connection = AppServerConnection(__import__("uuid").uuid4(), outbox, {})
        writer = asyncio.create_task(outbox.run())
        for frame in frames:
            await connection.handle_frame(frame)
        await asyncio.sleep(0.01)
        await connection.close()
        writer.cancel()
        return transport.sent

    for raw in asyncio.run(run()):
        assert is_valid_reply(json.loads(raw)), raw


pytestmark_e2e = pytest.mark.e2e


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
    assert len(asyncio.all_tasks()) <= baseline + 2  # the telemetry flusher may be mid-interval
    open_rows = await database_sync_to_async(ConnectionIdentity.objects.filter(disconnected_at__isnull=True).count)()
    assert open_rows == 0
    assert await database_sync_to_async(ConnectionIdentity.objects.count)() == 1000

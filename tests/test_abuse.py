"""One client cannot hurt the others (issue 26): what a hostile client sends
is refused with a clear error, never costs the process its stack or its log's
truth, and never reaches another client's view of the server."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import httpx
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from codexserver.log_format import IdentityLogFilter, RedactingFormatter
from realtime.rpc import handlers
from realtime.rpc.connection import MAX_REFUSED_INITIALIZES
from realtime.rpc.protocol import MAX_JSON_DEPTH
from realtime.transport.connection_limits import COOL_OFF_SECONDS
from tests.conftest import TEST_API_KEY

pytestmark = pytest.mark.django_db(transaction=True)


def nested(depth: int) -> dict:
    """An object ``depth`` levels deep."""
    value: dict = {}
    for _ in range(depth):
        value = {"deeper": value}
    return value


async def test_deep_nesting_is_invalid_params_and_the_connection_goes_on(connect):
    client = await connect()
    await client.initialize("codex_ios", "1.4.0")
    # 400 levels made the storable-text walk overflow the stack (-32603 and a traceback per frame).
    for depth in (MAX_JSON_DEPTH + 1, 400):
        error = (await client.request("thread/start", {"config": nested(depth)}))["error"]
        assert error["code"] == -32602 and f"nested deeper than {MAX_JSON_DEPTH} levels" in error["message"]
    # Deeper than the JSON decoder itself goes: a parse error.
    await client.send_raw('{"id": 9, "method": "thread/start", "params": ' + '{"a": ' * 5_000 + "{}" + "}" * 5_000 + "}")
    error = await client.wait_for(lambda m: m.get("error", {}).get("code") == -32700)
    assert "nesting too deep" in error["error"]["message"]
    assert (await client.request("model/list", {}))["result"]["data"]


async def test_a_client_refused_initialize_again_and_again_is_closed(connect):
    client = await connect()
    deep = {"clientInfo": {"name": "codex_ios", "version": "1"}, "capabilities": nested(400)}
    for _ in range(MAX_REFUSED_INITIALIZES):
        await client.send({"id": 1, "method": "initialize", "params": deep})
    closed = await client.communicator.receive_output(timeout=5)
    while closed["type"] != "websocket.close":
        closed = await client.communicator.receive_output(timeout=5)
    assert closed["code"] == 1008


@pytest.mark.e2e
async def test_a_peer_closed_for_never_initializing_is_refused_for_a_moment(daphne_server):
    """Reconnecting in a loop to retry a refused initialize cost an upgrade
    and two row writes each time: that peer waits COOL_OFF_SECONDS first."""
    server = daphne_server()
    deep = {"clientInfo": {"name": "codex_ios", "version": "1"}, "capabilities": nested(400)}
    async with ws_connect(server.ws_url) as socket:
        for _ in range(MAX_REFUSED_INITIALIZES):
            await socket.send(json.dumps({"id": 1, "method": "initialize", "params": deep}))
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await socket.recv()
        assert closed.value.rcvd.code == 1008
    with pytest.raises(InvalidStatus) as refused:
        async with ws_connect(server.ws_url):
            pass
    assert refused.value.response.status_code == 429
    await asyncio.sleep(COOL_OFF_SECONDS)
    async with ws_connect(server.ws_url) as again:
        await again.send(json.dumps({"id": 1, "method": "initialize", "params": {"clientInfo": {"name": "a", "version": "1"}}}))
        assert "result" in json.loads(await again.recv())


@pytest.mark.parametrize("model", ["gpt\n2026-12-06 10:00:00 INFO forged line", "gpt\x1b[31m", "g" * 257])
async def test_a_model_name_with_control_characters_or_past_its_column_is_refused(connect, model):
    client = await connect()
    await client.initialize("codex_ios", "1.4.0")
    error = (await client.request("thread/start", {"model": model}))["error"]
    assert error["code"] == -32602 and "model" in error["message"]
    thread = await client.start_thread()
    error = (await client.request("turn/start", {"threadId": thread, "model": model, "input": [{"type": "text", "text": "hi"}]}))["error"]
    assert error["code"] == -32602


def test_no_logged_value_can_forge_a_line_of_its_own():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(RedactingFormatter("%(levelname)s [conn=%(connection_id)s] %(message)s"))
    handler.addFilter(IdentityLogFilter())
    logger = logging.getLogger("tests.forging")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("upstream said %s", "unknown model gpt\n2026-12-06 INFO [conn=x] forged\x1b[2J\u2028")
        try:
            raise ValueError("bad model\nINFO [conn=y] forged too")
        except ValueError:
            logger.exception("turn failed")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "WARNING [conn=-] upstream said unknown model gpt\\n2026-12-06 INFO [conn=x] forged\\x1b[2J\\u2028"
    assert lines[1] == "ERROR [conn=-] turn failed"
    assert all(line.startswith("  | ") for line in lines[2:]) and lines[-1] == "  | INFO [conn=y] forged too"


async def test_a_failed_request_is_logged_as_its_connections(connect, monkeypatch):
    async def broken(context, params):
        raise RuntimeError("listing broke")

    monkeypatch.setitem(handlers.HANDLERS, "model/list", broken)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(RedactingFormatter("%(originator)s %(message)s"))
    handler.addFilter(IdentityLogFilter())
    logging.getLogger("realtime.rpc.connection").addHandler(handler)
    try:
        client = await connect()
        await client.initialize("codex_ios", "1.4.0")
        assert (await client.request("model/list", {}))["error"]["code"] == -32603
    finally:
        logging.getLogger("realtime.rpc.connection").removeHandler(handler)
    assert stream.getvalue().startswith("codex_ios request model/list failed")


@pytest.mark.e2e
async def test_an_upgrade_elsewhere_is_404_and_the_access_log_keeps_no_secret(daphne_server):
    server = daphne_server(daphne_args=("--access-log", "-"))
    with pytest.raises(InvalidStatus) as refused:
        async with ws_connect(f"ws://127.0.0.1:{server.port}/elsewhere"):
            pass
    assert refused.value.response.status_code == 404
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
        await http.get(f"/healthz?api_key={TEST_API_KEY}")
        await http.get("/nowhere%0a127.0.0.1%20-%20-%20[forged]")  # daphne logs the path unquoted
    async with ws_connect(server.ws_url) as websocket:  # the server is well and answers
        await websocket.send(json.dumps({"id": 1, "method": "initialize", "params": {"clientInfo": {"name": "a", "version": "1"}}}))
        assert "result" in json.loads(await websocket.recv())
        await websocket.close()
    with pytest.raises(ConnectionClosed):
        await websocket.recv()
    log = server.log()
    assert TEST_API_KEY not in log and "[redacted]" in log
    assert "\n127.0.0.1 - - [forged]" not in log and "\\n127.0.0.1 - - [forged]" in log
    assert "ERROR" not in log and "Traceback" not in log


@pytest.mark.parametrize("params, field", [({"cwd": "/" + "d" * 5000}, "cwd"), ({"baseInstructions": "b" * 300_000}, "baseInstructions")])
async def test_what_a_thread_stores_of_the_client_is_bounded(connect, params, field):
    client = await connect()
    await client.initialize("codex_ios", "1.4.0")
    error = (await client.request("thread/start", params))["error"]
    assert error["code"] == -32602 and error["message"].startswith(f"Invalid params: {field} must be at most")


async def test_pipelined_interrupts_are_all_answered_but_run_a_few_at_a_time(connect, monkeypatch):
    from realtime.rpc import connection as rpc_connection
    from realtime.rpc.handlers import INTERRUPT

    running, most = 0, 0
    interrupt = handlers.HANDLERS[INTERRUPT]

    async def counted(context, params):
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            await asyncio.sleep(0.01)
            return await interrupt(context, params)
        finally:
            running -= 1

    monkeypatch.setitem(handlers.HANDLERS, INTERRUPT, counted)
    client = await connect()
    await client.initialize("codex_ios", "1.4.0")
    thread = await client.start_thread()
    for index in range(200):
        await client.send({"id": f"i{index}", "method": INTERRUPT, "params": {"threadId": thread, "turnId": "none"}})
    for index in range(200):  # each answered (an error: no such turn), none refused as overloaded
        reply = await client.wait_for(lambda m, wanted=f"i{index}": m.get("id") == wanted, timeout=10)
        assert reply.get("error", {}).get("code") != -32001
    assert most <= rpc_connection.MAX_INTERRUPTS_IN_FLIGHT + 1  # (and one read inline)
    # Another request still gets through.
    assert (await client.request("model/list", {}))["result"]["data"]


async def test_an_originators_filter_is_bounded(connect):
    client = await connect()
    await client.initialize("codex_ios", "1.4.0")
    error = (await client.request("thread/list", {"originators": [f"o{index}" for index in range(101)]}))["error"]
    assert error["code"] == -32602 and "at most 100 names" in error["message"]
    assert "result" in await client.request("thread/list", {"originators": ["codex_ios"] * 100})


@pytest.mark.e2e
async def test_a_request_head_trickled_a_byte_at_a_time_is_cut_off(daphne_server):
    server = daphne_server(CODEX_REQUEST_HEAD_SECONDS="1")
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    loop = asyncio.get_running_loop()
    started = loop.time()
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
    closed = False
    for _ in range(8):  # a header byte every half second: never idle, never done
        await asyncio.sleep(0.5)
        try:
            writer.write(b"X")
            await writer.drain()
        except ConnectionError:
            closed = True
            break
        if reader.at_eof() or (await _closed(reader)):
            closed = True
            break
    assert closed and loop.time() - started < 3.5
    writer.close()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:  # whole requests go on
        assert (await http.get("/healthz")).status_code == 200


async def _closed(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), 0.01) == b""
    except TimeoutError:
        return False


@pytest.mark.e2e
async def test_connections_past_the_per_peer_cap_are_refused_with_429(daphne_server):
    server = daphne_server(CODEX_MAX_CONNECTIONS_PER_PEER="2")
    async with ws_connect(server.ws_url), ws_connect(server.ws_url):
        with pytest.raises(InvalidStatus) as refused:
            async with ws_connect(server.ws_url):
                pass
        assert refused.value.response.status_code == 429
    async with ws_connect(server.ws_url) as again:  # places are given back when connections close
        await again.send(json.dumps({"id": 1, "method": "initialize", "params": {"clientInfo": {"name": "a", "version": "1"}}}))
        assert "result" in json.loads(await again.recv())


async def test_connections_past_the_process_cap_are_refused_with_503(connect, settings):
    from channels.testing import WebsocketCommunicator

    from codexserver.asgi import application

    settings.CODEX_MAX_CONNECTIONS = 2
    first, second = await connect(), await connect()
    await first.initialize("codex_ios", "1")
    third = WebsocketCommunicator(application, "/")
    connected, status = await third.connect()
    assert not connected
    await second.communicator.disconnect()
    fourth = await connect()
    await fourth.initialize("codex_ios", "1")


async def test_one_principals_turns_and_realtime_calls_are_bounded_on_a_process(connect, upstream, settings):
    """Issue 26, 4: 128 connections of one principal, 16 turns each, would
    take the whole shared upstream pool; each principal gets at most
    CODEX_MAX_UPSTREAM_STREAMS_PER_PRINCIPAL, counted over its connections."""
    settings.CODEX_MAX_UPSTREAM_STREAMS_PER_PRINCIPAL = 3
    clients = [await connect() for _ in range(2)]
    for client in clients:
        await client.initialize("codex_ios", "1.4.0")
    threads = [[await client.start_thread() for _ in range(2)] for client in clients]
    slow = [{"type": "text", "text": "slow:50"}]
    first = await clients[0].call("turn/start", {"threadId": threads[0][0], "input": slow})
    await clients[0].call("turn/start", {"threadId": threads[0][1], "input": slow})
    await clients[1].call("thread/realtime/start", {"threadId": threads[1][0], "sdp": "v=0"})
    refused = await clients[1].request("turn/start", {"threadId": threads[1][1], "input": slow})
    assert refused["error"]["code"] == -32001
    assert (await clients[1].request("thread/realtime/start", {"threadId": threads[1][1], "sdp": "v=0"}))["error"]["code"] == -32001
    await clients[0].call("turn/interrupt", {"threadId": threads[0][0], "turnId": first["turn"]["id"]})
    await clients[0].notification("turn/completed", threadId=threads[0][0])
    await clients[1].call("turn/start", {"threadId": threads[1][1], "input": slow})  # a place was given back


async def test_realtime_calls_are_bounded_per_connection(connect, upstream, settings):
    settings.CODEX_MAX_REALTIME_CALLS_PER_CONNECTION = 2
    client = await connect()
    await client.initialize("codex_ios", "1.4.0")
    threads = [await client.start_thread() for _ in range(3)]
    for thread in threads[:2]:
        await client.call("thread/realtime/start", {"threadId": thread, "sdp": "v=0"})
    refused = (await client.request("thread/realtime/start", {"threadId": threads[2], "sdp": "v=0"}))["error"]
    assert refused["code"] == -32600 and "Realtime call limit reached (2 per connection)" in refused["message"]
    await client.call("thread/realtime/stop", {"threadId": threads[0]})
    await client.call("thread/realtime/start", {"threadId": threads[2], "sdp": "v=0"})  # a place was given back


async def test_connection_rows_closed_past_the_retention_are_deleted(settings):
    from datetime import timedelta
    from uuid import uuid4

    from asgiref.sync import sync_to_async
    from django.utils import timezone

    from identity.actions import prune_closed_rows
    from identity.models import ConnectionIdentity
    from identity.principals import local_principal

    principal = await sync_to_async(local_principal)()
    now = timezone.now()

    def make(closed_days_ago):
        closed = None if closed_days_ago is None else now - timedelta(days=closed_days_ago)
        return ConnectionIdentity.objects.create(
            connection_id=uuid4(), principal=principal, server_instance="x", connected_at=now - timedelta(days=400), disconnected_at=closed
        )

    old, recent, still_open = [await sync_to_async(make)(days) for days in (100, 10, None)]
    assert await prune_closed_rows(now - timedelta(days=90), batch=5) == 1
    assert await prune_closed_rows(now - timedelta(days=90), batch=5) == 0
    left = set(await sync_to_async(lambda: list(ConnectionIdentity.objects.values_list("pk", flat=True)))())
    assert left == {recent.pk, still_open.pk}


def test_wrong_admin_passwords_lock_that_user_out_from_that_address(client, django_user_model, settings):
    django_user_model.objects.create_superuser("admin", "admin@example.com", "right-password")
    for attempt in range(1, settings.AXES_FAILURE_LIMIT + 1):
        response = client.post("/admin/login/", {"username": "admin", "password": "wrong", "next": "/admin/"})
        # The form again ("please enter the correct…"), and at the limit, locked out.
        assert response.status_code == (429 if attempt == settings.AXES_FAILURE_LIMIT else 200)
    locked = client.post("/admin/login/", {"username": "admin", "password": "right-password", "next": "/admin/"})
    assert locked.status_code == 429  # even the right password, until the cool-off ends
    other = client.post(
        "/admin/login/", {"username": "admin", "password": "right-password", "next": "/admin/"}, REMOTE_ADDR="10.0.0.2"
    )
    assert other.status_code == 302  # the same user from another address is not locked out


@pytest.mark.e2e
async def test_a_null_or_malformed_origin_is_refused_with_403_like_any_other(daphne_server):
    server = daphne_server()
    for origin in ("null", "not a url"):
        with pytest.raises(InvalidStatus) as refused:
            async with ws_connect(server.ws_url, origin=origin):
                pass
        assert refused.value.response.status_code == 403, origin


async def test_one_connection_runs_only_a_few_store_reads_at_once(connect, monkeypatch):
    from realtime.rpc.connection import MAX_STORE_READS_IN_FLIGHT
    from realtime.store.thread_store import DatabaseThreads

    running, most = 0, 0
    page = DatabaseThreads.page

    async def counted(*args, **kwargs):
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            await asyncio.sleep(0.02)
            return await page(*args, **kwargs)
        finally:
            running -= 1

    monkeypatch.setattr(DatabaseThreads, "page", staticmethod(counted))
    flooder, other = await connect(), await connect()
    await flooder.initialize("codex_ios", "1.4.0")
    await other.initialize("codex_vscode", "1.0.0")
    for index in range(30):
        await flooder.send({"id": f"l{index}", "method": "thread/list", "params": {}})
    assert "result" in await other.request("thread/list", {}, timeout=2)  # another client is not queued behind them
    for index in range(30):
        await flooder.wait_for(lambda m, wanted=f"l{index}": m.get("id") == wanted, timeout=10)
    assert most <= MAX_STORE_READS_IN_FLIGHT + 1  # the flooder's few, and the other client's one


@pytest.mark.e2e
async def test_a_kept_alive_connection_is_timed_for_its_next_request_too(daphne_server):
    server = daphne_server(CODEX_REQUEST_HEAD_SECONDS="1")
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert b"200" in await asyncio.wait_for(reader.readline(), 5)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # the next head, never finished
    loop = asyncio.get_running_loop()
    started, closed = loop.time(), False
    while not closed and loop.time() - started < 5:
        try:
            writer.write(b"X")
            await asyncio.sleep(0.2)
            closed = reader.at_eof() or await _closed(reader)
        except ConnectionError:  # aborted: reset
            closed = True
    assert closed and loop.time() - started < 3
    writer.close()


def test_an_ipv6_host_counts_as_its_64_and_an_unknown_address_only_toward_the_process(settings):
    from realtime.transport.connection_limits import ConnectionLimits

    settings.CODEX_MAX_CONNECTIONS_PER_PEER, settings.CODEX_MAX_CONNECTIONS = 2, 5
    limits = ConnectionLimits()
    assert limits.admit("2001:db8::1") is None and limits.admit("2001:db8::ffff:2") is None
    assert limits.admit("2001:db8::3") == 429  # the same /64
    assert limits.admit("2001:db8:0:1::1") is None  # another /64
    assert limits.admit(None) is None and limits.admit(None) is None
    assert limits.admit(None) == 503  # the process cap still holds
    limits.release("2001:db8::1")
    assert limits.admit("2001:db8::4") is None
    # IPv4 clients of a dual-stack listener are each their own address, not all one "::/64".
    settings.CODEX_MAX_CONNECTIONS = 100
    assert limits.admit("::ffff:10.0.0.1") is None and limits.admit("::ffff:10.0.0.1") is None
    assert limits.admit("::ffff:10.0.0.2") is None and limits.admit("10.0.0.1") == 429


async def test_the_connection_that_started_a_realtime_call_hears_it_closed_whoever_stops_it(connect, upstream):
    owner, other = await connect(), await connect()
    await owner.initialize("codex_ios", "1.4.0")
    await other.initialize("codex_vscode", "1.0.0")
    thread = await owner.start_thread()
    await other.call("thread/resume", {"threadId": thread})
    call = await owner.call("thread/realtime/start", {"threadId": thread, "sdp": "v=0"})
    assert await other.call("thread/realtime/stop", {"threadId": thread}) == {}
    for client in (owner, other):
        closed = await client.notification("thread/realtime/closed", threadId=thread)
        assert closed["callId"] == call["callId"] and closed["reason"] == "stopped"


async def test_a_client_flooding_frames_is_read_at_its_pace_and_the_others_are_not(connect, settings):
    settings.CODEX_MAX_FRAMES_PER_SECOND = 50
    flooder, other = await connect(), await connect()
    await flooder.initialize("codex_ios", "1.4.0")
    await other.initialize("codex_vscode", "1.0.0")
    loop = asyncio.get_running_loop()
    started = loop.time()
    for index in range(125):
        await flooder.send({"id": index, "method": "model/list", "params": {}})
    answered = loop.time()
    assert "result" in await other.request("model/list", {}, timeout=1)  # not behind the flood
    assert loop.time() - answered < 1
    await flooder.wait_for(lambda m: m.get("id") == 124, timeout=10)
    assert loop.time() - started >= 1.4  # a burst of 50, then 50 a second: each frame answered, none refused
    assert not [m for m in flooder.inbox if "error" in m]


async def test_freed_memory_is_given_back_only_after_a_connection_that_held_a_lot_and_not_too_often(monkeypatch):
    """The memory goal of issue 26 is measured by bench/abuse.py (RSS back
    within 10% once a never-reading client is gone); here, when it trims."""
    from codexserver import freed_memory as module

    trims = []
    monkeypatch.setattr(module, "_malloc_trim", lambda: (lambda pad: trims.append(pad) or 1))
    memory = module.FreedMemory()
    memory.release_after(module.TRIM_AFTER_BYTES - 1)  # an ordinary connection: nothing
    memory.release_after(32 << 20)
    await asyncio.sleep(0.1)
    memory.release_after(32 << 20)  # within a second of the last: skipped
    await asyncio.sleep(0.1)
    assert trims == [0]


@pytest.mark.e2e
async def test_a_client_sending_faster_than_it_is_served_is_held_back_by_its_socket_not_our_memory(daphne_server):
    """daphne read every frame as it came into an unbounded queue while the
    connection is served CODEX_MAX_FRAMES_PER_SECOND: in four seconds one
    client pushed 435 MiB and the process grew 640 MiB. Now its socket is
    not read while 64 frames wait: its sends wait instead."""
    server = daphne_server()
    rss_before = server.rss_bytes()
    async with ws_connect(server.ws_url, max_size=None) as socket:
        await socket.send(json.dumps({"id": 0, "method": "initialize", "params": {"clientInfo": {"name": "flood", "version": "1"}}}))
        await socket.recv()
        frame = json.dumps({"id": 1, "method": "turn/interrupt", "params": {"threadId": "x" * 4000, "turnId": "y"}})
        sent = 0

        async def flood() -> None:
            nonlocal sent
            while True:
                await socket.send(frame)
                sent += len(frame)

        with pytest.raises(TimeoutError):
            await asyncio.wait_for(flood(), 4)
        grown = server.rss_bytes() - rss_before
        socket.transport.abort()
    assert sent < 32 << 20, f"{sent / 2**20:.0f} MiB went in"
    assert grown < 16 << 20, f"the server grew {grown / 2**20:.0f} MiB"
    async with ws_connect(server.ws_url) as other:  # and it serves the others
        await other.send(json.dumps({"id": 1, "method": "initialize", "params": {"clientInfo": {"name": "a", "version": "1"}}}))
        assert "result" in json.loads(await asyncio.wait_for(other.recv(), 5))

"""The same regression through a real daphne process on loopback."""

import asyncio
import json
import os
import sqlite3

import httpx
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.conftest import TEST_API_KEY
from tests.rpc_client import SocketClient

pytestmark = pytest.mark.e2e


async def test_seed_regression_through_daphne(daphne_server, upstream, tmp_path):
    server = daphne_server()
    async with ws_connect(server.ws_url) as backend_ws, ws_connect(server.ws_url) as ios_ws:
        backend, ios = SocketClient(backend_ws), SocketClient(ios_ws)
        await backend.initialize("codex-backend", "2.0.0")
        ios_result = await ios.initialize("codex_ios", "1.4.0")
        assert ios_result["userAgent"].startswith("codex_ios/") and ios_result["userAgent"].endswith("(codex_ios; 1.4.0)")
        ios_thread, backend_thread = await ios.start_thread(), await backend.start_thread()
        results = await asyncio.gather(ios.run_turn(ios_thread), backend.run_turn(backend_thread))
        assert [r["turn"]["status"] for r in results] == ["completed", "completed"]

    by_thread = {r.headers["session-id"]: r for r in upstream.model_requests()}
    assert by_thread[ios_thread].originator == "codex_ios"
    assert by_thread[ios_thread].user_agent.startswith("codex_ios/")
    assert by_thread[backend_thread].originator == "codex_cli_rs"
    assert by_thread[backend_thread].user_agent.endswith("(codex-backend; 2.0.0)")

    rows = await _rows_when_closed(tmp_path / "server.sqlite3", 2)
    assert {(r["client_name"], r["originator"], r["is_infrastructure"]) for r in rows} == {
        ("codex-backend", "codex_cli_rs", 1),
        ("codex_ios", "codex_ios", 0),
    }
    assert {r["remote_addr"] for r in rows} == {"127.0.0.1"}


async def test_override_set_on_the_process_still_loses_to_an_explicit_identity(daphne_server, upstream):
    server = daphne_server(CODEX_INTERNAL_ORIGINATOR_OVERRIDE="codex_exec")
    async with ws_connect(server.ws_url) as ios_ws, ws_connect(server.ws_url) as daemon_ws:
        ios, daemon = SocketClient(ios_ws), SocketClient(daemon_ws)
        await ios.initialize("codex_ios", "1.4.0")
        await daemon.initialize("codex_app_server_daemon", "0.2.0")
        ios_thread, daemon_thread = await ios.start_thread(), await daemon.start_thread()
        await ios.run_turn(ios_thread)
        await daemon.run_turn(daemon_thread)
    by_thread = {r.headers["session-id"]: r for r in upstream.model_requests()}
    assert by_thread[ios_thread].originator == "codex_ios"
    assert by_thread[daemon_thread].originator == "codex_exec"
    assert by_thread[daemon_thread].user_agent.startswith("codex_exec/")
    assert by_thread[daemon_thread].user_agent.endswith("(codex_app_server_daemon; 0.2.0)")


async def test_health_origin_and_frame_limit_on_a_real_server(daphne_server):
    server = daphne_server()
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        assert (await http.get("/healthz")).status_code == 200
        ready = await http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "channel_layer": "ok"}
        assert (await http.get("/admin/")).status_code == 302  # login first

    with pytest.raises(InvalidStatus) as refused:
        async with ws_connect(server.ws_url, origin="https://evil.example"):
            pass
    assert refused.value.response.status_code == 403

    async with ws_connect(server.ws_url, max_size=None) as victim_ws, ws_connect(server.ws_url) as other_ws:
        other = SocketClient(other_ws)
        await other.initialize("codex_ios", "1")
        await victim_ws.send("x" * (1024 * 1024 + 10))
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(victim_ws.recv(), 5)
        assert closed.value.rcvd.code == 1009
        assert await other.start_thread()


async def test_a_real_server_survives_junk_frames(daphne_server):
    server = daphne_server()
    async with ws_connect(server.ws_url) as websocket:
        client = SocketClient(websocket)
        for frame in ["", "[]", "{", '{"id": {}}', '{"id": 1, "method": 5}', "\u0000", json.dumps({"id": 2, "method": "x"})]:
            await client.send_raw(frame)
            reply = await client.receive()
            assert "error" in reply
        await websocket.send(b"\xff\xfe")
        assert (await client.receive())["error"]["code"] == -32700
        await client.initialize("codex_ios", "1")
        assert (await client.run_turn(await client.start_thread()))["turn"]["status"] == "completed"


async def _rows_when(db_path, predicate, timeout=5.0):
    async with asyncio.timeout(timeout):
        while True:
            with sqlite3.connect(db_path) as db:
                db.row_factory = sqlite3.Row
                rows = [dict(r) for r in db.execute("select * from identity_connectionidentity")]
            if predicate(rows):
                return rows
            await asyncio.sleep(0.05)


async def _rows_when_closed(db_path, count, timeout=5.0):
    return await _rows_when(
        db_path, lambda rows: len(rows) == count and all(r["disconnected_at"] for r in rows), timeout
    )


async def test_bearer_token_is_required_when_configured(daphne_server, upstream):
    server = daphne_server(CODEX_WS_AUTH_TOKEN="s3cret-token", CODEX_ALLOWED_ORIGINS="https://ide.example")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"}):
        with pytest.raises(InvalidStatus) as refused:
            async with ws_connect(server.ws_url, additional_headers=headers):
                pass
        assert refused.value.response.status_code == 401
        assert refused.value.response.headers["WWW-Authenticate"] == "Bearer"
    good = {"Authorization": "Bearer s3cret-token"}
    async with ws_connect(server.ws_url, additional_headers=good, origin="https://ide.example") as websocket:
        assert (await SocketClient(websocket).initialize("codex_ios", "1"))["userAgent"]
    # The scheme word is case-insensitive (RFC 9110), as Codex clients may send it.
    async with ws_connect(server.ws_url, additional_headers={"Authorization": "bearer s3cret-token"}) as websocket:
        assert (await SocketClient(websocket).initialize("codex_ios", "1"))["userAgent"]
    with pytest.raises(InvalidStatus) as refused:
        async with ws_connect(server.ws_url, additional_headers=good, origin="https://other.example"):
            pass
    assert refused.value.response.status_code == 403
    assert "s3cret-token" not in server.log()


async def test_buffered_telemetry_is_flushed_when_the_server_stops(daphne_server, upstream):
    server = daphne_server(CODEX_TELEMETRY_FLUSH_INTERVAL="600")
    async with ws_connect(server.ws_url) as websocket:
        client = SocketClient(websocket)
        await client.initialize("codex_ios", "1.4.0")
        thread = await client.start_thread()
        await asyncio.sleep(0.3)
        assert upstream.requests("/events") == []  # still buffered
    server.stop()  # SIGTERM
    [record] = upstream.requests("/events")
    assert record.originator == "codex_ios"
    assert record.body["events"][0]["event_params"]["thread_id"] == thread


async def test_log_lines_name_their_connection_and_never_the_key(daphne_server, upstream):
    server = daphne_server()
    async with ws_connect(server.ws_url) as websocket:
        client = SocketClient(websocket)
        await client.initialize("codex_ios", "1.4.0")
        # The upstream echoes the key back in its error body; it must not reach the log.
        completed = await client.run_turn(await client.start_thread(), "fail:401")
        assert completed["turn"]["status"] == "failed"
    await asyncio.sleep(0.2)
    log = server.log()
    assert TEST_API_KEY not in log
    initialized = [line for line in log.splitlines() if "initialized: codex_ios/" in line]
    assert len(initialized) == 1 and "originator=codex_ios]" in initialized[0]
    connection_id = initialized[0].split("[conn=", 1)[1].split(" ", 1)[0]
    # The failed turn is logged from the turn's own task, under the same scope.
    [failed] = [line for line in log.splitlines() if " failed: " in line and "realtime.turns.runner" in line]
    assert f"[conn={connection_id} originator=codex_ios]" in failed


async def test_a_client_that_stops_reading_is_dropped_while_others_carry_on(daphne_server, upstream, tmp_path):
    server = daphne_server(CODEX_CLIENT_STALL_TIMEOUT="1")
    # max_queue=1: once one frame waits unread, the client stops reading its socket.
    async with ws_connect(server.ws_url, max_queue=1) as stalled, ws_connect(server.ws_url) as healthy_ws:
        await stalled.send(json.dumps({"id": 1, "method": "initialize", "params": {"clientInfo": {"name": "stalled", "version": "1"}}}))
        assert "result" in json.loads(await stalled.recv())
        await stalled.send(json.dumps({"id": 2, "method": "thread/start", "params": {}}))
        thread = json.loads(await stalled.recv())["result"]["thread"]["id"]
        await stalled.send(json.dumps({"id": 3, "method": "turn/start", "params": {"threadId": thread, "input": [{"type": "text", "text": "flood:20000:4096"}]}}))
        # ...and never reads again. About 80 MB of deltas are on their way:
        # more than socket buffers hold, so the stream is still being written
        # when the client is dropped.

        healthy = SocketClient(healthy_ws)
        await healthy.initialize("codex_ios", "1")
        healthy_thread = await healthy.start_thread()
        assert (await healthy.run_turn(healthy_thread))["turn"]["status"] == "completed"

        rows = await _rows_when(tmp_path / "server.sqlite3", lambda rows: any(r["client_name"] == "stalled" and r["disconnected_at"] for r in rows), timeout=20)
        assert [r for r in rows if r["client_name"] == "codex_ios"][0]["disconnected_at"] is None
        assert "outbound queue full (1024 messages)" in server.log()
        assert (await healthy.run_turn(healthy_thread))["turn"]["status"] == "completed"
        # Its turn stopped when it was dropped: the flood's stream was closed
        # before its end, not read to the end for nobody.
        await upstream.await_for(lambda rs: any(r.kind == "closed" and r.originator == "stalled" for r in rs), timeout=2)


async def test_a_graceful_stop_cancels_turns_and_closes_rows_of_open_connections(daphne_server, upstream, tmp_path):
    server = daphne_server(CODEX_SERVER_INSTANCE="graceful")
    async with ws_connect(server.ws_url) as websocket:
        client = SocketClient(websocket)
        await client.initialize("codex_ios", "1")
        thread = await client.start_thread()
        await client.call("turn/start", {"threadId": thread, "input": [{"type": "text", "text": "slow:300"}]})
        await client.notification("item/agentMessage/delta", threadId=thread)
        server.stop()  # SIGTERM mid-turn, the client still connected
    rows = await _rows_when(tmp_path / "server.sqlite3", lambda rows: True)
    assert rows[0]["disconnected_at"] is not None
    # The turn's upstream stream was closed, not left to run out.
    await upstream.await_for(lambda rs: any(r.kind == "closed" and r.path == "/v1/responses" for r in rs), timeout=2)


async def test_a_slow_reader_gets_the_whole_turn_instead_of_being_dropped(daphne_server):
    server = daphne_server(CODEX_CLIENT_STALL_TIMEOUT="5")
    async with ws_connect(server.ws_url, max_queue=1, max_size=None) as websocket:
        client = SocketClient(websocket)
        await client.initialize("slow_phone", "1")
        thread = await client.start_thread()
        await client.send({"id": "t", "method": "turn/start", "params": {"threadId": thread, "input": [{"type": "text", "text": "flood:3000:2048"}]}})
        deltas = 0
        async with asyncio.timeout(60):
            while True:
                message = await client.receive()
                if message.get("method") == "item/agentMessage/delta":
                    deltas += 1
                    if deltas % 200 == 0:
                        await asyncio.sleep(0.05)  # reads, but slower than the model streams
                if message.get("method") == "turn/completed":
                    break
        assert deltas == 3000 and message["params"]["turn"]["status"] == "completed"


async def test_a_reader_that_keeps_up_gets_a_frame_larger_than_what_clients_may_send(daphne_server):
    # The 1 MiB limit is on what clients send, not on what we send: a delta
    # of 1.1 MB, written through to a socket with room (the outbox's
    # write_text_now), which drops the connection if the write fails.
    server = daphne_server()
    async with ws_connect(server.ws_url, max_size=None) as websocket:
        client = SocketClient(websocket)
        await client.initialize("desk", "1")
        thread = await client.start_thread()
        completed = await client.run_turn(thread, "flood:1:1100000", timeout=60)
        assert completed["turn"]["status"] == "completed"
        delta = next(m for m in client.inbox if m.get("method") == "item/agentMessage/delta")
        assert len(delta["params"]["delta"]) == 1_100_000 > 1024 * 1024
    assert "could not be written" not in server.log()


async def test_with_the_channel_layer_down_upgrades_are_refused_with_503_and_no_row_is_left(daphne_server, tmp_path):
    server = daphne_server(REDIS_URL="redis://127.0.0.1:1/0")  # nothing listens there
    for _ in range(3):
        with pytest.raises(InvalidStatus) as refused:
            async with ws_connect(server.ws_url):
                pass
        assert refused.value.response.status_code == 503
    assert await _rows_when(tmp_path / "server.sqlite3", lambda rows: True, 0.1) == []
    server.stop()
    log = server.log()
    assert "Traceback" not in log and "Task was destroyed" not in log


async def test_serve_with_a_local_model_answers_offline(tmp_path):
    from codexserver.devtools.server_process import ServerProcess, migrate

    workspace = tmp_path / "workspace"
    workspace.mkdir()
    (workspace / "hello.txt").write_text("hi there\n")
    env = {
        "PATH": os.environ["PATH"], "HOME": str(tmp_path),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'offline.sqlite3'}", "CODEX_WORKSPACE_ROOTS": str(workspace),
    }  # fmt: skip: no OPENAI_API_KEY, no upstream at all
    migrate(env)
    server = ServerProcess(env, tmp_path / "offline.log", command=["manage.py", "serve", "--port", "{port}", "--local-model"])
    server.start()
    try:
        assert "LOCAL MODEL" in server.log()
        async with ws_connect(server.ws_url) as websocket:
            client = SocketClient(websocket)
            await client.initialize("offline_user", "1")
            thread = await client.start_thread()
            chat = await client.run_turn(thread, "hi")
            assert [i["text"] for i in chat["turn"]["items"] if i["type"] == "agentMessage"] == ["Hello world"]
            command = await client.run_turn(thread, "exec[cat hello.txt]", timeout=30)
            assert any("hi there" in (i.get("aggregatedOutput") or "") for i in command["turn"]["items"])
    finally:
        server.stop()


async def test_a_turn_whose_start_finds_the_sqlite_file_locked_waits_on_a_row_writer_and_the_loop_does_not(daphne_server):
    """SQLite: the event loop writes a turn's batches on its own connection,
    which never waits for a lock. Another process holds the database's write
    lock for a second: the turn's start is written once it is free, by a row
    writer, while the loop answers other requests at once."""
    server = daphne_server()
    async with ws_connect(server.ws_url) as first, ws_connect(server.ws_url) as second:
        writer, other = SocketClient(first), SocketClient(second)
        await writer.initialize("codex_ios", "1.4.0")
        await other.initialize("codex_vscode", "1.0.0")
        thread = await writer.start_thread()
        assert (await writer.run_turn(thread, "before"))["turn"]["status"] == "completed"

        holder = sqlite3.connect(server.env["DATABASE_URL"].removeprefix("sqlite:///"), isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # the write lock, as another process's transaction
        try:
            turn = asyncio.create_task(writer.run_turn(thread, "while locked", timeout=20))
            await asyncio.sleep(0.2)
            started = asyncio.get_running_loop().time()
            assert "result" in await other.request("model/list", {})
            assert asyncio.get_running_loop().time() - started < 0.5  # the loop is not waiting for the lock
            await asyncio.sleep(0.8)
            assert not turn.done()
        finally:
            holder.execute("COMMIT")
            holder.close()
        assert (await turn)["turn"]["status"] == "completed"
        assert (await writer.run_turn(thread, "after"))["turn"]["status"] == "completed"


async def test_the_turns_the_loop_writes_to_sqlite_reach_the_database_file_by_a_row_writers_checkpoint(daphne_server):
    """The loop's SQLite connection never checkpoints (an fsync would stop
    the loop): after every CHECKPOINT_EVERY commits, a row writer copies the
    WAL into the database file."""
    from realtime.store.loop_writers import CHECKPOINT_EVERY

    server = daphne_server()
    turns = CHECKPOINT_EVERY // 2 + 10  # each turn commits twice, its start and its end
    async with ws_connect(server.ws_url) as socket:
        client = SocketClient(socket)
        await client.initialize("codex_ios", "1.4.0")
        thread = await client.start_thread()
        for _ in range(turns):
            assert (await client.run_turn(thread))["turn"]["status"] == "completed"
        path = server.env["DATABASE_URL"].removeprefix("sqlite:///")
        in_the_file = sqlite3.connect(f"file:{path}?immutable=1", uri=True)  # the file alone, not its WAL
        try:
            checkpointed = in_the_file.execute("select count(*) from realtime_storedturn").fetchone()[0]
        finally:
            in_the_file.close()
        assert checkpointed >= CHECKPOINT_EVERY // 2 - 5

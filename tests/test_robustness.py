"""Review findings of the second hardening round, each proven on the real ASGI app."""

from __future__ import annotations

import asyncio
import json

import pytest
from channels.db import database_sync_to_async

from identity.models import ConnectionIdentity
from realtime.fanout.thread_hub import thread_hub
from realtime.services import telemetry
from realtime.transport.outbox import Outbox

pytestmark = pytest.mark.django_db(transaction=True)


async def test_interrupt_is_accepted_while_the_outbox_is_overloaded(connect, monkeypatch):
    client = await connect()
    await client.initialize("codex_ios", "1.4.0")
    thread = await client.start_thread()
    turn = (await client.call("turn/start", {"threadId": thread, "input": [{"type": "text", "text": "slow:100"}]}))["turn"]
    await client.notification("item/agentMessage/delta", threadId=thread)

    monkeypatch.setattr(Outbox, "overloaded", property(lambda self: True))
    assert (await client.request("thread/start", {}))["error"]["code"] == -32001
    # The one request that relieves the pressure is never refused (PROTOCOL §3).
    assert await client.call("turn/interrupt", {"threadId": thread, "turnId": turn["id"]}) == {}
    monkeypatch.undo()
    completed = await client.notification("turn/completed", threadId=thread)
    assert completed["turn"]["status"] == "interrupted"


async def test_a_failure_after_the_reply_never_sends_a_second_reply(connect, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("telemetry broke")

    monkeypatch.setattr(telemetry, "record_event", broken)
    client = await connect()
    await client.initialize("codex_ios", "1.4.0")
    response = await client.request("thread/start", {})
    assert "result" in response
    assert (await client.request("thread/loaded/list", {}))["result"]["data"]  # the connection still answers
    assert [m for m in client.inbox if m.get("id") == response["id"]] == []  # no second reply


@pytest.mark.parametrize(
    "client_info, capabilities, field",
    [
        ({"name": "codex_ios", "version": "1", "title": "bad \ud800 title"}, {}, "clientInfo.title"),
        ({"name": "codex_ios", "version": "1", "title": "nul \x00 title"}, {}, "clientInfo.title"),
        ({"name": "codex_ios", "version": "1"}, {"experimentalApi": False, "note": "nul \x00"}, "capabilities"),
        ({"name": "codex_ios", "version": "1"}, {"odd \ud800 key": True}, "capabilities"),
    ],
)
async def test_unstorable_client_strings_are_invalid_params_naming_the_field(connect, client_info, capabilities, field):
    client = await connect()
    response = await client.request("initialize", {"clientInfo": client_info, "capabilities": capabilities})
    assert response["error"]["code"] == -32602
    assert field in response["error"]["message"]
    # Nothing was stored and the client may retry.
    assert (await client.initialize("codex_ios", "1"))["userAgent"]
    row = await database_sync_to_async(ConnectionIdentity.objects.get)()
    assert row.client_title == "Codex_Ios" and "\x00" not in str(row.capabilities)


@pytest.mark.parametrize(
    "method, params, field",
    [
        ("turn/start", {"input": [{"type": "text", "text": "bad \ud800 text"}]}, "input[0].text"),
        ("turn/start", {"input": [{"type": "text", "text": "nul \x00 text"}]}, "input[0].text"),
        ("turn/start", {"input": [{"type": "image", "url": "https://x/\x00.png"}]}, "input[0].url"),
        ("turn/start", {"input": [{"type": "text", "text": "hi"}], "model": "m\ud800"}, "model"),
        (
            "turn/start",
            {"input": [{"type": "text", "text": "hi", "text_elements": [{"byteRange": {"start": 0, "end": 1}, "placeholder": "\x00"}]}]},
            "input[0].text_elements.placeholder",
        ),
        ("thread/start", {"cwd": "/tmp/\x00"}, "cwd"),
        ("thread/start", {"model": "gpt \ud800"}, "model"),
        ("thread/start", {"baseInstructions": "be \x00 brief"}, "baseInstructions"),
        ("thread/resume", {"model": "gpt \ud800"}, "model"),
        ("thread/list", {"originators": ["codex_ios", "nul \x00"]}, "originators"),
    ],
)
async def test_text_no_database_can_store_is_invalid_params_naming_the_field(connect, upstream, method, params, field):
    # Stored as sent (a thread's cwd and model, a turn's input and preview):
    # PostgreSQL refuses NUL, and neither database takes a lone surrogate.
    client = await connect()
    await client.initialize("codex_ios", "1.4.0")
    thread = await client.start_thread()
    response = await client.request(method, {"threadId": thread, **params})
    assert response["error"] == {"code": -32602, "message": f"Invalid params: {field} must be valid Unicode text without NUL characters"}
    # The connection and the thread go on as before.
    assert (await client.run_turn(thread))["turn"]["status"] == "completed"


@pytest.mark.parametrize("delta, shown", [("nul \x00 here", "nul \ufffd here"), ("lone \ud800 here", "lone \ufffd here")])
async def test_a_reply_no_database_could_store_is_stored_with_replacement_characters(connect, upstream, delta, shown):
    # PostgreSQL refused the turn's end: the reply was lost and the thread
    # stayed locked until its lock lapsed. Now the client, the store and the
    # next turn's history all get U+FFFD in its place.
    upstream.canned_reply = ["before ", delta]
    client = await connect()
    await client.initialize("codex_ios", "1.4.0")
    thread = await client.start_thread()
    first = await client.run_turn(thread, "hi")
    upstream.canned_reply = ["fine"]
    assert (await client.run_turn(thread, "again"))["turn"]["status"] == "completed"  # the thread was free
    shown = "before " + shown
    assert [item["text"] for item in first["turn"]["items"] if item["type"] == "agentMessage"] == [shown]
    turns = (await client.call("thread/read", {"threadId": thread, "includeTurns": True}))["thread"]["turns"]
    assert [item["text"] for item in turns[0]["items"] if item["type"] == "agentMessage"] == [shown]
    assert shown in str(upstream.model_requests()[-1].body["input"])


@pytest.mark.parametrize("item_id", ["msg_\x00bad", "msg_\ud800", "m" * 300])
async def test_an_item_id_no_database_could_store_is_replaced_by_our_own(connect, upstream, item_id):
    upstream.canned_item_id = item_id
    client = await connect()
    await client.initialize("codex_ios", "1.4.0")
    thread = await client.start_thread()
    first = await client.run_turn(thread, "hi")
    (reply,) = [item for item in first["turn"]["items"] if item["type"] == "agentMessage"]
    assert reply["text"] == "Hello world" and reply["id"] != item_id and len(reply["id"]) == 36  # a UUID
    upstream.canned_item_id = None
    assert (await client.run_turn(thread, "again"))["turn"]["status"] == "completed"  # the end was stored


@pytest.mark.parametrize("span", [{"start": 0, "end": 2**70}, {"start": 3, "end": 2}, {"start": -1, "end": 2}])
async def test_a_text_element_no_client_could_read_back_is_invalid_params(connect, upstream, span):
    client = await connect()
    await client.initialize("codex_ios", "1.4.0")
    thread = await client.start_thread()
    text = {"type": "text", "text": "hi", "text_elements": [{"byteRange": span}]}
    assert (await client.request("turn/start", {"threadId": thread, "input": [text]}))["error"]["code"] == -32602


async def test_text_elements_are_stored_and_echoed_with_the_schemas_fields_only(connect, upstream):
    client = await connect()
    await client.initialize("codex_ios", "1.4.0")
    thread = await client.start_thread()
    element = {"byteRange": {"start": 0, "end": 2, "extra": "a\x00b"}, "placeholder": None, "other": {"\ud800": 1}}
    text = {"type": "text", "text": "hi", "text_elements": [element]}
    await client.call("turn/start", {"threadId": thread, "input": [text]})
    started = await client.notification("item/started", threadId=thread)
    assert started["item"]["content"][0]["text_elements"] == [{"byteRange": {"start": 0, "end": 2}, "placeholder": None}]
    await client.notification("turn/completed", threadId=thread)
    assert (await client.run_turn(thread))["turn"]["status"] == "completed"


async def test_a_resume_refused_for_its_params_leaves_the_connection_unsubscribed(connect, upstream):
    owner, other = await connect(), await connect()
    await owner.initialize("codex_ios", "1.4.0")
    await other.initialize("codex_vscode", "1.0.0")
    thread = await owner.start_thread()
    for params in ({"model": "m\ud800"}, {"excludeTurns": "yes"}):
        assert (await other.request("thread/resume", {"threadId": thread, **params}))["error"]["code"] == -32602
    assert await other.call("thread/unsubscribe", {"threadId": thread}) == {"status": "notSubscribed"}


async def test_token_counts_past_a_64_bit_column_are_capped_and_the_turn_is_stored(connect, upstream, monkeypatch):
    from codexserver.devtools import local_upstream

    events = local_upstream.response_events

    def huge_usage(text, deltas, item_id=None):
        planned = events(text, deltas, item_id)
        planned[-1]["response"]["usage"] = {"input_tokens": 2**63, "output_tokens": 2**63 - 1, "total_tokens": 2**64}
        return planned

    monkeypatch.setattr(local_upstream, "response_events", huge_usage)
    client = await connect()
    await client.initialize("codex_ios", "1.4.0")
    thread = await client.start_thread()
    await client.run_turn(thread, "hi")
    usage = await client.notification("thread/tokenUsage/updated", threadId=thread)
    assert usage["tokenUsage"]["last"]["inputTokens"] == 10**12
    monkeypatch.undo()
    assert (await client.run_turn(thread, "again"))["turn"]["status"] == "completed"  # the end was stored


async def test_an_end_the_database_refuses_is_stored_failed_without_its_output_and_frees_the_thread(
    connect, upstream, monkeypatch
):
    # Whatever slips past the checks: here a token count past a 64-bit column.
    from codexserver.devtools import local_upstream
    from realtime.turns import runner as turn_runner

    events = local_upstream.response_events

    def huge_usage(text, deltas, item_id=None):
        planned = events(text, deltas, item_id)
        planned[-1]["response"]["usage"] = {"input_tokens": 2**63, "output_tokens": 1, "total_tokens": 2**63 + 1}
        return planned

    monkeypatch.setattr(local_upstream, "response_events", huge_usage)
    monkeypatch.setattr(turn_runner, "MAX_TOKENS", 2**70)
    client = await connect()
    await client.initialize("codex_ios", "1.4.0")
    thread = await client.start_thread()
    completed = await client.run_turn(thread, "hi")
    assert completed["turn"]["status"] == "failed"
    assert completed["turn"]["error"]["message"] == "the turn's output could not be stored"
    # Told as stored: the error, and no usage the stored turn does not have.
    told = [m["method"] for m in client.inbox if m.get("method") in ("error", "thread/tokenUsage/updated")]
    assert told == ["error"]
    monkeypatch.undo()
    assert (await client.run_turn(thread, "again"))["turn"]["status"] == "completed"  # free at once
    turns = (await client.call("thread/read", {"threadId": thread, "includeTurns": True}))["thread"]["turns"]
    assert [turn["status"] for turn in turns] == ["failed", "completed"]
    assert [item["type"] for item in turns[0]["items"]] == ["userMessage"]


async def test_an_end_written_in_the_background_that_fails_is_logged_at_once(caplog):
    from realtime.turns import runner as turn_runner

    async def refused():
        raise RuntimeError("database down")

    with caplog.at_level("ERROR", logger="realtime.turns.runner"):
        turn_runner.end_in_background(refused())
        await turn_runner.background_endings_finished()
    assert [record.getMessage() for record in caplog.records] == ["could not store the end of a turn in the background"]
    assert "database down" in caplog.text


async def test_history_is_bounded_in_bytes_per_thread(connect, upstream, settings):
    settings.CODEX_MAX_HISTORY_BYTES = 50_000
    client = await connect()
    await client.initialize("codex_ios", "1.4.0")
    thread = await client.start_thread()
    big = "x" * 20_000
    for index in range(6):
        await client.run_turn(thread, f"turn {index} {big}")
    sizes = [len(json.dumps(r.body["input"])) for r in upstream.model_requests()]
    # Each request: the new message plus at most 50 kB of earlier turns, oldest dropped first.
    assert max(sizes) <= 50_000 + 21_000
    last_input = str(upstream.model_requests()[-1].body["input"])
    assert "turn 5" in last_input and "turn 4" in last_input and "turn 0" not in last_input
    # The process holds none of it: a stored thread's turns live in the database.
    assert thread_hub().get(thread).turns == []


@pytest.mark.parametrize(
    "ephemeral, cache_bytes", [(False, 1 << 20), (False, 0), (True, 0)], ids=["stored-kept", "stored-read", "memory"]
)
@pytest.mark.parametrize("transport", ["sse", "websocket"])
async def test_the_history_replayed_is_exactly_what_the_earlier_turn_sent_and_got_back(
    connect, upstream, settings, transport, ephemeral, cache_bytes
):
    # Stored and replayed as JSON text, never decoded (threads.History):
    # escapes, quotes and characters beyond the BMP must come back intact,
    # read back from the database (no history kept) or kept by this process.
    settings.CODEX_RESPONSES_TRANSPORT = transport
    settings.CODEX_HISTORY_CACHE_BYTES = cache_bytes
    client = await connect()
    await client.initialize("codex_ios", "1.4.0")
    thread = await client.start_thread(**({"ephemeral": True} if ephemeral else {}))
    await client.run_turn(thread, 'héllo ☃ 😀 "quoted" \\ back\nslash')
    await client.run_turn(thread, "and again")
    first, second = (request.body["input"] for request in upstream.model_requests())
    *earlier, latest = second
    assert earlier[: len(first)] == first
    replies = earlier[len(first) :]
    assert [reply["role"] for reply in replies if reply["type"] == "message"] == ["assistant"]
    assert latest == {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "and again"}]}


@pytest.mark.parametrize("transport", ["sse", "websocket"])
async def test_a_connect_failure_says_which_upstream_was_tried(connect, settings, transport):
    settings.CODEX_API_BASE_URL = "http://127.0.0.1:1/v1"  # nothing listens there
    settings.CODEX_RESPONSES_TRANSPORT = transport
    client = await connect()
    await client.initialize("codex_ios", "1.4.0")
    completed = await client.run_turn(await client.start_thread())
    error = completed["turn"]["error"]
    assert error["codexErrorInfo"] == {"responseStreamConnectionFailed": {"httpStatusCode": None}}
    assert "127.0.0.1:1/v1/responses" in error["message"]


async def test_a_turn_cancelled_before_it_ran_still_ends_and_frees_its_thread(connect, monkeypatch):
    import realtime.rpc.handlers.turns as turns

    async def never_gets_going(turn_context):
        await asyncio.Event().wait()  # cancelled before doing anything of run_turn

    monkeypatch.setattr(turns, "run_turn", never_gets_going)
    leaver, other = await connect(), await connect()
    await leaver.initialize("codex_ios", "1.4.0")
    await other.initialize("codex_vscode", "1.0.0")
    thread = await leaver.start_thread()
    await other.call("thread/resume", {"threadId": thread})
    await leaver.call("turn/start", {"threadId": thread, "input": [{"type": "text", "text": "hi"}]})
    await leaver.communicator.disconnect()
    completed = await other.notification("turn/completed", threadId=thread)
    assert completed["turn"]["status"] == "interrupted"
    monkeypatch.undo()
    assert (await other.run_turn(thread))["turn"]["status"] == "completed"  # not "Turn already in progress"


async def test_unsubscribing_does_not_free_a_running_turn_slot(connect, settings):
    settings.CODEX_MAX_RUNNING_TURNS_PER_CONNECTION = 1
    client = await connect()
    await client.initialize("codex_ios", "1.4.0")
    first, second = await client.start_thread(), await client.start_thread()
    await client.call("turn/start", {"threadId": first, "input": [{"type": "text", "text": "slow:50"}]})
    await client.call("thread/unsubscribe", {"threadId": first})
    refused = await client.request("turn/start", {"threadId": second, "input": [{"type": "text", "text": "hi"}]})
    assert refused["error"]["code"] == -32001


async def test_text_elements_are_checked_before_they_are_echoed(connect):
    client = await connect()
    await client.initialize("codex_ios", "1.4.0")
    thread = await client.start_thread()
    bad = await client.request("turn/start", {"threadId": thread, "input": [{"type": "text", "text": "hi", "text_elements": [1]}]})
    assert bad["error"]["code"] == -32602 and "text_elements" in bad["error"]["message"]
    element = {"byteRange": {"start": 0, "end": 2}, "placeholder": None}
    await client.call("turn/start", {"threadId": thread, "input": [{"type": "text", "text": "hi", "text_elements": [element]}]})
    item = await client.notification("item/started", threadId=thread)
    assert item["item"]["content"][0]["text_elements"] == [element]


def test_in_stream_codes_win_over_the_websocket_status():
    from realtime.services.upstream_errors import failed_response

    assert failed_response({"status": 400, "code": "context_length_exceeded"}).codex_error_info == "contextWindowExceeded"
    assert failed_response({"status": 429, "code": "rate_limit_exceeded"}).codex_error_info == "rateLimitExceeded"
    assert failed_response({"status": 401, "code": "whatever"}).codex_error_info == "unauthorized"


async def test_thread_ids_no_thread_could_have_are_unknown_not_internal_errors(connect):
    client = await connect()
    await client.initialize("codex_ios", "1.4.0")
    for thread_id in ("x" * 10_000, "a\x00b", "\ud800"):
        for method in ("thread/read", "thread/resume", "thread/turns/list"):
            answer = await client.request(method, {"threadId": thread_id})
            assert answer["error"] == {"code": -32602, "message": "Invalid params: unknown threadId"}, (method, thread_id[:10])


async def test_a_turn_on_another_clients_thread_is_sent_and_stored_under_its_own_identity(connect, upstream):
    from realtime.models import StoredTurn

    desktop, phone = await connect(), await connect()
    await desktop.initialize("codex_vscode", "1.0.0")
    await phone.initialize("codex_ios", "1.4.0")
    thread = await desktop.start_thread()
    await desktop.run_turn(thread, "from the desktop")
    await phone.call("thread/resume", {"threadId": thread})
    await phone.run_turn(thread, "from the phone")
    request = upstream.model_requests()[-1]
    assert request.originator == "codex_ios" and "from the desktop" in str(request.body["input"])
    stored = await database_sync_to_async(
        lambda: list(StoredTurn.objects.filter(thread__thread_id=thread).order_by("started_at_ms").values_list("originator", flat=True))
    )()
    assert stored == ["codex_vscode", "codex_ios"]


async def test_two_turn_starts_back_to_back_on_an_ephemeral_thread_run_one(connect, upstream, monkeypatch):
    hub_type = type(thread_hub())
    ensure_started = hub_type.ensure_started

    async def slower(self):  # a moment between the check and the claim, as on a busy server
        await asyncio.sleep(0.01)
        await ensure_started(self)

    monkeypatch.setattr(hub_type, "ensure_started", slower)
    client = await connect()
    await client.initialize("codex_ios", "1.4.0")
    thread = await client.start_thread(ephemeral=True)
    for request_id in ("a", "b"):
        await client.send({"id": request_id, "method": "turn/start", "params": {"threadId": thread, "input": [{"type": "text", "text": "slow:20"}]}})
    replies = [await client.wait_for(lambda m, wanted=wanted: m.get("id") == wanted) for wanted in ("a", "b")]
    assert ["result" in reply for reply in replies] == [True, False]
    assert replies[1]["error"] == {"code": -32600, "message": "Turn already in progress"}
    completed = await client.notification("turn/completed", threadId=thread, timeout=10)
    assert completed["turn"]["id"] == replies[0]["result"]["turn"]["id"]
    assert (await client.run_turn(thread))["turn"]["status"] == "completed"  # and the thread is free after it


@pytest.mark.parametrize("cursor", ["²", "9" * 5000, "-1", "1.5", 7])
async def test_a_cursor_this_server_never_gave_is_invalid_params(connect, cursor):
    client = await connect()
    await client.initialize("codex_ios", "1.4.0")
    thread = await client.start_thread()
    for method, params in [("thread/list", {}), ("thread/turns/list", {"threadId": thread})]:
        error = (await client.request(method, {**params, "cursor": cursor}))["error"]
        assert error["code"] == -32602 and "cursor" in error["message"]


async def test_a_turn_end_the_database_fails_to_take_is_tried_again_and_told_once(connect, upstream, monkeypatch):
    # Issue 24, 1: one OperationalError at the end lost the turn, and the client heard two stories.
    from django.db import OperationalError

    from realtime.store.thread_store import DatabaseThreads
    from realtime.turns import runner as turn_runner

    monkeypatch.setattr(turn_runner, "END_RETRY_DELAYS", (0.05, 0.05, 0.05))
    finish, failures = DatabaseThreads.finish_turn, [OperationalError("database is locked")] * 2

    def flaky(thread, turn, first_new_item):
        if failures:
            raise failures.pop()
        return finish(thread, turn, first_new_item)

    monkeypatch.setattr(DatabaseThreads, "finish_turn", staticmethod(flaky))
    client = await connect()
    await client.initialize("codex_ios", "1.4.0")
    thread = await client.start_thread()
    completed = await client.run_turn(thread, "hi")
    assert completed["turn"]["status"] == "completed" and failures == []
    turns = (await client.call("thread/read", {"threadId": thread, "includeTurns": True}))["thread"]["turns"]
    assert [turn["status"] for turn in turns] == ["completed"]  # stored as told


async def test_a_turn_end_never_stored_is_not_announced_and_the_sweep_ends_it_once(connect, upstream, monkeypatch, settings):
    from django.db import OperationalError

    from realtime.store.thread_store import DatabaseThreads
    from realtime.turns import runner as turn_runner

    settings.CODEX_HEARTBEAT_INTERVAL, settings.CODEX_TURN_LOCK_SECONDS = 0.2, 1.0
    monkeypatch.setattr(turn_runner, "END_RETRY_DELAYS", (0.05,))

    def down(thread, turn, first_new_item):
        raise OperationalError("the database is down")

    monkeypatch.setattr(DatabaseThreads, "finish_turn", staticmethod(down))
    client = await connect()
    await client.initialize("codex_ios", "1.4.0")
    thread = await client.start_thread()
    await client.call("turn/start", {"threadId": thread, "input": [{"type": "text", "text": "hi"}]})
    ended = await client.notification("turn/completed", threadId=thread, timeout=10)
    assert ended["turn"]["status"] == "interrupted"  # what the store holds, told by the sweep
    await asyncio.sleep(1.0)
    assert not [m for m in client.inbox if m.get("method") == "turn/completed"]  # and told once


async def test_thread_start_without_cwd_works_after_the_servers_own_directory_was_deleted(
    connect, tmp_path, monkeypatch, settings
):
    """Issue 24, 9: the directory the server was started in, its default
    workspace, is gone (a deploy replaced it); a thread/start without cwd
    still answers."""
    gone = tmp_path / "release-1"
    gone.mkdir()
    monkeypatch.chdir(gone)
    settings.CODEX_WORKSPACE_ROOTS = [str(gone)]
    gone.rmdir()
    client = await connect()
    await client.initialize("codex_vscode")
    started = await client.request("thread/start", {})
    assert "result" in started, started


async def test_a_quiet_turn_whose_lock_cannot_be_extended_stops_when_its_lease_ends(connect, upstream, settings, caplog):
    """Issue 24, 2: the database stops answering (here: every row writer is
    held) while the model is quiet; the turn stops at its lease's end, not
    whenever an extension that never returns would have."""
    import threading

    from identity.actions import row_writers

    settings.CODEX_TURN_LOCK_SECONDS = 1.5
    client = await connect()
    await client.initialize("codex_ios", "1.4.0")
    thread = await client.start_thread()
    await client.call("turn/start", {"threadId": thread, "input": [{"type": "text", "text": "hang"}]})
    await client.notification("turn/started", threadId=thread)
    release = threading.Event()
    held = [asyncio.wrap_future(row_writers().submit(release.wait, 30)) for _ in range(row_writers()._max_workers)]
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.5 * 0.8 + 1.0  # the lease, and a margin
        while "could not extend its thread's lock in time; interrupting it" not in caplog.text:
            assert loop.time() < deadline, "the turn went on past its lease"
            await asyncio.sleep(0.05)
    finally:
        release.set()
        await asyncio.gather(*held)
    ended = await client.notification("turn/completed", threadId=thread, timeout=10)
    assert ended["turn"]["status"] == "interrupted"

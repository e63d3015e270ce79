"""The app-server over the real ASGI application, against the recording upstream."""

import asyncio
import json

import pytest
from channels.db import database_sync_to_async

from identity.client_identity import process_default_identity
from identity.models import ConnectionIdentity
from tests.conftest import TEST_API_KEY
from tests.rpc_client import backend_then_ios

pytestmark = pytest.mark.django_db(transaction=True)

# channels' wrapper, unlike the async ORM, closes the thread's connection after use.
only_row = database_sync_to_async(ConnectionIdentity.objects.get)


# --- the seed's regression, on the wire ---------------------------------------


async def test_later_client_is_not_labelled_as_the_first_one(connect, upstream):
    backend, ios = await backend_then_ios(connect)

    ios_thread = await ios.start_thread()
    backend_thread = await backend.start_thread()
    assert (await ios.run_turn(ios_thread))["turn"]["status"] == "completed"
    assert (await backend.run_turn(backend_thread))["turn"]["status"] == "completed"

    by_thread = {r.headers["session-id"]: r for r in upstream.model_requests()}
    ios_request, backend_request = by_thread[ios_thread], by_thread[backend_thread]
    assert ios_request.originator == "codex_ios"
    assert ios_request.user_agent.startswith("codex_ios/")
    assert ios_request.user_agent.endswith("(codex_ios; 1.4.0)")
    assert backend_request.originator == "codex_cli_rs"
    assert backend_request.user_agent.startswith("codex_cli_rs/")
    assert backend_request.user_agent.endswith("(codex-backend; 2.0.0)")


async def test_interleaved_turns_of_many_clients_each_carry_their_own_identity(connect, upstream):
    names = ["codex-backend", "codex_app_server_daemon"] + [f"client_{i}" for i in range(8)]
    clients = []
    for name in names:
        client = await connect()
        await client.initialize(name, "3.1.0")
        clients.append((name, client, await client.start_thread()))
    await asyncio.gather(*(client.run_turn(thread, "slow:3") for _, client, thread in clients))

    by_thread = {r.headers["session-id"]: r for r in upstream.model_requests()}
    for name, _, thread in clients:
        request = by_thread[thread]
        assert request.user_agent.endswith(f"({name}; 3.1.0)")
        expected = "codex_cli_rs" if name in ("codex-backend", "codex_app_server_daemon") else name
        assert request.originator == expected
        assert request.user_agent.startswith(expected + "/")


async def test_model_request_shape(connect, upstream):
    client = await connect()
    await client.initialize("codex_vscode", "0.9.0")
    thread = await client.start_thread(model="gpt-test", baseInstructions="Be brief.")
    await client.run_turn(thread, "first")
    await client.run_turn(thread, "second")
    first, second = upstream.model_requests()
    assert first.method == "POST" and first.path == "/v1/responses"
    assert first.headers["authorization"] == f"Bearer {TEST_API_KEY}"
    assert first.headers["session-id"] == first.headers["x-client-request-id"] == thread
    assert first.body["model"] == "gpt-test" and first.body["stream"] is True
    assert first.body["instructions"].startswith("Be brief.\n\n<environment_context>")  # the agent's, after the thread's
    assert first.body["input"] == [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "first"}]}]
    # The second turn replays the conversation so far.
    assert [item["role"] for item in second.body["input"]] == ["user", "assistant", "user"]
    assert second.body["input"][1]["content"][0]["text"] == "Hello world"


async def test_the_process_default_is_unchanged_after_a_hundred_clients_initialize(connect):
    before = process_default_identity()
    for i in range(100):
        client = await connect()
        await client.initialize(f"client_{i}", "1.0")
    assert process_default_identity() == before
    assert before.originator == "codex_cli_rs"


# --- turns --------------------------------------------------------------------


async def test_turn_streams_the_notifications_in_order(connect):
    client = await connect()
    await client.initialize("codex_ios", "1.4.0")
    thread = await client.start_thread()
    started = await client.call("turn/start", {"threadId": thread, "input": [{"type": "text", "text": "hi"}]})
    turn_id = started["turn"]["id"]
    assert started["turn"]["status"] == "inProgress"

    methods, deltas = [], []
    while True:
        message = await client.wait_for(lambda m: "method" in m)
        methods.append(message["method"])
        params = message["params"]
        if message["method"] == "item/agentMessage/delta":
            deltas.append(params["delta"])
            assert params["threadId"] == thread and params["turnId"] == turn_id
        if message["method"] == "item/completed" and params["item"]["type"] == "agentMessage":
            assert params["item"] == {"id": params["item"]["id"], "type": "agentMessage", "text": "Hello world", "phase": None}
        if message["method"] == "item/completed" and params["item"]["type"] == "userMessage":
            assert params["item"]["content"] == [{"type": "text", "text": "hi", "text_elements": []}]
        if message["method"] == "turn/completed":
            turn = params["turn"]
            assert (turn["id"], turn["status"], turn["error"]) == (turn_id, "completed", None)
            assert [item["type"] for item in turn["items"]] == ["userMessage", "agentMessage"]
            assert turn["durationMs"] >= 0 and turn["completedAt"] >= turn["startedAt"]
            break
    assert methods == [
        "thread/started",
        "turn/started",
        "thread/status/changed",
        "item/started",  # the user's message
        "item/completed",
        "item/started",  # the reply
        "item/agentMessage/delta",
        "item/agentMessage/delta",
        "item/completed",
        "turn/completed",
    ]
    assert deltas == ["Hello", " world"]


async def test_requests_are_answered_while_a_turn_streams(connect):
    client = await connect()
    await client.initialize("codex_ios", "1.4.0")
    thread = await client.start_thread()
    await client.call("turn/start", {"threadId": thread, "input": [{"type": "text", "text": "slow:20"}]})
    await client.notification("item/agentMessage/delta", threadId=thread)
    other = await client.start_thread()  # answered mid-stream
    assert other != thread
    busy = await client.request("turn/start", {"threadId": thread, "input": [{"type": "text", "text": "again"}]})
    assert busy["error"]["code"] == -32600 and busy["error"]["message"].startswith("Turn already in progress")


async def test_interrupt_ends_the_turn_and_closes_the_upstream_stream(connect, upstream):
    client = await connect()
    await client.initialize("codex_ios", "1.4.0")
    thread = await client.start_thread()
    turn = (await client.call("turn/start", {"threadId": thread, "input": [{"type": "text", "text": "slow:100"}]}))["turn"]
    await client.notification("item/agentMessage/delta", threadId=thread)
    assert await client.call("turn/interrupt", {"threadId": thread, "turnId": turn["id"]}) == {}
    completed = await client.notification("turn/completed", threadId=thread)
    assert (completed["turn"]["id"], completed["turn"]["status"]) == (turn["id"], "interrupted")
    await upstream.await_for(lambda records: any(r.kind == "closed" for r in records), timeout=1.0)
    # The thread takes a new turn afterwards.
    assert (await client.run_turn(thread))["turn"]["status"] == "completed"


async def test_interrupt_of_a_turn_that_is_not_running_is_invalid_params(connect):
    client = await connect()
    await client.initialize("codex_ios", "1.4.0")
    thread = await client.start_thread()
    response = await client.request("turn/interrupt", {"threadId": thread, "turnId": "nope"})
    assert response["error"]["code"] == -32602


async def test_disconnect_cancels_the_turn_and_closes_the_upstream_stream(connect, upstream):
    client = await connect()
    await client.initialize("codex_ios", "1.4.0")
    thread = await client.start_thread()
    await client.call("turn/start", {"threadId": thread, "input": [{"type": "text", "text": "slow:100"}]})
    await client.notification("item/agentMessage/delta", threadId=thread)
    await client.communicator.disconnect()
    await upstream.await_for(lambda records: any(r.kind == "closed" for r in records), timeout=1.0)


async def test_notifications_the_client_opted_out_of_are_never_sent(connect):
    client = await connect()
    await client.initialize("codex_ios", "1.4.0", optOutNotificationMethods=["item/agentMessage/delta", "thread/started"])
    thread = await client.start_thread()
    await client.run_turn(thread)
    seen = [m.get("method") for m in client.inbox]
    assert "item/agentMessage/delta" not in seen and "thread/started" not in seen
    assert "item/completed" in seen


async def test_real_client_shaped_params_are_accepted(connect):
    client = await connect()
    await client.initialize("codex_vscode", "0.50.0")
    thread = await client.call(
        "thread/start",
        {
            "model": None,
            "modelProvider": None,
            "cwd": "/home/dev/project",
            "approvalPolicy": "on-request",
            "sandbox": "workspace-write",
            "config": {"model_reasoning_effort": "high"},
            "baseInstructions": None,
            "developerInstructions": None,
            "experimentalRawEvents": False,
        },
    )
    thread_id = thread["thread"]["id"]
    result = await client.call(
        "turn/start",
        {
            "threadId": thread_id,
            "input": [{"type": "text", "text": "hello", "text_elements": []}],
            "cwd": "/home/dev/project",
            "approvalPolicy": "never",
            "sandboxPolicy": {"type": "workspaceWrite", "networkAccess": False},
            "model": "gpt-5-codex",
            "effort": "medium",
            "summary": "auto",
        },
    )
    assert result["turn"]["status"] == "inProgress"
    assert (await client.notification("turn/completed", threadId=thread_id))["turn"]["status"] == "completed"


# --- telemetry after thread/start ---------------------------------------------


async def test_thread_started_telemetry_is_sent_after_the_reply_under_the_connection_identity(connect, upstream):
    backend, ios = await backend_then_ios(connect)
    ios_thread = await ios.start_thread()
    backend_thread = await backend.start_thread()
    records = await upstream.await_for(lambda rs: len([r for r in rs if r.path.endswith("/events")]) >= 2)
    events = {r.body["events"][0]["event_params"]["thread_id"]: r for r in records if r.path.endswith("/events")}
    ios_event = events[ios_thread]
    assert ios_event.originator == "codex_ios" and ios_event.user_agent.endswith("(codex_ios; 1.4.0)")
    assert "authorization" not in ios_event.headers
    assert ios_event.body["events"][0] == {
        "event_type": "codex_thread_started",
        "event_params": {"product_client_id": "codex_ios", "client_version": "1.4.0", "thread_id": ios_thread, "turn_id": None},
    }
    assert events[backend_thread].originator == "codex_cli_rs"
    assert events[backend_thread].body["events"][0]["event_params"]["product_client_id"] == "codex_cli_rs"


# --- bad input: every row of the error table ----------------------------------


async def test_requests_before_initialize_are_refused(connect):
    client = await connect()
    response = await client.request("thread/start", {})
    assert response["error"] == {"code": -32600, "message": "Not initialized"}
    await client.initialize("codex_ios", "1")  # still usable


async def test_second_initialize_is_refused(connect):
    client = await connect()
    await client.initialize("codex_ios", "1")
    response = await client.request("initialize", {"clientInfo": {"name": "codex_vscode", "version": "1"}})
    assert response["error"]["code"] == -32600 and response["error"]["message"].startswith("Already initialized")


@pytest.mark.parametrize("field", ["name", "version"])
@pytest.mark.parametrize("value", ["bad\r\nX-Injected: 1", "tab\there", "nul\x00", "del\x7f", "é", " lead", "trail ", "", "x" * 257])
async def test_invalid_client_info_is_refused_stores_nothing_and_allows_a_retry(connect, field, value):
    client = await connect()
    client_info = {"name": "codex_ios", "version": "1.0.0", field: value}
    response = await client.request("initialize", {"clientInfo": client_info})
    assert response["error"] == {
        "code": -32600,
        "message": f"Invalid clientInfo.{field}: '{value}'. Must be a valid HTTP header value.",
    }
    row = await only_row()
    assert row.initialized_at is None and row.client_name == "" and row.user_agent == ""
    await client.initialize("codex_ios", "1.0.0")
    row = await only_row()
    assert row.client_name == "codex_ios"


async def test_non_json_and_binary_frames_are_parse_errors_and_the_connection_stays(connect):
    client = await connect()
    await client.send_raw("{not json")
    assert (await client.receive())["error"]["code"] == -32700
    await client.communicator.send_to(bytes_data=b"\x00\x01")
    reply = await client.receive()
    assert reply["id"] is None and reply["error"]["code"] == -32700
    await client.initialize("codex_ios", "1")


async def test_unknown_method_and_wrong_param_types(connect):
    client = await connect()
    await client.initialize("codex_ios", "1")
    assert (await client.request("no/such/method", {}))["error"]["code"] == -32601
    bad = await client.request("thread/start", [1, 2])
    assert bad["error"]["code"] == -32602
    thread = await client.start_thread()
    cases = [
        ({"input": [{"type": "text", "text": "x"}]}, "threadId"),
        ({"threadId": 5, "input": []}, "threadId"),
        ({"threadId": thread}, "input"),
        ({"threadId": thread, "input": "hello"}, "input"),
        ({"threadId": thread, "input": [{"type": "text", "text": 5}]}, "input[0].text"),
        ({"threadId": thread, "input": [{"type": "mystery"}]}, "input[0].type"),
    ]
    for params, field in cases:
        error = (await client.request("turn/start", params))["error"]
        assert error["code"] == -32602 and field in error["message"], (params, error)
    assert (await client.request("initialize", {"clientInfo": "x"}))["error"]["code"] == -32600  # already initialized
    assert (await client.run_turn(thread))["turn"]["status"] == "completed"


async def test_wrong_initialize_param_types_are_invalid_params(connect):
    client = await connect()
    for params in [None, {"clientInfo": "codex"}, {"clientInfo": {"name": 5, "version": "1"}}, {"clientInfo": {"name": "a"}}]:
        error = (await client.request("initialize", params))["error"]
        assert error["code"] == -32602, params
    await client.initialize("codex_ios", "1")


async def test_another_connections_thread_is_unknown(connect):
    owner = await connect()
    await owner.initialize("codex_ios", "1")
    thread = await owner.start_thread()
    intruder = await connect()
    await intruder.initialize("codex_vscode", "1")
    for method, params in [
        ("turn/start", {"threadId": thread, "input": [{"type": "text", "text": "x"}]}),
        ("turn/interrupt", {"threadId": thread, "turnId": "t"}),
    ]:
        error = (await intruder.request(method, params))["error"]
        assert error == {"code": -32602, "message": "Invalid params: unknown threadId"}


async def test_odd_ids_are_echoed_or_refused_without_closing(connect):
    client = await connect()
    await client.initialize("codex_ios", "1")
    huge = 10**30
    await client.send({"id": huge, "method": "nope"})
    assert (await client.receive())["id"] == huge
    await client.send({"id": "str-id", "method": "nope"})
    assert (await client.receive())["id"] == "str-id"
    await client.send_raw('{"id": 1.5, "method": "thread/start"}')
    assert (await client.receive()) == {"id": None, "error": {"code": -32600, "message": "Invalid request: id must be a string or an integer"}}
    assert await client.start_thread()


async def test_oversized_frame_closes_only_that_connection(connect):
    victim = await connect()
    bystander = await connect()
    await bystander.initialize("codex_ios", "1")
    await victim.send_raw("x" * (1024 * 1024 + 1))
    closed = await victim.communicator.receive_output(timeout=2)
    assert closed == {"type": "websocket.close", "code": 1009}
    assert await bystander.start_thread()


# --- ConnectionIdentity lifecycle ----------------------------------------------


async def test_row_lifecycle_and_no_secret_in_the_database(connect):
    client = await connect()
    row = await only_row()
    assert row.connected_at and row.initialized_at is None and row.disconnected_at is None
    await client.initialize("codex-backend", "2.0.0", experimentalApi=True)
    row = await only_row()
    assert (row.client_name, row.client_title, row.client_version) == ("codex-backend", "Codex-Backend", "2.0.0")
    assert row.originator == "codex_cli_rs" and row.is_infrastructure and row.is_first_party
    assert row.user_agent.endswith("(codex-backend; 2.0.0)")
    assert row.capabilities == {"experimentalApi": True}
    assert row.initialized_at is not None
    thread = await client.start_thread()
    await client.run_turn(thread)
    await client.communicator.disconnect()
    row = await only_row()
    assert row.disconnected_at is not None
    dumped = json.dumps(await database_sync_to_async(lambda: list(ConnectionIdentity.objects.values()))(), default=str)
    assert TEST_API_KEY not in dumped

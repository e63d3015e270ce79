"""Every method a Codex client calls (PROTOCOL §8), with the params the Codex
TUI 0.169.0 sends (recorded from its frames). The autouse schema fixture
checks every result and notification against the Codex schema."""

from __future__ import annotations

import pytest
from channels.db import database_sync_to_async

from identity.principals import local_principal
from realtime.store import turn_writes
from realtime.store.thread_store import DatabaseThreads
from realtime.store.threads import ItemRecord, Turn, new_id, now_ms
from tests.conftest import TEST_API_KEY
from tests.wire_schema import known_request_methods

pytestmark = pytest.mark.django_db(transaction=True)

TUI = ("codex-tui", "0.169.0")
CWD = "/home/someone/project"

# The Codex TUI's start-up calls, in its order, with its params.
STARTUP_CALLS = [
    ("account/read", {}),
    ("model/list", {"modelProvider": None, "cursor": None, "limit": None, "includeHidden": True}),
    ("hooks/list", {"cwds": [CWD], "threadId": None}),
    ("account/bedrock/checkGovCloudRequirements", {}),
    ("config/read", {"includeLayers": True, "cwd": "."}),
    ("configRequirements/read", None),
    ("collaborationMode/list", {}),
]
THREAD_START = {
    "model": None, "modelProvider": None, "cwd": None, "runtimeWorkspaceRoots": None, "approvalPolicy": None,
    "approvalsReviewer": None, "sandbox": "read-only", "permissions": None, "config": {}, "serviceName": None,
    "baseInstructions": None, "developerInstructions": None, "personality": None, "multiAgentMode": None,
    "ephemeral": False,
}
THREAD_LIST = {
    "currentAccountOnly": True, "cursor": None, "limit": 100, "excludedThreadIds": None, "sortKey": "section_position",
    "sortDirection": None, "modelProviders": [], "sourceKinds": ["exec", "appServer"], "originators": None,
    "archived": False, "cwd": None, "useStateDbOnly": True, "searchTerm": None, "parentThreadId": None,
    "ancestorThreadId": None, "attachedToThreadId": None,
}


def tui_turn(thread_id: str, text: str, **extra) -> dict:
    return {
        "threadId": thread_id, "disabledPluginIds": None, "clientUserMessageId": "5405b255-6a91-46e4-8ab8-e4d87c9feb68",
        "input": [{"type": "text", "text": text, "text_elements": []}], "turnTrigger": "user", "parentTurnId": None,
        "cwd": CWD, "runtimeWorkspaceRoots": [], "approvalPolicy": "never", "model": "gpt-5-codex",
        "serviceTier": "default", "effort": None, "summary": None, "personality": None, "outputSchema": None,
        "collaborationMode": {"mode": "default", "settings": {"model": "gpt-5-codex", "reasoning_effort": None, "developer_instructions": None}},
        **extra,
    }


async def run_tui_turn(client, thread_id: str, text: str, **extra) -> dict:
    turn_id = (await client.call("turn/start", tui_turn(thread_id, text, **extra)))["turn"]["id"]
    done = lambda m: m.get("method") == "turn/completed" and m["params"]["turn"]["id"] == turn_id  # noqa: E731
    return (await client.wait_for(done))["params"]


async def test_every_method_of_protocol_section_8_is_known_to_the_schema_and_answered(connect):
    client = await connect()
    await client.initialize(*TUI)
    section_8 = [
        "account/read", "model/list", "config/read", "configRequirements/read", "hooks/list", "skills/list",
        "plugin/installed", "collaborationMode/list", "account/bedrock/checkGovCloudRequirements", "thread/goal/get",
        "thread/backgroundTerminals/list", "thread/list", "thread/read", "thread/turns/list", "thread/items/list",
        "thread/loaded/list", "thread/resume", "thread/unsubscribe", "thread/readState/update",
    ]
    assert set(section_8) <= known_request_methods()
    for method in section_8:
        response = await client.request(method, {"threadId": "x", "expectedRevision": "0", "operation": {"type": "read"}})
        assert response.get("error", {}).get("code") != -32601, method


async def test_the_tui_start_up_sequence_is_answered_with_schema_valid_results(connect, settings):
    settings.CODEX_MODEL = "gpt-5-codex"
    settings.CODEX_MODELS = ["gpt-5", "gpt-5-codex", "gpt-5-mini"]
    client = await connect()
    initialized = await client.initialize(*TUI, experimentalApi=True, optOutNotificationMethods=None)
    assert initialized["codexHome"].startswith("/")
    assert initialized["userAgent"].endswith("(codex-tui; 0.169.0)")
    results = {method: await client.call(method, params) for method, params in STARTUP_CALLS}

    assert results["account/read"] == {"account": None, "requiresOpenaiAuth": False}
    models = results["model/list"]["data"]
    assert [m["id"] for m in models] == ["gpt-5-codex", "gpt-5", "gpt-5-mini"]
    assert [m["isDefault"] for m in models] == [True, False, False]
    assert results["hooks/list"]["data"] == [{"cwd": CWD, "hooks": [], "errors": [], "warnings": []}]
    assert results["account/bedrock/checkGovCloudRequirements"] == {"isGovCloud": False, "shouldWarn": False}
    config = results["config/read"]
    assert config["config"]["model"] == "gpt-5-codex" and config["config"]["model_provider"] == "openai"
    assert TEST_API_KEY not in str(config)
    assert results["configRequirements/read"] == {"requirements": None}
    assert results["collaborationMode/list"]["data"][0]["mode"] == "default"

    assert await client.call("skills/list", {"cwds": [CWD], "forceReload": True}) == {
        "data": [{"cwd": CWD, "skills": [], "errors": []}]
    }
    assert (await client.call("plugin/installed", {"cwds": [CWD], "installSuggestionPluginNames": None}))["marketplaces"] == []


async def test_thread_start_answers_the_full_thread_and_announces_it(connect):
    client = await connect()
    await client.initialize(*TUI)
    started = await client.call("thread/start", {**THREAD_START, "cwd": CWD})
    thread = started["thread"]
    assert (started["model"], started["modelProvider"], started["cwd"]) == ("gpt-5-codex", "openai", CWD)
    # what the TUI asked for (read-only), and Codex's default approval policy
    assert started["approvalPolicy"] == "on-request" and started["sandbox"] == {"type": "readOnly", "networkAccess": False}
    assert thread["status"] == {"type": "idle"} and thread["turns"] == [] and thread["originator"] == "codex-tui"
    assert (await client.notification("thread/started"))["thread"]["id"] == thread["id"]


async def test_a_turn_is_stored_and_read_back_by_read_turns_and_items(connect):
    client = await connect()
    await client.initialize(*TUI)
    thread_id = (await client.call("thread/start", THREAD_START))["thread"]["id"]
    completed = await run_tui_turn(client, thread_id, "hello there")
    assert completed["turn"]["status"] == "completed"
    status_changes = [await client.notification("thread/status/changed", threadId=thread_id) for _ in range(2)]
    assert [s["status"]["type"] for s in status_changes] == ["active", "idle"]

    read = (await client.call("thread/read", {"threadId": thread_id, "includeTurns": True}))["thread"]
    assert read["preview"] == "hello there"
    [turn] = read["turns"]
    assert [(i["type"], i.get("text")) for i in turn["items"]] == [("userMessage", None), ("agentMessage", "Hello world")]
    assert turn["items"][0]["content"] == [{"type": "text", "text": "hello there", "text_elements": []}]
    assert (await client.call("thread/read", {"threadId": thread_id}))["thread"]["turns"] == []

    turns = await client.call("thread/turns/list", {"threadId": thread_id, "cursor": None, "limit": 1, "sortDirection": None, "itemsView": None})
    assert [t["id"] for t in turns["data"]] == [turn["id"]] and turns["nextCursor"] is None

    items = await client.call("thread/items/list", {"threadId": thread_id, "limit": 1})
    assert items["data"][0]["item"]["type"] == "userMessage" and items["data"][0]["turnId"] == turn["id"]
    rest = await client.call("thread/items/list", {"threadId": thread_id, "cursor": items["nextCursor"]})
    assert [e["item"]["text"] for e in rest["data"]] == ["Hello world"] and rest["nextCursor"] is None


async def test_resume_and_read_give_the_newest_hundred_turns_and_the_rest_page_by_their_place(connect):
    """Issue 24, 3: one frame never carries an unbounded history; paging a
    long thread's turns goes by their place in it, in the database."""
    client = await connect()
    await client.initialize(*TUI)
    thread_id = (await client.call("thread/start", THREAD_START))["thread"]["id"]
    principal = await database_sync_to_async(local_principal)()
    thread, _ = await DatabaseThreads.load(thread_id, principal.pk)
    turn_ids = []
    for _ in range(103):
        turn = Turn(new_id(), originator="codex-tui", connection_id=str(new_id()))
        turn.items.append(ItemRecord({"id": new_id(), "type": "userMessage", "content": []}, now_ms(), now_ms()))
        turn.finish("completed", None)
        start = turn_writes.BeginTurn(thread, turn, None, 30, 1 << 20, None)
        end = turn_writes.FinishTurn(thread, turn, 1)
        await database_sync_to_async(turn_writes.write_turns)([start])
        await database_sync_to_async(turn_writes.write_turns)([end])
        turn_ids.append(turn.id)

    resumed = await client.call("thread/resume", {"threadId": thread_id})
    assert [turn["id"] for turn in resumed["thread"]["turns"]] == turn_ids[3:]  # the newest, oldest first
    read = await client.call("thread/read", {"threadId": thread_id, "includeTurns": True})
    assert len(read["thread"]["turns"]) == 100 and read["thread"]["turns"][0]["items"][0]["type"] == "userMessage"
    paged, cursor = [], None
    while True:
        page = await client.call("thread/turns/list", {"threadId": thread_id, "cursor": cursor, "limit": 40, "itemsView": "notLoaded"})
        paged += [turn["id"] for turn in page["data"]]
        if (cursor := page["nextCursor"]) is None:
            break
    assert paged == turn_ids[::-1]


async def test_thread_list_is_newest_first_pages_and_filters_by_originator(connect):
    tui, ios = await connect(), await connect()
    await tui.initialize(*TUI)
    await ios.initialize("codex_ios", "1.4.0")
    older = (await tui.call("thread/start", THREAD_START))["thread"]["id"]
    await run_tui_turn(tui, older, "older")
    newer = (await ios.call("thread/start", {}))["thread"]["id"]
    await ios.run_turn(newer, "newer")

    listed = [t["id"] for t in (await tui.call("thread/list", THREAD_LIST))["data"]]
    assert listed.index(newer) < listed.index(older)
    only_tui = await tui.call("thread/list", {**THREAD_LIST, "originators": ["codex-tui"]})
    assert older in [t["id"] for t in only_tui["data"]] and newer not in [t["id"] for t in only_tui["data"]]
    first = await tui.call("thread/list", {**THREAD_LIST, "limit": 1})
    assert len(first["data"]) == 1 and first["nextCursor"] is not None
    second = await tui.call("thread/list", {**THREAD_LIST, "limit": 1, "cursor": first["nextCursor"]})
    assert second["data"][0]["id"] != first["data"][0]["id"]


async def test_a_resumed_thread_runs_turns_as_the_resuming_client_and_every_subscriber_sees_them(connect, upstream):
    tui, ios = await connect(), await connect()
    await tui.initialize(*TUI)
    await ios.initialize("codex_ios", "1.4.0")
    thread_id = (await tui.call("thread/start", THREAD_START))["thread"]["id"]
    await run_tui_turn(tui, thread_id, "first, from the terminal")

    refused = await ios.request("turn/start", tui_turn(thread_id, "not subscribed yet"))
    assert refused["error"]["code"] == -32602
    resumed = await ios.call("thread/resume", {"threadId": thread_id})
    assert [t["status"] for t in resumed["thread"]["turns"]] == ["completed"]
    assert thread_id in (await ios.call("thread/loaded/list", {"cursor": None, "limit": None}))["data"]

    await ios.run_turn(thread_id, "second, from the phone")
    phone_message = lambda m: m.get("method") == "item/completed" and "from the phone" in str(m["params"]["item"])  # noqa: E731
    assert (await tui.wait_for(phone_message))["params"]["threadId"] == thread_id  # the terminal saw the phone's turn

    phone_request = upstream.model_requests()[-1]
    assert phone_request.originator == "codex_ios" and phone_request.user_agent.endswith("(codex_ios; 1.4.0)")
    assert "first, from the terminal" in str(phone_request.body["input"])  # the history came along
    turns = (await tui.call("thread/read", {"threadId": thread_id, "includeTurns": True}))["thread"]["turns"]
    assert len(turns) == 2

    assert await ios.call("thread/unsubscribe", {"threadId": thread_id}) == {"status": "unsubscribed"}
    assert await ios.call("thread/unsubscribe", {"threadId": thread_id}) == {"status": "notSubscribed"}
    assert await ios.call("thread/unsubscribe", {"threadId": "no-such-thread"}) == {"status": "notLoaded"}


async def test_ephemeral_threads_are_not_listed_and_are_forgotten_when_left(connect, upstream):
    client = await connect()
    await client.initialize(*TUI)
    thread_id = (await client.call("thread/start", {**THREAD_START, "ephemeral": True}))["thread"]["id"]
    schema = {"type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"], "additionalProperties": False}
    await run_tui_turn(client, thread_id, "title this", outputSchema=schema)
    assert upstream.model_requests()[-1].body["text"]["format"]["schema"] == schema
    assert thread_id not in [t["id"] for t in (await client.call("thread/list", THREAD_LIST))["data"]]
    assert await client.call("thread/unsubscribe", {"threadId": thread_id}) == {"status": "unsubscribed"}
    assert (await client.request("thread/read", {"threadId": thread_id}))["error"]["code"] == -32602


async def test_read_state_goal_and_terminals(connect):
    client = await connect()
    await client.initialize(*TUI)
    thread_id = (await client.call("thread/start", THREAD_START))["thread"]["id"]
    first = await client.call("thread/readState/update", {"threadId": thread_id, "expectedRevision": "0", "operation": {"type": "read"}})
    second = await client.call("thread/readState/update", {"threadId": thread_id, "expectedRevision": first["readState"]["revision"], "operation": {"type": "unread"}})
    assert int(second["readState"]["revision"]) > int(first["readState"]["revision"])
    assert await client.call("thread/goal/get", {"threadId": thread_id}) == {"goal": None}
    assert await client.call("thread/backgroundTerminals/list", {"threadId": thread_id}) == {"data": [], "nextCursor": None}


async def test_a_failed_turn_sends_the_error_notification_before_turn_completed(connect):
    client = await connect()
    await client.initialize(*TUI)
    thread_id = (await client.call("thread/start", THREAD_START))["thread"]["id"]
    await client.call("turn/start", tui_turn(thread_id, "fail:401"))
    error = await client.wait_for(lambda m: m.get("method") in ("error", "turn/completed"))
    assert error["method"] == "error"
    assert error["params"]["willRetry"] is False
    assert error["params"]["error"]["codexErrorInfo"] == "unauthorized"
    completed = await client.notification("turn/completed", threadId=thread_id)
    assert completed["turn"]["status"] == "failed" and completed["turn"]["error"] == error["params"]["error"]


async def test_realtime_start_takes_the_schema_transport_and_sends_the_answer_sdp(connect, upstream):
    client = await connect()
    await client.initialize(*TUI)
    thread_id = (await client.call("thread/start", THREAD_START))["thread"]["id"]
    offer = "v=0\r\no=codex-tui\r\n"
    result = await client.call(
        "thread/realtime/start", {"threadId": thread_id, "outputModality": "audio", "transport": {"type": "webrtc", "sdp": offer}}
    )
    assert result["callId"]
    assert (await client.notification("thread/realtime/sdp", threadId=thread_id))["sdp"] == result["sdp"]
    assert upstream.requests("/v1/realtime/calls")[-1].body == offer
    refused = await client.request("thread/realtime/start", {"threadId": thread_id, "outputModality": "audio", "transport": {"type": "websocket"}})
    assert refused["error"]["code"] in (-32600, -32602)
    assert await client.call("thread/realtime/stop", {"threadId": thread_id}) == {}

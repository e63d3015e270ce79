"""Recorded Responses API streams (../shared/fixtures/responses/) replayed by the
recording upstream over SSE and over the Responses WebSocket: what a client
receives for each (PROTOCOL §10). Every notification also passes the schema."""

from __future__ import annotations

import time

import pytest

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.parametrize("transport", ["sse", "websocket"])]

ENCRYPTED_IN_DONE = 13_688  # the azure fixture's encrypted_content in output_item.done


@pytest.fixture
async def client(connect, settings, transport):
    settings.CODEX_RESPONSES_TRANSPORT = transport
    client = await connect()
    await client.initialize("codex_ios", "1.4.0")
    return client


async def run_collecting(client, thread: str, text: str, timeout: float = 10.0) -> tuple[list[dict], dict]:
    """Every notification of one turn, and its turn/completed params."""
    turn_id = (await client.call("turn/start", {"threadId": thread, "input": [{"type": "text", "text": text}]}))["turn"]["id"]
    seen = []
    while True:
        message = await client.wait_for(lambda m: "method" in m and (m["params"].get("turnId") == turn_id or m["params"].get("turn", {}).get("id") == turn_id), timeout)
        seen.append(message)
        if message["method"] == "turn/completed":
            return seen, message["params"]


def of(seen: list[dict], method: str) -> list[dict]:
    return [m["params"] for m in seen if m["method"] == method]


def completed_items(seen: list[dict], kind: str) -> list[dict]:
    return [p["item"] for p in of(seen, "item/completed") if p["item"]["type"] == kind]


def usage(seen: list[dict]) -> dict:
    [update] = of(seen, "thread/tokenUsage/updated")
    return update["tokenUsage"]["last"]


async def test_phase_fixture_two_messages_with_their_phases_and_usage(client):
    seen, done = await run_collecting(client, await client.start_thread(), "fixture:openai-phase.1")
    assert done["turn"]["status"] == "completed"
    messages = completed_items(seen, "agentMessage")
    assert [(m["text"], m["phase"]) for m in messages] == [
        ("I'm going to search for that", "commentary"),
        ("The capital of France is Paris.", "final_answer"),
    ]
    assert [p["delta"] for p in of(seen, "item/agentMessage/delta")] == ["I'm going to", " search for that", "The capital", " of France is Paris."]
    assert usage(seen) == {"inputTokens": 50, "cachedInputTokens": 0, "outputTokens": 100, "reasoningOutputTokens": 20, "totalTokens": 150}


async def test_minimal_recorded_reply_and_its_usage(client):
    seen, done = await run_collecting(client, await client.start_thread(), "fixture:issue-20047-openai-responses")
    assert done["turn"]["status"] == "completed"
    assert [m["text"] for m in completed_items(seen, "agentMessage")] == ["OK"]
    assert usage(seen) == {"inputTokens": 12, "cachedInputTokens": 0, "outputTokens": 2, "reasoningOutputTokens": 0, "totalTokens": 14}


async def test_reasoning_with_six_summary_parts_is_streamed_and_replayed_next_turn(client, upstream):
    thread = await client.start_thread()
    seen, done = await run_collecting(client, thread, "fixture:azure-gpt5-reasoning-multi-summary-with-encryption")
    assert done["turn"]["status"] == "completed"
    assert [p["summaryIndex"] for p in of(seen, "item/reasoning/summaryPartAdded")] == [0, 1, 2, 3, 4, 5]
    deltas = of(seen, "item/reasoning/summaryTextDelta")
    assert len(deltas) == 18 and {d["summaryIndex"] for d in deltas} == set(range(6))
    [reasoning] = completed_items(seen, "reasoning")
    assert len(reasoning["summary"]) == 6 and reasoning["summary"][0].startswith("**Anonymized summary 0**")
    [reply] = completed_items(seen, "agentMessage")
    # The stream sent "X"; the done item says what the model finally said.
    assert [p["delta"] for p in of(seen, "item/agentMessage/delta")] == ["X"]
    assert (reply["text"], reply["phase"]) == ("Anonymized assistant response text.", "final_answer")
    assert usage(seen) == {"inputTokens": 100, "cachedInputTokens": 0, "outputTokens": 500, "reasoningOutputTokens": 300, "totalTokens": 600}

    await run_collecting(client, thread, "and then?")
    body = upstream.model_requests()[-1].body
    assert body["store"] is False and body["include"] == ["reasoning.encrypted_content"]
    [replayed] = [item for item in body["input"] if item.get("type") == "reasoning"]
    assert len(replayed["encrypted_content"]) == ENCRYPTED_IN_DONE and "id" not in replayed
    assert len(replayed["summary"]) == 6


async def test_a_tool_loop_recording_calls_a_tool_we_lack_and_the_loop_goes_on(client):
    seen, done = await run_collecting(client, await client.start_thread(), "fixture:openai-reasoning-encrypted-content.1")
    assert done["turn"]["status"] == "completed"
    [reasoning] = completed_items(seen, "reasoning")
    assert reasoning["summary"][0].startswith("**Calculating step-by-step using calculator**")
    # its calculator call got an output, and the (scripted) model answered with it
    [reply] = completed_items(seen, "agentMessage")
    assert reply["text"] == "got: unsupported call: calculator is not a tool of this server"
    assert usage(seen)["totalTokens"] == 162  # the one response that reported usage


async def test_web_search_recording_shows_each_search_and_replays_it_next_turn(client, upstream):
    thread = await client.start_thread()
    seen, done = await run_collecting(client, thread, "fixture:openai-web-search-tool.1")
    assert done["turn"]["status"] == "completed"
    [reply] = completed_items(seen, "agentMessage")
    assert reply["text"].startswith("Here’s what’s notable in Berlin today") and "–" in reply["text"]
    assert len(completed_items(seen, "reasoning")) == 5
    # The hosted tool's four searches are webSearch items: empty while running, then what was searched.
    started = [p["item"] for p in of(seen, "item/started") if p["item"]["type"] == "webSearch"]
    assert len(started) == 4 and all(item["query"] == "" and item["action"] is None for item in started)
    searches = completed_items(seen, "webSearch")
    assert [item["id"] for item in searches] == [item["id"] for item in started]
    assert searches[0]["query"] == "Berlin news today"
    assert searches[0]["action"] == {"type": "search", "query": "Berlin news today", "queries": None}
    assert usage(seen) == {"inputTokens": 60093, "cachedInputTokens": 34560, "outputTokens": 4080, "reasoningOutputTokens": 3648, "totalTokens": 64173}
    # The searches are offered (as Codex 0.169.0 offers them), and replayed without what they found.
    body = upstream.model_requests()[-1].body
    assert {"type": "web_search", "external_web_access": False} in body["tools"]
    await run_collecting(client, thread, "and then?")
    replayed = [item for item in upstream.model_requests()[-1].body["input"] if item.get("type") == "web_search_call"]
    assert len(replayed) == 4
    assert replayed[0] == {"type": "web_search_call", "status": "completed", "action": {"type": "search", "query": "Berlin news today"}}
    read = await client.call("thread/read", {"threadId": thread, "includeTurns": True})
    read_items = read["thread"]["turns"][0]["items"]
    assert [item for item in read_items if item["type"] == "webSearch"] == searches


@pytest.mark.parametrize(
    "fixture, info, message_start",
    [
        ("openai-error.1", "usageLimitExceeded", "You exceeded your current quota"),
        ("openai-response-failed-only.1", "rateLimitExceeded", "Request too large for gpt-4o-mini"),
    ],
)
async def test_recorded_failures_map_to_their_codex_error(client, upstream, fixture, info, message_start):
    thread = await client.start_thread()
    seen, done = await run_collecting(client, thread, f"fixture:{fixture}")
    assert done["turn"]["status"] == "failed"
    assert done["turn"]["error"]["codexErrorInfo"] == info and done["turn"]["error"]["message"].startswith(message_start)
    [error] = of(seen, "error")
    assert error["willRetry"] is False and error["error"] == done["turn"]["error"]
    assert seen.index(next(m for m in seen if m["method"] == "error")) < seen.index(next(m for m in seen if m["method"] == "turn/completed"))
    assert len([r for r in upstream.model_requests() if r.headers["session-id"] == thread]) == 1  # not retried


async def test_an_in_stream_server_error_before_any_output_is_retried_and_announced(client, upstream, settings):
    thread = await client.start_thread()
    seen, done = await run_collecting(client, thread, "fixture:openai-error-null-code.1")
    assert done["turn"]["status"] == "failed"
    assert [e["willRetry"] for e in of(seen, "error")] == [True, True, False]
    assert of(seen, "error")[0]["error"]["codexErrorInfo"] == "internalServerError"
    assert done["turn"]["error"]["codexErrorInfo"] == {"responseTooManyFailedAttempts": {"httpStatusCode": None}}
    assert len([r for r in upstream.model_requests() if r.headers["session-id"] == thread]) == 3

    seen, done = await run_collecting(client, thread, "instream:server_errorx1")
    assert done["turn"]["status"] == "completed"
    assert [e["willRetry"] for e in of(seen, "error")] == [True]


@pytest.mark.parametrize("reason", ["max_output_tokens", "content_filter"])
async def test_an_incomplete_response_ends_the_turn_at_once_keeping_its_text(client, reason):
    thread = await client.start_thread()
    started = time.monotonic()
    seen, done = await run_collecting(client, thread, f"incomplete:{reason}")
    assert time.monotonic() - started < 1.0  # the upstream keeps the stream open; the event ends the turn
    assert done["turn"]["status"] == "failed"
    assert done["turn"]["error"]["message"] == f"Incomplete response returned, reason: {reason}"
    [reply] = completed_items(seen, "agentMessage")
    assert reply["text"] == "partial text"
    [error] = of(seen, "error")
    assert error["willRetry"] is False
    # What the incomplete response was billed counts toward the thread's and the principal's usage.
    assert usage(seen)["totalTokens"] == 10


async def test_the_turns_usage_reaches_telemetry_under_the_turns_identity(client, upstream):
    thread = await client.start_thread()
    await run_collecting(client, thread, "fixture:issue-20047-openai-responses")
    def turn_completed(records):
        return [
            (record, event)
            for record in records
            if record.path.endswith("/analytics-events/events")
            for event in record.body["events"]
            if event["event_type"] == "codex_turn_completed" and event["event_params"]["thread_id"] == thread
        ]

    [(record, event)] = turn_completed(await upstream.await_for(turn_completed))
    assert event["event_params"]["token_usage"]["totalTokens"] == 14
    assert record.originator == "codex_ios"


async def test_message_items_without_ids_stay_apart_by_output_index(transport):
    from realtime.store.threads import Turn
    from realtime.turns.stream_events import TurnEventTranslator

    sent: list[tuple[str, dict]] = []
    translator = TurnEventTranslator("thread", Turn("turn", originator="o", connection_id="c"), lambda m, p: sent.append((m, p)))
    for index, text in ((0, "first"), (1, "second")):
        translator.feed({"type": "response.output_item.added", "output_index": index, "item": {"type": "message"}})
        translator.feed({"type": "response.output_text.delta", "output_index": index, "delta": text})
        translator.feed({"type": "response.output_item.done", "output_index": index, "item": {"type": "message"}})
    texts = [p["item"]["text"] for m, p in sent if m == "item/completed"]
    assert texts == ["first", "second"]

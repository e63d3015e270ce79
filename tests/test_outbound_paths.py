"""Every outbound path carries the owning connection's identity, proven on the wire."""

import asyncio

import pytest

from codexserver.devtools.server_process import free_port
from identity.client_identity import ClientIdentity
from identity.http_clients import close_client_factory
from realtime.services.telemetry import TelemetrySender, analytics_event
from tests.conftest import TEST_API_KEY
from tests.rpc_client import backend_then_ios
from tests.test_upstream_faults import FAULTS

pytestmark = pytest.mark.django_db(transaction=True)

INFRA = ("codex-backend", "codex_app_server_daemon")


def expected_originator(name: str) -> str:
    return "codex_cli_rs" if name in INFRA else name


VERSIONS = {"codex-backend": "2.0.0", "codex_ios": "1.4.0"}  # as backend_then_ios initializes them


def assert_identity(record, name: str, version: str | None = None) -> None:
    version = version or VERSIONS.get(name, "1.0.0")
    assert record.originator == expected_originator(name), record
    assert record.user_agent.startswith(expected_originator(name) + "/")
    assert record.user_agent.endswith(f"({name}; {version})")
    assert "user-agent" not in record.repeated_headers and "originator" not in record.repeated_headers


@pytest.fixture
def websocket_transport(settings):
    settings.CODEX_RESPONSES_TRANSPORT = "websocket"


# --- Responses over WebSocket ---------------------------------------------------


async def test_responses_websocket_handshakes_carry_each_owner_identity(connect, upstream, websocket_transport):
    backend, ios = await backend_then_ios(connect)
    backend_thread, ios_thread = await backend.start_thread(model="gpt-ws"), await ios.start_thread()
    results = await asyncio.gather(backend.run_turn(backend_thread, "slow:5"), ios.run_turn(ios_thread, "slow:5"))
    assert [r["turn"]["status"] for r in results] == ["completed", "completed"]

    handshakes = {r.headers["session-id"]: r for r in upstream.requests("/v1/responses", kind="ws")}
    assert_identity(handshakes[backend_thread], "codex-backend")
    assert_identity(handshakes[ios_thread], "codex_ios")
    for handshake in handshakes.values():
        assert handshake.headers["authorization"] == f"Bearer {TEST_API_KEY}"
        assert handshake.headers["openai-beta"] == "responses_websockets=2026-02-06"
        assert handshake.headers["x-client-request-id"] == handshake.headers["session-id"]
    [create] = [r.body for r in upstream.requests(kind="ws-message") if r.headers["session-id"] == backend_thread]
    assert create["type"] == "response.create" and create["model"] == "gpt-ws" and "stream" not in create


async def test_both_transports_produce_the_same_notifications(connect, settings):
    sequences = {}
    for transport in ("sse", "websocket"):
        settings.CODEX_RESPONSES_TRANSPORT = transport
        client = await connect()
        await client.initialize("codex_ios")
        thread = await client.start_thread()
        client.inbox.clear()
        await client.run_turn(thread, "slow:3")
        sequences[transport] = [
            (m["method"], m["params"].get("delta"), m["params"].get("item", {}).get("text"))
            for m in client.inbox
            if m.get("method", "").startswith(("turn/", "item/"))
        ]
    assert sequences["sse"] == sequences["websocket"]
    # turn/started, the user message's item/started + item/completed, the
    # reply's item/started, 3 deltas, item/completed (run_turn took turn/completed)
    assert len(sequences["sse"]) == 8


@pytest.mark.parametrize("text, expected", FAULTS.items(), ids=FAULTS.keys())
async def test_websocket_faults_map_like_sse_and_the_connection_stays_usable(connect, websocket_transport, text, expected):
    client = await connect()
    await client.initialize("codex_ios")
    thread = await client.start_thread()
    completed = await client.run_turn(thread, text)
    assert completed["turn"]["status"] == "failed"
    assert completed["turn"]["error"]["codexErrorInfo"] == expected
    assert (await client.run_turn(thread))["turn"]["status"] == "completed"


@pytest.mark.parametrize("status, expected", [(401, "unauthorized"), (403, "unauthorized"), (429, "usageLimitExceeded")])
async def test_websocket_handshake_refusals_map_to_codex_errors(connect, upstream, settings, websocket_transport, status, expected):
    settings.CODEX_API_BASE_URL = f"{upstream.url}/status/{status}/v1"
    client = await connect()
    await client.initialize("codex_ios")
    completed = await client.run_turn(await client.start_thread())
    assert completed["turn"]["error"]["codexErrorInfo"] == expected
    assert_identity(upstream.requests(f"/status/{status}/v1/responses")[0], "codex_ios", "1.0.0")


async def test_websocket_connection_refused(connect, settings, websocket_transport):
    settings.CODEX_API_BASE_URL = f"http://127.0.0.1:{free_port()}/v1"
    client = await connect()
    await client.initialize("codex_ios")
    completed = await client.run_turn(await client.start_thread())
    assert completed["turn"]["error"]["codexErrorInfo"] == {"responseStreamConnectionFailed": {"httpStatusCode": None}}


async def test_websocket_retries_a_5xx_with_a_fresh_socket_as_the_same_identity(connect, upstream, websocket_transport):
    client = await connect()
    await client.initialize("codex_ios")
    completed = await client.run_turn(await client.start_thread(), "fail:502x2")
    assert completed["turn"]["status"] == "completed"
    messages = upstream.requests(kind="ws-message")
    assert len(messages) == 3 and {m.originator for m in messages} == {"codex_ios"}


@pytest.mark.parametrize("transport", ["sse", "websocket"])
@pytest.mark.parametrize("how", ["interrupt", "disconnect"])
async def test_interrupt_and_disconnect_close_the_upstream_within_a_second(connect, upstream, settings, transport, how):
    settings.CODEX_RESPONSES_TRANSPORT = transport
    client = await connect()
    await client.initialize("codex_ios")
    thread = await client.start_thread()
    turn = (await client.call("turn/start", {"threadId": thread, "input": [{"type": "text", "text": "slow:200"}]}))["turn"]
    await client.notification("item/agentMessage/delta", threadId=thread)
    started = asyncio.get_running_loop().time()
    if how == "interrupt":
        await client.call("turn/interrupt", {"threadId": thread, "turnId": turn["id"]})
    else:
        await client.communicator.disconnect()
    await upstream.await_for(lambda rs: any(r.kind == "closed" and r.path == "/v1/responses" for r in rs), timeout=1.0)
    assert asyncio.get_running_loop().time() - started < 1.0


# --- realtime calls ---------------------------------------------------------------


async def test_realtime_call_and_sideband_carry_the_owner_identity(connect, upstream):
    backend, ios = await backend_then_ios(connect)
    ios_thread, backend_thread = await ios.start_thread(), await backend.start_thread()
    ios_call, backend_call = await asyncio.gather(
        ios.call("thread/realtime/start", {"threadId": ios_thread, "sdp": "v=0\r\no=codex_ios\r\n"}),
        backend.call("thread/realtime/start", {"threadId": backend_thread, "sdp": "v=0\r\no=codex-backend\r\n"}),
    )
    assert ios_call["sdp"].startswith("v=0") and ios_call["callId"] != backend_call["callId"]
    started = await ios.notification("thread/realtime/started", threadId=ios_thread)
    assert (started["callId"], started["version"]) == (ios_call["callId"], "v2")
    assert (await ios.notification("thread/realtime/sdp", threadId=ios_thread))["sdp"] == ios_call["sdp"]

    posts = {r.body: r for r in upstream.requests("/v1/realtime/calls")}
    assert_identity(posts["v=0\r\no=codex_ios\r\n"], "codex_ios")
    assert_identity(posts["v=0\r\no=codex-backend\r\n"], "codex-backend")
    for post in posts.values():
        assert post.headers["content-type"] == "application/sdp"
        assert post.headers["authorization"] == f"Bearer {TEST_API_KEY}"
    sidebands = {r.query: r for r in upstream.requests("/v1/realtime", kind="ws")}
    assert_identity(sidebands[f"call_id={ios_call['callId']}"], "codex_ios")
    assert_identity(sidebands[f"call_id={backend_call['callId']}"], "codex-backend")

    assert await ios.call("thread/realtime/stop", {"threadId": ios_thread}) == {}
    assert (await ios.notification("thread/realtime/closed", threadId=ios_thread))["callId"] == ios_call["callId"]
    closed = lambda rs, call: any(r.kind == "closed" and r.query == f"call_id={call}" for r in rs)  # noqa: E731
    await upstream.await_for(lambda rs: closed(rs, ios_call["callId"]), timeout=1.0)
    await backend.communicator.disconnect()
    await upstream.await_for(lambda rs: closed(rs, backend_call["callId"]), timeout=1.0)


async def test_realtime_errors_are_clear_and_leave_the_thread_usable(connect, upstream, settings):
    client = await connect()
    await client.initialize("codex_ios")
    thread = await client.start_thread()
    stop = await client.request("thread/realtime/stop", {"threadId": thread})
    assert stop["error"]["code"] == -32600
    assert (await client.request("thread/realtime/start", {"threadId": thread}))["error"]["code"] == -32602
    settings.CODEX_API_BASE_URL = f"{upstream.url}/status/403/v1"
    refused = await client.request("thread/realtime/start", {"threadId": thread, "sdp": "v=0"})
    assert refused["error"]["code"] == -32000 and refused["error"]["data"] == {"codexErrorInfo": "unauthorized"}
    settings.CODEX_API_BASE_URL = upstream.api_base_url
    assert (await client.call("thread/realtime/start", {"threadId": thread, "sdp": "v=0"}))["callId"]
    again = await client.request("thread/realtime/start", {"threadId": thread, "sdp": "v=0"})
    assert again["error"]["message"].startswith("Realtime already started")


# --- connectors and plugins -------------------------------------------------------


async def test_app_list_uses_the_caller_identity_and_filters_by_originator(connect, upstream):
    upstream.apps = [
        {"id": "github", "name": "GitHub", "description": "Code"},
        {"id": "ios-only", "name": "Shortcuts", "description": "iOS", "originators": ["codex_ios"]},
        {"id": "cli-only", "name": "Terminal", "description": "CLI", "originators": ["codex_cli_rs"]},
    ]
    backend, ios = await backend_then_ios(connect)
    ios_apps, backend_apps = await asyncio.gather(ios.call("app/list", {}), backend.call("app/list"))
    assert [a["id"] for a in ios_apps["data"]] == ["github", "ios-only"]
    assert [a["id"] for a in backend_apps["data"]] == ["github", "cli-only"]
    assert ios_apps["data"][0] == {"id": "github", "name": "GitHub", "description": "Code"}
    by_ua = {r.user_agent: r for r in upstream.requests("/connectors/directory/list")}
    assert len(by_ua) == 2
    for name in ("codex_ios", "codex-backend"):
        [record] = [r for ua, r in by_ua.items() if ua.endswith(f"({name}; {VERSIONS[name]})")]
        assert_identity(record, name)
        assert "authorization" not in record.headers


async def test_plugin_list_is_looked_up_for_first_party_originators_only(connect, upstream):
    upstream.plugins = [{"id": "p1", "name": "Linter"}]
    ios = await connect()
    await ios.initialize("codex_ios")
    third_party = await connect()
    await third_party.initialize("acme_editor")
    backend = await connect()
    await backend.initialize("codex-backend", "2.0.0")
    assert await ios.call("plugin/list", {}) == {"data": [{"id": "p1", "name": "Linter"}], "marketplaces": []}
    assert (await third_party.call("plugin/list", {}))["data"] == []
    assert (await backend.call("plugin/list", {}))["data"] == [{"id": "p1", "name": "Linter"}]
    records = upstream.requests("/plugins/list")
    assert len(records) == 2
    assert {r.user_agent.rsplit("(", 1)[1] for r in records} == {"codex_ios; 1.0.0)", "codex-backend; 2.0.0)"}


async def test_listing_failures_are_upstream_errors(connect, upstream, settings):
    client = await connect()
    await client.initialize("codex_ios")
    settings.CODEX_CHATGPT_BASE_URL = f"{upstream.url}/status/429/backend-api"
    for method in ("app/list", "plugin/list"):
        error = (await client.request(method, {}))["error"]
        assert error["code"] == -32000 and error["data"] == {"codexErrorInfo": "usageLimitExceeded"}
    settings.CODEX_CHATGPT_BASE_URL = upstream.chatgpt_base_url
    assert (await client.call("app/list", {})) == {"data": []}


# --- telemetry --------------------------------------------------------------------


async def test_turn_completed_telemetry_is_attributed_to_the_turn_owner(connect, upstream):
    backend, ios = await backend_then_ios(connect)
    ios_thread, backend_thread = await ios.start_thread(), await backend.start_thread()
    await asyncio.gather(ios.run_turn(ios_thread), backend.run_turn(backend_thread))
    records = await upstream.await_for(
        lambda rs: sum(len(r.body["events"]) for r in rs if r.path.endswith("/events")) >= 4
    )
    events = [(r, e) for r in records if r.path.endswith("/events") for e in r.body["events"]]
    completed = {e["event_params"]["thread_id"]: (r, e) for r, e in events if e["event_type"] == "codex_turn_completed"}
    record, event = completed[ios_thread]
    assert_identity(record, "codex_ios")
    assert event["event_params"]["product_client_id"] == "codex_ios" and event["event_params"]["turn_id"]
    assert completed[backend_thread][1]["event_params"]["product_client_id"] == "codex_cli_rs"


async def test_a_burst_from_ten_identities_never_mixes_a_batch(upstream, settings):
    sender = TelemetrySender(max_batch=7, flush_interval=0.05, max_buffered=10_000)
    identities = [ClientIdentity.from_client_info(f"client_{i}", f"{i}.0") for i in range(10)]
    for round_ in range(20):
        for identity in identities:
            sender.record(identity, analytics_event(identity, "codex_turn_completed", f"t-{round_}"))
    await sender.aclose()
    await close_client_factory()
    records = upstream.requests("/events")
    assert sum(len(r.body["events"]) for r in records) == 200 == sender.sent
    for record in records:
        assert 1 <= len(record.body["events"]) <= 7
        products = {e["event_params"]["product_client_id"] for e in record.body["events"]}
        versions = {e["event_params"]["client_version"] for e in record.body["events"]}
        assert products == {record.originator} and len(versions) == 1
        assert record.user_agent.endswith(f"({record.originator}; {versions.pop()})")


async def test_a_full_telemetry_buffer_drops_the_oldest_and_counts(upstream):
    sender = TelemetrySender(max_batch=1000, flush_interval=60, max_buffered=5)
    identity = ClientIdentity.from_client_info("codex_ios", "1")
    for i in range(8):
        sender.record(identity, analytics_event(identity, "codex_turn_completed", f"t{i}"))
    assert sender.dropped == 3
    await sender.aclose()
    await close_client_factory()
    [record] = upstream.requests("/events")
    assert [e["event_params"]["thread_id"] for e in record.body["events"]] == ["t3", "t4", "t5", "t6", "t7"]


async def test_telemetry_failure_never_fails_a_turn(connect, settings):
    settings.CODEX_CHATGPT_BASE_URL = f"http://127.0.0.1:{free_port()}/backend-api"
    client = await connect()
    await client.initialize("codex_ios")
    assert (await client.run_turn(await client.start_thread()))["turn"]["status"] == "completed"


# --- everything at once ---------------------------------------------------------


async def test_twenty_clients_on_every_path_at_once_have_zero_misattributions(connect, upstream):
    upstream.apps = [{"id": "a", "name": "A", "description": ""}]
    upstream.plugins = [{"id": "p", "name": "P"}]
    names = list(INFRA) + [f"codex_client_{i}" if i % 2 else f"Codex Client {i}" for i in range(18)]

    async def exercise(name):
        client = await connect()
        await client.initialize(name, "9.9.9")
        thread = await client.start_thread()
        call, _, _, turn = await asyncio.gather(
            client.call("thread/realtime/start", {"threadId": thread, "sdp": f"v=0\r\no={name}\r\n"}),
            client.call("app/list", {}),
            client.call("plugin/list", {}),
            client.run_turn(thread, "slow:3"),
        )
        assert turn["turn"]["status"] == "completed"
        return name, thread, call["callId"]

    owners = await asyncio.gather(*(exercise(name) for name in names))
    misattributed = 0
    by_thread = {r.headers["session-id"]: r for r in upstream.model_requests()}
    by_offer = {r.body: r for r in upstream.requests("/v1/realtime/calls")}
    by_call = {r.query: r for r in upstream.requests("/v1/realtime", kind="ws")}
    for name, thread, call_id in owners:
        for record in (by_thread[thread], by_offer[f"v=0\r\no={name}\r\n"], by_call[f"call_id={call_id}"]):
            misattributed += record.originator != expected_originator(name)
            misattributed += not record.user_agent.endswith(f"({name}; 9.9.9)")
    # Listings have no per-request key: one request per connection means every
    # User-Agent appears exactly once.
    first_party = [name for name in names if name in INFRA or name.startswith("Codex ")]
    for path, callers in (("/connectors/directory/list", names), ("/plugins/list", first_party)):
        agents = sorted(r.user_agent.rsplit(" (", 1)[1] for r in upstream.requests(path))
        assert agents == sorted(f"{name}; 9.9.9)" for name in callers)
    assert misattributed == 0


async def test_a_cookie_the_upstream_sets_never_rides_on_a_later_request(connect, upstream, settings):
    # By host name: cookie jars refuse cookies from bare IP addresses, which would hide a shared jar.
    settings.CODEX_API_BASE_URL = upstream.api_base_url.replace("127.0.0.1", "localhost")
    backend, ios = await backend_then_ios(connect)
    for client in (ios, backend, ios):
        assert (await client.run_turn(await client.start_thread()))["turn"]["status"] == "completed"
    requests = upstream.model_requests()
    assert len(requests) == 3
    assert [r.headers.get("cookie") for r in requests] == [None, None, None]

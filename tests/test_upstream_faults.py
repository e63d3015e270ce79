"""Each upstream failure ends the turn with the right codexErrorInfo; the connection stays usable."""

import pytest

from codexserver.devtools.server_process import free_port

pytestmark = pytest.mark.django_db(transaction=True)

FAULTS = {
    "fail:401": "unauthorized",
    "fail:403": "unauthorized",
    "fail:400": "badRequest",
    "fail:429": "usageLimitExceeded",
    "fail:503": "serverOverloaded",
    "fail:500": {"responseTooManyFailedAttempts": {"httpStatusCode": 500}},
    "cut": {"responseStreamDisconnected": {"httpStatusCode": None}},
    "hangup": {"responseStreamDisconnected": {"httpStatusCode": None}},
    "response-failed": "serverOverloaded",
}


@pytest.fixture
async def client(connect):
    client = await connect()
    await client.initialize("codex_ios", "1.4.0")
    return client


@pytest.mark.parametrize("text, expected", FAULTS.items(), ids=FAULTS.keys())
async def test_fault_ends_the_turn_failed_and_the_connection_stays_usable(client, upstream, text, expected):
    thread = await client.start_thread()
    completed = await client.run_turn(thread, text)
    assert completed["turn"]["status"] == "failed"
    assert completed["turn"]["error"]["codexErrorInfo"] == expected
    assert isinstance(completed["turn"]["error"]["message"], str)
    assert (await client.run_turn(thread, "fine"))["turn"]["status"] == "completed"


async def test_other_5xx_is_tried_three_times_then_gives_up(client, upstream):
    thread = await client.start_thread()
    await client.run_turn(thread, "fail:500")
    assert len(upstream.model_requests()) == 3


async def test_a_5xx_that_clears_within_three_tries_completes_the_turn(client, upstream):
    thread = await client.start_thread()
    completed = await client.run_turn(thread, "fail:502x2")
    assert completed["turn"]["status"] == "completed"
    assert len(upstream.model_requests()) == 3
    assert {r.originator for r in upstream.model_requests()} == {"codex_ios"}


@pytest.mark.parametrize("status", [400, 401, 429, 503])
async def test_non_retryable_statuses_are_tried_once(client, upstream, status):
    thread = await client.start_thread()
    await client.run_turn(thread, f"fail:{status}")
    assert len(upstream.model_requests()) == 1


async def test_a_reply_that_is_not_http_ends_the_turn_as_a_cut_stream(client, upstream):
    thread = await client.start_thread()
    completed = await client.run_turn(thread, "garbage")
    assert completed["turn"]["status"] == "failed"
    assert completed["turn"]["error"]["codexErrorInfo"] == {"responseStreamDisconnected": {"httpStatusCode": None}}
    assert (await client.run_turn(thread, "fine"))["turn"]["status"] == "completed"


async def test_connection_refused(client, settings):
    settings.CODEX_API_BASE_URL = f"http://127.0.0.1:{free_port()}/v1"
    thread = await client.start_thread()
    completed = await client.run_turn(thread)
    assert completed["turn"]["error"]["codexErrorInfo"] == {"responseStreamConnectionFailed": {"httpStatusCode": None}}


async def test_an_upstream_that_hangs_is_cut_by_the_idle_timeout(client, settings):
    settings.CODEX_UPSTREAM_IDLE_TIMEOUT = 0.5
    thread = await client.start_thread()
    completed = await client.run_turn(thread, "hang")
    assert completed["turn"]["error"]["codexErrorInfo"] == {"responseStreamDisconnected": {"httpStatusCode": None}}


async def test_the_api_key_never_reaches_the_client(client, settings, upstream):
    thread = await client.start_thread()
    completed = await client.run_turn(thread, "fail:401")
    assert settings.OPENAI_API_KEY not in str(completed)

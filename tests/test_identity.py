"""The identity value: validation, User-Agent shape, policy, scope and client factory."""

import asyncio
import re

import httpx
import pytest

from identity import policy
from identity.client_identity import ClientIdentity, InvalidClientInfo, process_default_identity
from identity.headers import build_outbound_headers
from identity.http_clients import IdentityClientFactory, client_factory, close_client_factory, shared_ssl_context
from identity.scope import current_identity, current_scope, identity_scope

BAD_VALUES = {
    "carriage return": "codex\rios",
    "line feed": "codex\nios",
    "header injection": "codex_ios\r\nX-Injected: 1",
    "nul": "codex\x00ios",
    "del": "codex\x7fios",
    "tab": "codex\tios",
    "other control": "codex\x1bios",
    "non-ascii": "códex",
    "emoji": "codex🚀",
    "leading space": " codex_ios",
    "trailing space": "codex_ios ",
    "only a space": " ",
    "empty": "",
    "over 256 characters": "x" * 257,
}


@pytest.mark.parametrize("value", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_invalid_name_is_rejected_with_the_exact_message(value):
    with pytest.raises(InvalidClientInfo) as caught:
        ClientIdentity.from_client_info(value, "1.0.0")
    assert str(caught.value) == f"Invalid clientInfo.name: '{value}'. Must be a valid HTTP header value."


@pytest.mark.parametrize("value", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_invalid_version_is_rejected_with_the_exact_message(value):
    with pytest.raises(InvalidClientInfo) as caught:
        ClientIdentity.from_client_info("codex_ios", value)
    assert str(caught.value) == f"Invalid clientInfo.version: '{value}'. Must be a valid HTTP header value."


@pytest.mark.parametrize("value", ["a", "x" * 256, "Codex Desktop", "my client/2 (beta)", "~!@#$%^&*()"])
def test_valid_header_values_are_accepted(value):
    assert ClientIdentity.from_client_info(value, value).client_name == value


def test_user_agent_starts_with_originator_and_ends_with_client_info():
    identity = ClientIdentity.from_client_info("codex_ios", "1.4.0", "Codex iOS")
    assert re.fullmatch(r"codex_ios/\d+\.\d+\.\d+ \([^;()]+ [^;()]+; [^;()]+\) \(codex_ios; 1\.4\.0\)", identity.user_agent)
    assert identity.originator == "codex_ios"
    assert identity.is_first_party and not identity.is_infrastructure


@pytest.mark.parametrize("name", ["codex-backend", "codex_app_server_daemon"])
def test_infrastructure_clients_get_the_default_originator_and_their_own_user_agent(name):
    identity = ClientIdentity.from_client_info(name, "2.0.0")
    assert identity.originator == "codex_cli_rs"
    assert identity.user_agent.startswith("codex_cli_rs/")
    assert identity.user_agent.endswith(f"({name}; 2.0.0)")
    assert identity.is_infrastructure and identity.client_name == name


def test_third_party_and_codex_prefixed_originators():
    assert not ClientIdentity.from_client_info("acme_ide", "1").is_first_party
    assert ClientIdentity.from_client_info("Codex Desktop", "1").is_first_party


def test_first_party_set_is_extended_by_environment(monkeypatch):
    monkeypatch.setenv(policy.FIRST_PARTY_ENV, "acme_ide, other")
    policy._extra_first_party.cache_clear()
    try:
        assert ClientIdentity.from_client_info("acme_ide", "1").is_first_party
    finally:
        monkeypatch.delenv(policy.FIRST_PARTY_ENV)
        policy._extra_first_party.cache_clear()


@pytest.fixture
def originator_override(monkeypatch):
    def apply(value):
        monkeypatch.setenv(policy.ORIGINATOR_OVERRIDE_ENV, value)
        policy.process_default_originator.cache_clear()
        process_default_identity.cache_clear()

    yield apply
    monkeypatch.delenv(policy.ORIGINATOR_OVERRIDE_ENV, raising=False)
    policy.process_default_originator.cache_clear()
    process_default_identity.cache_clear()


def test_override_sets_the_process_default_but_explicit_identity_wins(originator_override):
    originator_override("codex_exec")
    assert process_default_identity().originator == "codex_exec"
    assert ClientIdentity.from_client_info("codex_ios", "1").originator == "codex_ios"
    assert ClientIdentity.from_client_info("codex-backend", "1").originator == "codex_exec"


def test_invalid_override_falls_back_to_codex_cli_rs(originator_override):
    originator_override("bad\r\nvalue")
    assert process_default_identity().originator == "codex_cli_rs"


def test_identity_is_frozen():
    identity = ClientIdentity.from_client_info("codex_ios", "1")
    with pytest.raises(AttributeError):
        identity.originator = "someone_else"


def test_outbound_headers_carry_identity_and_optional_bearer():
    identity = ClientIdentity.from_client_info("codex_ios", "1")
    assert build_outbound_headers(identity) == {"originator": "codex_ios", "User-Agent": identity.user_agent}
    assert build_outbound_headers(identity, bearer_token="k")["Authorization"] == "Bearer k"


def test_outside_any_scope_the_process_default_applies():
    assert current_scope() is None
    assert current_identity() == process_default_identity()


async def test_a_thousand_concurrent_scopes_each_see_only_their_own_identity():
    identities = [ClientIdentity.from_client_info(f"client_{i}", f"{i}.0") for i in range(1000)]
    start = asyncio.Event()

    async def observe(identity):
        with identity_scope(identity, connection_id=identity.client_name):
            await start.wait()
            seen = [current_identity()]
            await asyncio.sleep(0)
            # Work started in the background under the scope inherits it.
            seen.append(await asyncio.create_task(asyncio.sleep(0, result=current_identity())))
            return seen

    tasks = [asyncio.create_task(observe(identity)) for identity in identities]
    await asyncio.sleep(0)
    start.set()
    results = await asyncio.gather(*tasks)
    assert all(seen == [identity, identity] for seen, identity in zip(results, identities))
    assert current_identity() == process_default_identity()


async def test_clients_per_identity_share_one_transport_and_ssl_context(upstream):
    factory = client_factory()
    ios = factory.client_for(ClientIdentity.from_client_info("codex_ios", "1"), "https://api.example/v1")
    backend = factory.client_for(ClientIdentity.from_client_info("codex-backend", "1"), "https://api.example/v1")
    assert ios is not backend
    assert ios.headers["originator"] == "codex_ios" and backend.headers["originator"] == "codex_cli_rs"
    assert ios._transport._transport is backend._transport._transport
    assert factory is client_factory()
    await ios.get(upstream.api_base_url + "/models")  # the pool is made on first use
    session = ios._transport._transport.client
    assert session is backend._transport._transport.client and session.connector._ssl is shared_ssl_context()
    await close_client_factory()


async def test_closing_an_identity_client_leaves_the_shared_pool_open():
    factory = IdentityClientFactory(transport=httpx.MockTransport(lambda request: httpx.Response(204)))
    identity = ClientIdentity.from_client_info("codex_ios", "1")
    client = factory.client_for(identity, "http://upstream.invalid")
    await client.aclose()
    fresh = factory.client_for(identity, "http://upstream.invalid")
    assert (await fresh.get("/x")).status_code == 204
    await factory.aclose()

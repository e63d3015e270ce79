from __future__ import annotations

import asyncio
import contextlib
import os

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.db import connections

from codexserver.devtools.local_upstream import UpstreamServer
from codexserver.devtools.rpc_client import RpcClient
from codexserver.devtools.server_process import PROJECT_DIR, ServerProcess, migrate
from identity.actions import close_row_writer_connections
from identity.http_clients import close_client_factory
from realtime.fanout.thread_hub import stop_thread_hub
from realtime.services.telemetry import flush_at_shutdown
from realtime.store import loop_writers, turn_writes
from realtime.turns.runner import background_endings_finished
from tests.rpc_client import CommunicatorClient
from tests.wire_schema import schema_errors

TEST_API_KEY = "sk-test-0123456789abcdef-secret"


@pytest.fixture(scope="session", autouse=True)
def close_connections_of_the_database_thread(django_db_setup, django_db_blocker):
    """The async tests' database calls run on asgiref's one shared thread; close
    what it holds before the test database is dropped (PostgreSQL refuses to
    drop a database with sessions open). Unblocked: the last test may be one
    without database access."""
    yield
    with django_db_blocker.unblock():
        asyncio.run(database_sync_to_async(connections.close_all)())
        close_row_writer_connections()
        for connection in connections.all():
            if hasattr(connection, "close_pool"):  # PostgreSQL: the pooled sessions
                connection.close_pool()


@pytest.fixture(autouse=True)
def close_the_turn_writes_sessions():
    """Each event loop writes its turns on a database connection of its own
    (``realtime.store.loop_writers``), and each test has its own loop: closed
    after each test, or they would add up (and on PostgreSQL keep the test
    database from being dropped)."""
    yield
    loop_writers.close_every_loops_writer()


@pytest.fixture(autouse=True)
def every_message_matches_the_codex_schema(monkeypatch):
    """Every response and notification any test's client receives is checked
    against the Codex app-server schema (PROTOCOL §5); the first invalid one
    fails that client's next wait, and the test at its end."""
    invalid: list[str] = []

    def check(message: dict, request_method: str | None) -> None:
        errors = schema_errors(message, request_method)
        if errors:
            invalid.extend(errors)
            raise AssertionError("schema violation: " + "; ".join(errors) + f"\nmessage: {message}")

    monkeypatch.setattr(RpcClient, "message_checks", [check])
    yield
    assert not invalid, "messages that break the Codex schema:\n" + "\n".join(invalid)


# Recorded Responses API streams (PROTOCOL §10), read where they are kept: ../shared/.
RESPONSE_FIXTURES = PROJECT_DIR.parent / "shared" / "fixtures" / "responses"


@pytest.fixture(scope="session")
def upstream():
    assert RESPONSE_FIXTURES.is_dir(), f"the recorded streams are missing: {RESPONSE_FIXTURES}"
    server = UpstreamServer(fixtures_dir=RESPONSE_FIXTURES).start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def upstream_settings(settings, upstream):
    """Every test talks to the recording upstream, never to the network."""
    settings.CODEX_API_BASE_URL = upstream.api_base_url
    settings.CODEX_CHATGPT_BASE_URL = upstream.chatgpt_base_url
    settings.OPENAI_API_KEY = TEST_API_KEY
    settings.CODEX_UPSTREAM_RETRY_BACKOFF = 0.01
    settings.CODEX_RESPONSES_TRANSPORT = "sse"
    settings.CODEX_TELEMETRY_FLUSH_INTERVAL = 0.05
    upstream.reset()
    return settings


@pytest.fixture
def application():
    from codexserver.asgi import application

    return application


@pytest.fixture
async def connect(application):
    """``await connect()`` opens a WebSocket to the ASGI app; all are closed after the test."""
    clients: list[CommunicatorClient] = []

    async def open_client(headers=None, path="/") -> CommunicatorClient:
        communicator = WebsocketCommunicator(application, path, headers=headers or [])
        connected, _ = await communicator.connect()
        assert connected, "the upgrade was refused"
        clients.append(CommunicatorClient(communicator))
        return clients[-1]

    yield open_client
    for client in clients:
        await client.close()
        with contextlib.suppress(Exception):
            await client.communicator.disconnect()
    # As the server's shutdown does: this test's event loop ends here.
    await stop_thread_hub()
    await flush_at_shutdown()
    await close_client_factory()
    await background_endings_finished()  # as the server's shutdown waits for them
    await turn_writes.flushed()
    loop_writers.close_this_loops_writer()


def server_env(upstream: UpstreamServer, database_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CODEX_", "OPENAI_", "DJANGO_"))}
    env.update(
        DATABASE_URL=database_url,
        CODEX_API_BASE_URL=upstream.api_base_url,
        CODEX_CHATGPT_BASE_URL=upstream.chatgpt_base_url,
        OPENAI_API_KEY=TEST_API_KEY,
        CODEX_UPSTREAM_RETRY_BACKOFF="0.01",
        DJANGO_SECRET_KEY="test-secret-key-not-for-production",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@pytest.fixture
def daphne_server(upstream, tmp_path):
    """``daphne_server(**env)`` starts a migrated daphne process on a fresh SQLite file."""
    started: list[ServerProcess] = []

    def start(database_url: str | None = None, daphne_args: tuple[str, ...] = (), **extra: str) -> ServerProcess:
        database_url = database_url or f"sqlite:///{tmp_path / 'server.sqlite3'}"
        env = server_env(upstream, database_url, **extra)
        migrate(env)
        command = ["manage.py", "serve", "--port", "{port}", "--", *daphne_args] if daphne_args else None
        server = ServerProcess(env, tmp_path / f"daphne-{len(started)}.log", command=command)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()

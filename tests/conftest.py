from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from channels.testing import WebsocketCommunicator

from tests.rpc_client import CommunicatorClient
from tests.upstream import UpstreamServer

PROJECT_DIR = Path(__file__).resolve().parent.parent
TEST_API_KEY = "sk-test-0123456789abcdef-secret"


@pytest.fixture(scope="session")
def upstream():
    server = UpstreamServer().start()
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DaphneProcess:
    """A real `manage.py serve` (daphne) process on loopback."""

    def __init__(self, env: dict[str, str], port: int, log_path: Path):
        self.port = port
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> DaphneProcess:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "serve", "--port", str(self.port)],
            cwd=PROJECT_DIR,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"daphne exited early:\n{self.log_path.read_text()}")
            try:
                if httpx.get(self.http_url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"daphne did not answer /healthz:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


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
    started: list[DaphneProcess] = []

    def start(database_url: str | None = None, **extra: str) -> DaphneProcess:
        database_url = database_url or f"sqlite:///{tmp_path / 'server.sqlite3'}"
        env = server_env(upstream, database_url, **extra)
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "--noinput", "-v0"], cwd=PROJECT_DIR, env=env, check=True
        )
        server = DaphneProcess(env, free_port(), tmp_path / f"daphne-{len(started)}.log")
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()

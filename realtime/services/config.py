"""Upstream configuration (PROTOCOL §6), read from settings at call time."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from django.conf import settings

from identity.client_identity import ClientIdentity
from identity.http_clients import client_factory


def websocket_url(http_url: str) -> str:
    """``http``→``ws`` and ``https``→``wss``; the rest of the URL is kept."""
    url = httpx.URL(http_url)
    return str(url.copy_with(scheme={"http": "ws", "https": "wss"}.get(url.scheme, url.scheme)))


def join_url(base_url: str, path: str) -> str:
    return base_url.rstrip("/") + "/" + path.lstrip("/")


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    api_base_url: str
    chatgpt_base_url: str
    api_key: str | None
    model: str
    responses_transport: str
    max_tries: int
    retry_backoff: float
    idle_timeout: float
    connect_timeout: float

    @classmethod
    def from_settings(cls) -> UpstreamConfig:
        return cls(
            api_base_url=settings.CODEX_API_BASE_URL,
            chatgpt_base_url=settings.CODEX_CHATGPT_BASE_URL,
            api_key=settings.OPENAI_API_KEY,
            model=settings.CODEX_MODEL,
            responses_transport=settings.CODEX_RESPONSES_TRANSPORT,
            max_tries=max(1, settings.CODEX_UPSTREAM_MAX_TRIES),
            retry_backoff=settings.CODEX_UPSTREAM_RETRY_BACKOFF,
            idle_timeout=settings.CODEX_UPSTREAM_IDLE_TIMEOUT,
            connect_timeout=settings.CODEX_UPSTREAM_CONNECT_TIMEOUT,
        )

    @property
    def timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.idle_timeout, connect=self.connect_timeout, pool=self.connect_timeout)

    def api_client(self, identity: ClientIdentity) -> httpx.AsyncClient:
        """Client for CODEX_API_BASE_URL: identity headers plus the API key."""
        return client_factory().client_for(
            identity, self.api_base_url, bearer_token=self.api_key, timeout=self.timeout
        )

    def chatgpt_client(self, identity: ClientIdentity) -> httpx.AsyncClient:
        """Client for CODEX_CHATGPT_BASE_URL: identity headers only."""
        return client_factory().client_for(identity, self.chatgpt_base_url, timeout=self.timeout)

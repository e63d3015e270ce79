"""httpx clients per identity over one shared transport and one SSL context.

httpx's own split: the client is policy (base URL, the identity's default
headers, timeouts), the transport moves bytes and owns the pool. Every
identity gets its own client, so headers can never come from another
connection; all of them share one pool and one SSL context, so no client
pays for its own pool or loads the CA certificates again.

The transport is httpx-aiohttp's: aiohttp's connection pool and its C HTTP
parser under httpx's API. httpcore's pool walks every pooled connection each
time it places or frees a request (quadratic in concurrent streams) and h11
parses each chunk in Python: with httpcore, half of a turn's CPU went there
(docs/PERFORMANCE.md). A pool belongs to one event loop, hence one transport
per running loop.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import OrderedDict
from functools import lru_cache
from http.cookiejar import CookieJar, DefaultCookiePolicy

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

from codexserver.loop_local import LoopLocal

from .client_identity import ClientIdentity
from .headers import build_outbound_headers

# A short pool timeout: a saturated pool fails a call quickly instead of
# holding it for minutes behind other connections' streams. aiohttp counts the
# wait for a pooled connection and the connecting itself against ``pool``
# together (a full pool is then reported as a failure to connect), and has no
# write timeout: ``_BorrowedTransport`` bounds the time to the response's
# headers by the client's pool + write + read instead (the model's clients:
# 10 + 300 + 300 s by default, ``realtime.services.config``).
DEFAULT_TIMEOUT = httpx.Timeout(connect=10.0, read=300.0, write=30.0, pool=10.0)
# Connections at once, streaming or idle; a call past it waits for one (at
# most the pool timeout). Idle ones close after httpx's keep-alive expiry.
DEFAULT_LIMITS = httpx.Limits(max_connections=2048)
_CLIENT_CACHE_SIZE = 4096


@lru_cache(maxsize=1)
def shared_ssl_context() -> ssl.SSLContext:
    """Loading CA certificates costs milliseconds: do it once per process."""
    return httpx.create_ssl_context()


def _shared_session() -> aiohttp.ClientSession:
    """The pool under every identity's client (made on first use, in its loop)."""
    connector = aiohttp.TCPConnector(
        ssl=shared_ssl_context(), limit=DEFAULT_LIMITS.max_connections, keepalive_timeout=DEFAULT_LIMITS.keepalive_expiry
    )
    # No cookie jar: a session's jar is shared by everyone using it, so a
    # cookie one identity's reply set (an API edge's __cf_bm, say) would ride
    # on every other identity's requests.
    return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())


class _BorrowedTransport(httpx.AsyncBaseTransport):
    """Lends the shared transport to a client; closing the client leaves it open."""

    def __init__(self, transport: httpx.AsyncBaseTransport):
        self._transport = transport

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        # httpx-aiohttp drops the write timeout, and aiohttp starts its read
        # timeout only once the body is sent: an upstream that stops reading a
        # 4 MiB request body would hold the turn (and extend its thread's
        # lock) for ever. Everything up to the response's headers gets the
        # sum of the phases' timeouts.
        timeouts = request.extensions.get("timeout", {})
        limit = sum(timeouts.get(phase) or 0 for phase in ("pool", "write", "read")) or None
        deadline = asyncio.timeout(limit)
        try:
            async with deadline:
                return await self._transport.handle_async_request(request)
        except TimeoutError as exc:
            if not deadline.expired():
                raise
            raise httpx.WriteTimeout(f"no response headers within {limit:g} s", request=request) from exc

    async def aclose(self) -> None:  # the factory owns the pool's lifetime
        pass


class IdentityClientFactory:
    """Builds (and caches) one AsyncClient per identity and upstream."""

    def __init__(self, transport: httpx.AsyncBaseTransport | None = None):
        self._transport = transport or AiohttpTransport(verify=shared_ssl_context(), client=_shared_session)
        self._borrowed = _BorrowedTransport(self._transport)
        self._clients: OrderedDict[tuple, httpx.AsyncClient] = OrderedDict()

    def client_for(
        self,
        identity: ClientIdentity,
        base_url: str,
        *,
        bearer_token: str | None = None,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
    ) -> httpx.AsyncClient:
        key = (identity, base_url, bearer_token, tuple(timeout.as_dict().items()))
        client = self._clients.get(key)
        if client is None or client.is_closed:
            client = httpx.AsyncClient(
                base_url=base_url,
                headers=build_outbound_headers(identity, bearer_token=bearer_token),
                # Clients are shared by equal identities of different
                # connections: a cookie one upstream reply sets must not ride
                # on another connection's request. The jar itself, not wrapped
                # in httpx.Cookies: httpx copies a Cookies into a new jar with
                # the default policy, which accepted every cookie.
                cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
                timeout=timeout,
                transport=self._borrowed,
                # Environment proxies would make httpx build a transport (and
                # an SSL context) per client, defeating the shared pool.
                trust_env=False,
            )
            self._clients[key] = client
            if len(self._clients) > _CLIENT_CACHE_SIZE:
                self._clients.popitem(last=False)
        else:
            self._clients.move_to_end(key)
        return client

    async def aclose(self) -> None:
        self._clients.clear()
        await self._transport.aclose()


_factories: LoopLocal[IdentityClientFactory] = LoopLocal(IdentityClientFactory)


def client_factory() -> IdentityClientFactory:
    """The factory of the running event loop (one pool per loop)."""
    return _factories.get()


async def close_client_factory() -> None:
    """At shutdown (and at the end of each test's event loop): close this
    loop's pool if one was made. A pool left open is reported when collected
    (aiohttp's "Unclosed client session"); a call after this gets a new one."""
    factory = _factories.pop()
    if factory is not None:
        await factory.aclose()

"""The one mapping from upstream failures to ``codexErrorInfo`` (PROTOCOL §6)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import httpx
from httpx_sse import SSEError
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from codexserver.log_format import redact_secrets

MAX_MESSAGE_CHARS = 500


def redact(text: str) -> str:
    """Upstreams sometimes echo credentials back; none reaches a client or a log."""
    return redact_secrets(text)[:MAX_MESSAGE_CHARS]


class UpstreamError(Exception):
    def __init__(
        self,
        message: str,
        codex_error_info: str | dict[str, Any],
        *,
        http_status: int | None = None,
        retryable: bool = False,
    ):
        message = redact(message)
        super().__init__(message)
        self.message = message
        self.codex_error_info = codex_error_info
        self.http_status = http_status
        self.retryable = retryable

    def turn_error(self) -> dict[str, Any]:
        """The ``error`` of a failed ``turn/completed``."""
        return {"message": self.message, "codexErrorInfo": self.codex_error_info}


def _detail(body: bytes | str) -> str:
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        error = json.loads(text).get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        if isinstance(error, str):
            return error
    except (ValueError, AttributeError):
        pass
    return text.strip()


def error_for_status(status: int, body: bytes | str = b"") -> UpstreamError:
    detail = _detail(body)
    message = f"upstream answered {status}" + (f": {detail}" if detail else "")
    if status in (401, 403):
        return UpstreamError(message, "unauthorized", http_status=status)
    if status == 400:
        return UpstreamError(message, "badRequest", http_status=status)
    if status == 429:
        return UpstreamError(message, "usageLimitExceeded", http_status=status)
    if status == 503:
        return UpstreamError(message, "serverOverloaded", http_status=status)
    if 500 <= status <= 599:
        return UpstreamError(message, "internalServerError", http_status=status, retryable=True)
    return UpstreamError(message, "other", http_status=status)


def raise_for_status(response: httpx.Response) -> None:
    """A read response that answered an error status, as an UpstreamError."""
    if response.status_code >= 400:
        raise error_for_status(response.status_code, response.content)


def too_many_failed_attempts(last: UpstreamError, tries: int) -> UpstreamError:
    return UpstreamError(
        f"gave up after {tries} tries: {last.message}",
        {"responseTooManyFailedAttempts": {"httpStatusCode": last.http_status}},
        http_status=last.http_status,
    )


def connection_failed(exc: BaseException, url: str | None = None) -> UpstreamError:
    """``url`` is said without its query: the operator needs to know which
    base URL is unreachable, and nothing secret travels in our paths."""
    where = f" at {url.split('?', 1)[0]}" if url else ""
    return UpstreamError(
        f"could not connect to the upstream{where} ({type(exc).__name__})",
        {"responseStreamConnectionFailed": {"httpStatusCode": None}},
    )


def _request_url(exc: httpx.HTTPError) -> str | None:
    try:
        return str(exc.request.url)
    except RuntimeError:  # an error raised before a request was made
        return None


def stream_disconnected(reason: str, http_status: int | None = None) -> UpstreamError:
    return UpstreamError(
        f"stream disconnected before completion: {reason}",
        {"responseStreamDisconnected": {"httpStatusCode": http_status}},
        http_status=http_status,
    )


# In-stream error codes (PROTOCOL §10); any other code is "other".
_FAILED_RESPONSE_CODES = {
    "insufficient_quota": "usageLimitExceeded",
    "usage_not_included": "usageLimitExceeded",
    "rate_limit_exceeded": "rateLimitExceeded",
    "context_length_exceeded": "contextWindowExceeded",
    "server_error": "internalServerError",
    "server_is_overloaded": "serverOverloaded",
    "slow_down": "serverOverloaded",
    "invalid_prompt": "badRequest",
    "invalid_request_error": "badRequest",
}


def failed_response(error: Any) -> UpstreamError:
    """The error of a ``response.failed`` or an ``error`` event. A server
    error (by code, or by type when the code is null) may be retried."""
    error = error if isinstance(error, dict) else {}
    code = error.get("code") if isinstance(error.get("code"), str) else ""
    if not code and error.get("type") == "server_error":
        code = "server_error"
    status = error.get("status") if isinstance(error.get("status"), int) else None
    if code not in _FAILED_RESPONSE_CODES and status is not None and status >= 400:
        # No code we know: the WebSocket error's HTTP-like status says it (§6).
        return error_for_status(status, json.dumps({"error": error}))
    message = error.get("message") if isinstance(error.get("message"), str) else "response failed"
    info = _FAILED_RESPONSE_CODES.get(code, "other")
    return UpstreamError(message, info, http_status=status, retryable=info == "internalServerError")


def incomplete_response(response: Any) -> UpstreamError:
    """``response.incomplete``: the turn fails, keeping what was streamed."""
    details = response.get("incomplete_details") if isinstance(response, dict) else None
    reason = details.get("reason") if isinstance(details, dict) else None
    return UpstreamError(f"Incomplete response returned, reason: {reason or 'unknown'}", "other")


@asynccontextmanager
async def websocket_failures(url: str | None = None) -> AsyncIterator[None]:
    """Map what an upstream WebSocket (at ``url``) raises, at the handshake or mid-stream."""
    try:
        yield
    except InvalidStatus as exc:
        raise error_for_status(exc.response.status_code, exc.response.body or b"") from exc
    except ConnectionClosed as exc:
        raise stream_disconnected(f"socket closed ({exc.rcvd.code if exc.rcvd else 'no close frame'})") from exc
    except (OSError, InvalidHandshake, TimeoutError) as exc:  # TimeoutError: the handshake's
        raise connection_failed(exc, url) from exc


@asynccontextmanager
async def http_failures() -> AsyncIterator[None]:
    """Map what httpx raises: no connection at all, or a response cut short."""
    try:
        yield
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        if _never_connected(exc):
            raise connection_failed(exc.__cause__ or exc, _request_url(exc)) from exc
        raise stream_disconnected(type(exc.__cause__).__name__) from exc
    except (httpx.TransportError, SSEError, aiohttp.ClientError) as exc:
        # Read timeouts, resets and truncated chunks: the stream was cut. A
        # malformed response (a bad status line, headers past aiohttp's limits)
        # comes as aiohttp's own error: httpx-aiohttp maps only some of them.
        raise stream_disconnected(type(exc).__name__) from exc



def _never_connected(exc: httpx.TransportError) -> bool:
    """httpx-aiohttp (identity/http_clients.py) reports every aiohttp
    connection error as ConnectTimeout, a server hanging up or a reset after
    connecting too: only aiohttp's failures to connect (refused, unresolved,
    timed out) are."""
    cause = exc.__cause__
    if not isinstance(cause, aiohttp.ClientError):
        return True
    return isinstance(cause, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError))

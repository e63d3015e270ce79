"""Model turns against the Responses API, over SSE or WebSocket.

Both transports yield the same event dicts; this module adds what they share:
the request body, retries of retryable failures before the first event, and
the rule that a stream is complete only at ``response.completed``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from identity.client_identity import ClientIdentity
from realtime.store.json_text import array_items, joined_arrays

from . import responses_sse, responses_ws, upstream_errors
from .config import UpstreamConfig
from .response_events import COMPLETED, FAILED_EVENTS, INCOMPLETE, NOT_CLIENT_OUTPUT
from .upstream_errors import UpstreamError


@dataclass(frozen=True, slots=True)
class ModelRequest:
    thread_id: str
    model: str
    # The earlier turns' input items, a JSON array's text as the store keeps
    # it: it goes into the body as it is, never decoded (threads.History).
    history: str
    input: list[dict[str, Any]]  # this turn's items, after the history
    instructions: str | None = None
    # turn/start's ``outputSchema``: the reply must be JSON of this schema
    # (the Codex TUI asks for a thread title this way).
    output_schema: dict[str, Any] | None = None
    tools: tuple[dict[str, Any], ...] = ()  # offered to the model; the agent loop runs its calls

    def body_json(self, **extra: Any) -> str:
        """The request body's JSON text, with ``extra`` fields (the
        transport's own) first and the input last. This turn's items are
        ASCII-escaped; the history is spliced in as stored (escaped as this
        server wrote it, or UTF-8 as PostgreSQL's jsonb gives it back)."""
        # Stateless, as Codex asks: nothing is stored upstream, and reasoning
        # comes back encrypted so the next turn can replay it.
        body: dict[str, Any] = {
            **extra,
            "model": self.model,
            "store": False,
            "include": ["reasoning.encrypted_content"],
        }
        if self.instructions:
            body["instructions"] = self.instructions
        if self.tools:
            body.update(tools=list(self.tools), tool_choice="auto", parallel_tool_calls=True)
        if self.output_schema is not None:
            body["text"] = {
                "format": {"type": "json_schema", "name": "codex_output_schema", "schema": self.output_schema, "strict": True}
            }
        items = joined_arrays([array_items(self.history), *(json.dumps(item) for item in self.input)])
        return json.dumps(body)[:-1] + ', "input": ' + items + "}"

    def session_headers(self) -> dict[str, str]:
        return {"session-id": self.thread_id, "x-client-request-id": self.thread_id}


def _open_transport(identity: ClientIdentity, request: ModelRequest, config: UpstreamConfig):
    transport = responses_ws if config.responses_transport == "websocket" else responses_sse
    return transport.stream_events(identity, request, config)


async def stream_model_response(
    identity: ClientIdentity,
    request: ModelRequest,
    config: UpstreamConfig | None = None,
    on_retry: Callable[[UpstreamError], None] | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """Yield Responses events for one turn, ending after ``response.completed``.

    Raises UpstreamError, including for ``response.failed``, ``error`` and
    ``response.incomplete`` (after yielding what came before). A retryable
    failure is retried, after ``on_retry`` is told, only while nothing has
    reached the client: a retry after text would repeat it. A transport ends
    its stream after the terminal event (the SSE one reads to the end of the
    body first, briefly, so its pooled connection can be reused).
    """
    config = config or UpstreamConfig.from_settings()
    tries = 0
    while True:
        tries += 1
        started = completed = False
        try:
            async with aclosing(_open_transport(identity, request, config)) as events:
                async for event in events:
                    if completed:
                        continue  # nothing after the end counts
                    kind = event.get("type")
                    if kind in FAILED_EVENTS or kind == INCOMPLETE:
                        yield event  # its usage was billed, and counts (the translator shows nothing of it)
                        if kind == INCOMPLETE:
                            raise upstream_errors.incomplete_response(event.get("response"))
                        raise upstream_errors.failed_response(_error_of(event))
                    started = started or kind not in NOT_CLIENT_OUTPUT
                    yield event
                    completed = kind == COMPLETED
            if completed:
                return
            raise upstream_errors.stream_disconnected("the stream ended without response.completed")
        except UpstreamError as error:
            if not error.retryable or started:
                raise
            if tries >= config.max_tries:
                raise upstream_errors.too_many_failed_attempts(error, tries) from error
            if on_retry is not None:
                on_retry(error)
        await asyncio.sleep(config.retry_backoff * 2 ** (tries - 1))


def _error_of(event: dict[str, Any]) -> Any:
    """``response.failed`` nests the error in the response; an ``error`` event
    nests it (``{"error": {...}}``, on the WebSocket beside an HTTP-like
    ``status``) or carries ``code``/``message`` at the top level."""
    response = event.get("response")
    if isinstance(response, dict) and response.get("error") is not None:
        return response["error"]
    error = event.get("error")
    if isinstance(error, dict):
        return {**error, "status": event["status"]} if isinstance(event.get("status"), int) else error
    return {key: event[key] for key in ("code", "message", "type", "param") if key in event}

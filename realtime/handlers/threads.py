"""``thread/start``: a thread owned by this connection."""

from __future__ import annotations

from typing import Any

from django.conf import settings

from ..params import optional_str, params_object
from ..protocol import INVALID_REQUEST, JsonRpcError
from ..services import telemetry
from ..services.config import UpstreamConfig
from ..threads import Thread, new_id


async def start_thread(context, params: Any) -> dict[str, Any]:
    params = params_object(params)
    if len(context.connection.threads) >= settings.CODEX_MAX_THREADS_PER_CONNECTION:
        raise JsonRpcError(INVALID_REQUEST, f"Thread limit reached ({settings.CODEX_MAX_THREADS_PER_CONNECTION} per connection)")
    config = UpstreamConfig.from_settings()
    thread = Thread(
        id=new_id(),
        model=optional_str(params, "model") or config.model,
        base_instructions=optional_str(params, "baseInstructions"),
    )
    connection = context.connection
    connection.threads[thread.id] = thread
    identity = context.identity

    def announce() -> None:
        connection.notify("thread/started", {"thread": thread.to_json()})
        telemetry.record_event(identity, telemetry.THREAD_STARTED, thread.id)

    context.after_reply(announce)
    return {"thread": thread.to_json()}

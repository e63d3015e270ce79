"""``thread/realtime/start`` and ``thread/realtime/stop``: a call and its sideband socket."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from django.conf import settings
from websockets.exceptions import ConnectionClosed

from realtime.services import realtime_calls, upstream_errors
from realtime.services.config import UpstreamConfig
from realtime.store.threads import RealtimeSession, Thread

from ..params import params_object, required_str
from ..protocol import INVALID_REQUEST, JsonRpcError

logger = logging.getLogger(__name__)

REALTIME_VERSION = "v2"


def _closed(thread: Thread, session: RealtimeSession, reason: str) -> dict[str, Any]:
    return {"threadId": thread.id, "callId": session.call_id, "reason": reason}


async def start_realtime(context, params: Any) -> dict[str, Any]:
    params = params_object(params)
    thread = context.subscribed_thread(required_str(params, "threadId"))
    sdp = _offer_sdp(params)
    if thread.realtime is not None:
        raise JsonRpcError(INVALID_REQUEST, "Realtime already started for this thread")
    connection = context.connection
    limit = settings.CODEX_MAX_REALTIME_CALLS_PER_CONNECTION
    if len(connection.realtime_sessions) >= limit:  # each holds an upstream call and socket
        raise JsonRpcError(INVALID_REQUEST, f"Realtime call limit reached ({limit} per connection)")
    identity, config = context.identity, UpstreamConfig.from_settings()
    session = RealtimeSession()
    connection.hold_upstream(session)  # -32001 past its principal's upstream streams
    thread.realtime = session
    connection.realtime_sessions.add(session)
    try:
        call = await realtime_calls.create_call(identity, sdp, config)
        async with upstream_errors.websocket_failures(config.api_base_url):
            socket = await realtime_calls.open_sideband(identity, call.call_id, config)
    except BaseException:
        thread.realtime = None
        connection.realtime_sessions.discard(session)
        connection.let_go_upstream(session)
        raise
    session.call_id = call.call_id
    session.notify_owner = connection.notify
    session.task = connection.spawn(_hold_sideband(connection, thread, session, socket), name=f"sideband {call.call_id}")

    def announce() -> None:
        started = {"threadId": thread.id, "callId": call.call_id, "version": REALTIME_VERSION, "realtimeSessionId": None}
        connection.notify("thread/realtime/started", started)
        connection.notify("thread/realtime/sdp", {"threadId": thread.id, "sdp": call.sdp_answer})

    context.after_reply(announce)
    return {"callId": call.call_id, "sdp": call.sdp_answer}


def _offer_sdp(params: dict[str, Any]) -> str:
    """The SDP offer: the schema's ``transport: {type: "webrtc", sdp}``, or PROTOCOL §5's ``sdp``."""
    transport = params.get("transport")
    if transport is None:
        return required_str(params, "sdp")
    if not isinstance(transport, dict) or transport.get("type") != "webrtc":
        raise JsonRpcError.invalid_params("transport must be {type: \"webrtc\", sdp}: calls are made over WebRTC")
    if not isinstance(transport.get("sdp"), str):
        raise JsonRpcError.invalid_params("transport.sdp must be a string")
    return transport["sdp"]


async def _hold_sideband(connection, thread: Thread, session: RealtimeSession, socket) -> None:
    """Keeps the sideband open until stop, disconnect (cancellation) or the upstream ends it."""
    try:
        async for _ in socket:
            pass  # call events are not relayed to the client yet
    except ConnectionClosed:
        pass
    finally:
        connection.realtime_sessions.discard(session)
        connection.let_go_upstream(session)
        await socket.close()
        if thread.realtime is session:
            thread.realtime = None
    logger.info("upstream ended realtime call %s", session.call_id)
    connection.notify("thread/realtime/closed", _closed(thread, session, "upstream ended the call"))


async def stop_realtime(context, params: Any) -> dict[str, Any]:
    params = params_object(params)
    thread = context.subscribed_thread(required_str(params, "threadId"))
    session = thread.realtime
    if session is None or session.task is None:
        raise JsonRpcError(INVALID_REQUEST, "No realtime call for this thread")
    thread.realtime = None
    session.task.cancel()
    await asyncio.wait([session.task])

    def announce() -> None:
        # Another subscriber may stop it: the connection that started it hears too.
        closed = _closed(thread, session, "stopped")
        context.notify("thread/realtime/closed", closed)
        if session.notify_owner is not None and session.notify_owner != context.connection.notify:
            session.notify_owner("thread/realtime/closed", closed)

    context.after_reply(announce)
    return {}

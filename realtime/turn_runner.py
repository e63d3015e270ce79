"""Runs one turn: stream the model's reply to the client under the turn's identity."""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from identity.client_identity import ClientIdentity

from .services import telemetry
from .services.config import UpstreamConfig
from .services.responses import ModelRequest, stream_model_response
from .services.upstream_errors import UpstreamError
from .threads import Thread, Turn
from .turn_events import TurnEventTranslator

if TYPE_CHECKING:
    from .connection import AppServerConnection

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TurnContext:
    """Everything a turn decides with, fixed when it starts: no decision reaches for a global."""

    identity: ClientIdentity
    connection: AppServerConnection
    thread: Thread
    turn: Turn
    user_message: dict[str, Any]
    config: UpstreamConfig


async def run_turn(turn_context: TurnContext) -> None:
    connection, thread, turn = turn_context.connection, turn_context.thread, turn_context.turn
    connection.notify("turn/started", {"threadId": thread.id, "turn": turn.to_json("inProgress")})
    translator = TurnEventTranslator(thread.id, turn.id, connection.notify)
    request = ModelRequest(
        thread_id=thread.id,
        model=thread.model,
        input=[*thread.history, turn_context.user_message],
        instructions=thread.base_instructions,
    )
    status, error = "completed", None
    try:
        async with aclosing(
            stream_model_response(turn_context.identity, request, turn_context.config)
        ) as events:
            async for event in events:
                await connection.outbox.wait_for_room()  # a slow client slows the stream
                translator.feed(event)
    except asyncio.CancelledError:
        if not turn.interrupt_requested:
            raise  # the connection is closing: nobody to tell
        asyncio.current_task().uncancel()
        status = "interrupted"
    except UpstreamError as exc:
        logger.info("turn %s failed: %s", turn.id, exc.message)
        status, error = "failed", exc.turn_error()
    except Exception:
        # Whatever went wrong, the client is owed a turn/completed.
        logger.exception("turn %s failed unexpectedly", turn.id)
        status, error = "failed", {"message": "internal error while streaming the turn", "codexErrorInfo": "other"}
    finally:
        thread.active_turn = None

    translator.finish()
    thread.remember(turn_context.user_message)
    if translator.text:
        thread.remember(assistant_message(translator.text))
    completed = turn.to_json(status)
    if error is not None:
        completed["error"] = error
    connection.notify("turn/completed", {"threadId": thread.id, "turn": completed})
    telemetry.record_event(turn_context.identity, telemetry.TURN_COMPLETED, thread.id, turn.id)


def user_message(text_parts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": text_parts}


def assistant_message(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]}

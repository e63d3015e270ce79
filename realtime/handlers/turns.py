"""``turn/start`` and ``turn/interrupt``: one running turn per thread."""

from __future__ import annotations

from typing import Any

from django.conf import settings

from ..params import optional_str, params_object, required_list, required_str
from ..protocol import INVALID_REQUEST, JsonRpcError
from ..services.config import UpstreamConfig
from ..threads import Turn, new_id
from ..turn_runner import TurnContext, run_turn, user_message


def _content_parts(items: list[Any]) -> list[dict[str, Any]]:
    if not items:
        raise JsonRpcError.invalid_params("input must not be empty")
    parts = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise JsonRpcError.invalid_params(f"input[{index}] must be an object")
        kind = item.get("type")
        if kind == "text":
            if not isinstance(item.get("text"), str):
                raise JsonRpcError.invalid_params(f"input[{index}].text must be a string")
            parts.append({"type": "input_text", "text": item["text"]})
        elif kind == "image" and isinstance(item.get("url"), str):
            parts.append({"type": "input_image", "image_url": item["url"]})
        else:
            # Refused rather than dropped: the user would lose what they sent.
            raise JsonRpcError.invalid_params(f"input[{index}].type {kind!r} is not supported")
    return parts


async def start_turn(context, params: Any) -> dict[str, Any]:
    params = params_object(params)
    thread = context.owned_thread(required_str(params, "threadId"))
    parts = _content_parts(required_list(params, "input"))
    model = optional_str(params, "model")
    if thread.active_turn is not None:
        raise JsonRpcError(INVALID_REQUEST, "Turn already in progress")
    if context.connection.running_turns >= settings.CODEX_MAX_RUNNING_TURNS_PER_CONNECTION:
        raise JsonRpcError.overloaded()
    if model:
        thread.model = model  # like Codex: the override sticks for later turns
    turn = thread.active_turn = Turn(new_id())
    turn_context = TurnContext(
        identity=context.identity,
        connection=context.connection,
        thread=thread,
        turn=turn,
        user_message=user_message(parts),
        config=UpstreamConfig.from_settings(),
    )

    def start() -> None:
        turn.task = context.connection.spawn(run_turn(turn_context), name=f"turn {turn.id}")

    context.after_reply(start)
    return {"turn": {**turn.to_json("inProgress"), "items": [], "error": None}}


async def interrupt_turn(context, params: Any) -> dict[str, Any]:
    params = params_object(params)
    thread = context.owned_thread(required_str(params, "threadId"))
    turn_id = required_str(params, "turnId")
    turn = thread.active_turn
    if turn is None or turn.id != turn_id:
        raise JsonRpcError.invalid_params("turnId is not the thread's running turn")
    turn.interrupt()
    return {}

"""A response's function calls, run side by side: every call gets exactly
one output for the model, whatever happens to it (PROTOCOL §11)."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from realtime.store.storable_text import made_storable
from realtime.tools import commands
from realtime.tools.commands import CallRefused, CommandContext, TurnCancelledByUser
from realtime.tools.definitions import EXEC_COMMAND, REQUEST_USER_INPUT, VIEW_IMAGE, WRITE_STDIN
from realtime.tools.dynamic_tools import call_dynamic_tool
from realtime.tools.images import view_image
from realtime.tools.user_input import request_user_input

from .stream_events import FunctionCall

logger = logging.getLogger(__name__)

ToolHandler = Callable[[CommandContext, str, dict[str, Any]], Awaitable[str | list[dict[str, Any]]]]
TOOLS: dict[str, ToolHandler] = {
    EXEC_COMMAND: commands.exec_command,
    WRITE_STDIN: commands.write_stdin,
    REQUEST_USER_INPUT: request_user_input,
    VIEW_IMAGE: view_image,
}


async def run_calls(calls: list[FunctionCall], context: CommandContext | None) -> list[dict[str, Any]]:
    """Each call's ``function_call_output`` item, in the calls' order. An
    approval answered ``cancel`` stops the others and raises TurnCancelledByUser."""
    try:
        async with asyncio.TaskGroup() as group:
            running = [group.create_task(_run(call, context)) for call in calls]
    except* TurnCancelledByUser:
        raise TurnCancelledByUser from None
    return [function_call_output(call, task.result()) for call, task in zip(calls, running, strict=True)]


def function_call_output(call: FunctionCall, output: str | list[dict[str, Any]]) -> dict[str, Any]:
    """The model input item of a call's output (text, or content parts). Stored
    and replayed: whatever a tool returned, nothing a database refuses."""
    # Content parts come from dynamic_tools, which made each storable.
    kept = made_storable(output) if isinstance(output, str) else output
    return {"type": "function_call_output", "call_id": call.call_id, "output": kept}


def aborted_output(call: FunctionCall) -> dict[str, Any]:
    """The output of a call the turn stopped before it finished."""
    return function_call_output(call, "aborted: the turn was stopped")


async def _run(call: FunctionCall, context: CommandContext | None) -> str | list[dict[str, Any]]:
    handler = TOOLS.get(call.name) if context is not None and call.namespace is None else None
    declared = context.dynamic_tools if context is not None else None
    if handler is None and declared is not None and (dynamic := declared.find(call.namespace, call.name)) is not None:
        handler = functools.partial(call_dynamic_tool, declared=declared, tool=dynamic)
    if handler is None:
        return f"unsupported call: {call.name} is not a tool of this server"
    try:
        arguments = json.loads(call.arguments or "{}")
    except ValueError:
        arguments = None
    if not isinstance(arguments, dict):
        return f"{call.name} takes a JSON object of arguments"
    try:
        return await handler(context, call.call_id, arguments)
    except CallRefused as refused:
        return str(refused)
    except TurnCancelledByUser:
        raise
    except Exception:  # the model is owed an output; the turn goes on
        logger.exception("tool call %s (%s) failed", call.call_id, call.name)
        return f"{call.name} failed on the server"

"""Dynamic tools (PROTOCOL §11): tools a client declares in ``thread/start``
and runs itself. The model is offered them on that thread; a call is the
server request ``item/tool/call`` to the connection that declared them, and
the ``contentItems`` it answers go back to the model as the call's output
(a ``dynamicToolCall`` item). If that connection has gone, the call fails and
the model is told.

They live with the thread as this process holds it (a client's tools are
only as good as its connection, which is here): a turn run by another
process, or after the thread was unloaded here, is offered none.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from realtime.store.storable_text import made_storable

from .commands import CommandContext
from .definitions import COMMAND_TOOLS

DYNAMIC_TOOL_CALL = "dynamicToolCall"
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # what the Responses API takes as a function name
MAX_TOOLS = 128
MAX_DESCRIPTION_CHARS = 8_192
MAX_SCHEMA_BYTES = 64 * 1024
MAX_OUTPUT_CHARS = 1024 * 1024  # of a call's answer, text and image URLs together
BUILT_IN_NAMES = frozenset(tool["name"] for tool in COMMAND_TOOLS)


class ClientGone(Exception):
    """The connection that declared the tools closed before it answered."""


@dataclass(frozen=True, slots=True)
class DynamicTool:
    namespace: str | None
    name: str
    description: str
    input_schema: dict[str, Any]

    def function(self) -> dict[str, Any]:
        return {
            "type": "function",
            "name": self.name,
            "description": self.description,
            "strict": False,
            "parameters": self.input_schema,
        }


@dataclass(frozen=True, slots=True)
class DeclaredTools:
    """A thread's dynamic tools and the way to the connection that runs them."""

    tools: tuple[DynamicTool, ...]
    namespaces: tuple[tuple[str, str], ...]  # (name, description), in the order declared
    ask: Callable[[str, dict[str, Any]], Awaitable[Any]]  # a server request to the declaring connection

    def for_model(self) -> tuple[dict[str, Any], ...]:
        """As the Responses API takes them: functions, and namespaces of functions."""
        offered: list[dict[str, Any]] = [tool.function() for tool in self.tools if tool.namespace is None]
        for name, description in self.namespaces:
            functions = [tool.function() for tool in self.tools if tool.namespace == name]
            offered.append({"type": "namespace", "name": name, "description": description, "tools": functions})
        return tuple(offered)

    def find(self, namespace: str | None, name: str) -> DynamicTool | None:
        """The tool a call names: exactly, else (a call without its namespace)
        the one namespace's tool of that name, if only one has it."""
        exact = [tool for tool in self.tools if tool.name == name and tool.namespace == namespace]
        if exact or namespace is not None:
            return exact[0] if exact else None
        matches = [tool for tool in self.tools if tool.name == name]
        return matches[0] if len(matches) == 1 else None


def parse_dynamic_tools(value: Any) -> tuple[tuple[DynamicTool, ...], tuple[tuple[str, str], ...]]:
    """``thread/start``'s ``dynamicTools`` (the schema's DynamicToolSpec[]);
    ValueError says what is wrong with it."""
    if not isinstance(value, list):
        raise ValueError("dynamicTools must be an array")
    tools: list[DynamicTool] = []
    namespaces: list[tuple[str, str]] = []
    for index, spec in enumerate(value):
        where = f"dynamicTools[{index}]"
        if not isinstance(spec, dict):
            raise ValueError(f"{where} must be an object")
        if spec.get("type") == "namespace":
            name = _name(spec.get("name"), f"{where}.name")
            if not isinstance(spec.get("tools"), list):
                raise ValueError(f"{where}.tools must be an array")
            namespaces.append((name, _description(spec.get("description"), where)))
            tools += [_function(tool, f"{where}.tools[{i}]", name) for i, tool in enumerate(spec["tools"])]
        else:
            tool = _function(spec, where, None)
            if tool.name in BUILT_IN_NAMES:
                raise ValueError(f"{where}.name {tool.name!r} is a tool of this server")
            tools.append(tool)
    if len(tools) > MAX_TOOLS:
        raise ValueError(f"dynamicTools declares {len(tools)} tools; at most {MAX_TOOLS}")
    names = [(tool.namespace, tool.name) for tool in tools]
    if len(set(names)) != len(names) or len({name for name, _ in namespaces}) != len(namespaces):
        raise ValueError("dynamicTools names a tool or a namespace twice")
    return tuple(tools), tuple(namespaces)


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not TOOL_NAME.match(value):
        raise ValueError(f"{where} must be 1 to 64 letters, digits, '_' or '-'")
    return value


def _description(value: Any, where: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_DESCRIPTION_CHARS:
        raise ValueError(f"{where}.description must be a string of at most {MAX_DESCRIPTION_CHARS} characters")
    return made_storable(value)


def _function(spec: Any, where: str, namespace: str | None) -> DynamicTool:
    if not isinstance(spec, dict) or spec.get("type") != "function":
        raise ValueError(f"{where} must be a function or a namespace")
    schema = spec.get("inputSchema")
    if not isinstance(schema, dict) or len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise ValueError(f"{where}.inputSchema must be a JSON Schema object of at most {MAX_SCHEMA_BYTES} bytes")
    return DynamicTool(namespace, _name(spec.get("name"), f"{where}.name"), _description(spec.get("description"), where), schema)


async def call_dynamic_tool(
    context: CommandContext, call_id: str, arguments: Any, *, declared: DeclaredTools, tool: DynamicTool
) -> str | list[dict[str, Any]]:
    """Ask the declaring client to run ``tool``; its answer is the model's output."""
    started = time.monotonic()
    item = {
        "id": call_id,
        "type": DYNAMIC_TOOL_CALL,
        "tool": tool.name,
        "namespace": tool.namespace,
        "arguments": arguments,
        "status": "inProgress",
        "contentItems": None,
        "success": None,
        "durationMs": None,
    }
    record = context.start_item(item)
    params = {
        "threadId": context.thread_id,
        "turnId": context.turn_id,
        "callId": call_id,
        "tool": tool.name,
        "namespace": tool.namespace,
        "arguments": arguments,
    }
    try:
        content, success = _answer(await declared.ask("item/tool/call", params))
    except ClientGone:
        content, success = [{"type": "inputText", "text": f"{tool.name}: the client that provides it has disconnected"}], False
    except BaseException:  # the turn stopped: the item still ends
        context.complete_item(record, {**item, "status": "failed", "success": False, "durationMs": _ms(started)})
        raise
    context.complete_item(
        record,
        {**item, "status": "completed" if success else "failed", "contentItems": content, "success": success, "durationMs": _ms(started)},
    )
    return _model_output(content)


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _answer(answer: Any) -> tuple[list[dict[str, Any]], bool]:
    """The client's DynamicToolCallResponse, kept to the schema and bounded."""
    if not isinstance(answer, dict) or not isinstance(answer.get("contentItems"), list):
        return [{"type": "inputText", "text": "the client answered the tool call with an error"}], False
    content: list[dict[str, Any]] = []
    budget = MAX_OUTPUT_CHARS
    for part in answer["contentItems"]:
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        field = {"inputText": "text", "inputImage": "imageUrl"}.get(kind)
        if field is None or not isinstance(part.get(field), str):
            continue  # audio and unknown kinds: the model could not take them as a call's output
        if kind == "inputImage" and len(part[field]) > budget:
            # A cut URL is no image, and the API would refuse it in every later turn's history.
            content.append({"type": "inputText", "text": "[an image too large to keep was left out]"})
            continue
        value = made_storable(part[field][:budget])
        budget -= len(value)
        content.append({"type": kind, field: value})
        if budget <= 0:
            break
    return content, answer.get("success") is not False


def _model_output(content: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """The call's output for the Responses API: text, or text and images."""
    if all(part["type"] == "inputText" for part in content):
        return "\n".join(part["text"] for part in content)
    return [
        {"type": "input_text", "text": part["text"]} if part["type"] == "inputText" else {"type": "input_image", "image_url": part["imageUrl"]}
        for part in content
    ]


"""One mapping from Responses stream events to app-server item notifications (PROTOCOL §10).

Both transports (SSE and WebSocket) feed the same translator, so the
notifications a client sees do not depend on how the model was reached. It
keeps the turn's items (``turn.items``), the reply text and reasoning items
to replay to the model next turn, and the usage the response reported.
A response's function calls are collected for the agent loop
(``end_response``), which runs them and asks the model again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from realtime.store.storable_text import made_storable, storable_str
from realtime.store.threads import ItemRecord, Turn, new_id, now_ms

AGENT_MESSAGE = "agentMessage"
REASONING = "reasoning"
WEB_SEARCH_CALL = "web_search_call"  # the hosted tool's item (PROTOCOL §11): a webSearch item
PHASES = frozenset({"commentary", "partial_answer", "final_answer"})  # the schema's MessagePhase
TEXT_DELTAS = ("response.output_text.delta", "response.refusal.delta")
MAX_ITEM_ID_CHARS = 256  # the API's ids are a few dozen characters


@dataclass(eq=False)
class _Item:
    id: str
    record: ItemRecord
    completed: bool = False


@dataclass(eq=False)
class _AgentMessage(_Item):
    parts: list[str] = field(default_factory=list)  # joined once, not re-concatenated per delta
    final_text: str | None = None  # the done item's text, when it has one
    phase: str | None = None

    @property
    def text(self) -> str:
        return self.final_text if self.final_text is not None else "".join(self.parts)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "type": AGENT_MESSAGE, "text": self.text, "phase": self.phase}


@dataclass(eq=False)
class _Call(_Item):
    """A function call's place among the response's items (never a ThreadItem)."""


@dataclass(eq=False)
class _Reasoning(_Item):
    summary: dict[int, list[str]] = field(default_factory=dict)
    content: dict[int, list[str]] = field(default_factory=dict)
    encrypted_content: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": REASONING,
            "summary": ["".join(parts) for _, parts in sorted(self.summary.items())],
            "content": ["".join(parts) for _, parts in sorted(self.content.items())],
        }

    def model_input(self) -> dict[str, Any] | None:
        """The item to replay next turn (stateless: the encrypted content is the
        model's context; Codex sends it without the id)."""
        if self.encrypted_content is None:
            return None
        summary = [{"type": "summary_text", "text": text} for text in self.to_json()["summary"]]
        return {"type": REASONING, "summary": summary, "encrypted_content": self.encrypted_content}


@dataclass(eq=False)
class _WebSearch(_Item):
    """The API's hosted search: the upstream ran it; we show and replay it."""

    action: dict[str, Any] | None = None  # the API's, as the done item said it

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "type": "webSearch", "query": _search_query(self.action), "action": _wire_action(self.action)}

    def model_input(self) -> dict[str, Any] | None:
        """Replayed as Codex does: what was searched, not what was found (the
        sources are the upstream's; the model's reply already cites them)."""
        if self.action is None:
            return None
        action = {key: value for key, value in self.action.items() if key in ("type", "query", "queries", "url", "pattern")}
        return {"type": WEB_SEARCH_CALL, "status": "completed", "action": action}


@dataclass(frozen=True, slots=True)
class FunctionCall:
    """A tool call the model made; ``arguments`` is its JSON text, as sent."""

    call_id: str
    name: str
    arguments: str
    namespace: str | None = None  # a call of a namespace's function (a client's dynamic tools)

    def model_input(self) -> dict[str, Any]:
        called = {"type": "function_call", "call_id": self.call_id, "name": self.name, "arguments": self.arguments}
        return called if self.namespace is None else {**called, "namespace": self.namespace}


class TurnEventTranslator:
    """Feeds a turn's items (``turn.items``) and tells ``notify`` as they change."""

    def __init__(self, thread_id: str, turn: Turn, notify: Callable[[str, dict[str, Any]], None]):
        self.thread_id = thread_id
        self.turn = turn
        self.turn_id = turn.id
        self._notify = notify
        self._items: dict[str, _Item] = {}  # this response's, by upstream item id, or output index
        self._calls: dict[str, FunctionCall] = {}  # this response's function calls, by item key, in order
        self._earlier: list[_Item] = []  # the turn's earlier responses' items
        self.usages: list[dict[str, Any]] = []  # each response's, as the upstream reported it
        self.completed = False  # response.completed was seen

    @property
    def text(self) -> str:
        """Everything the model said this turn, messages in order."""
        items = [*self._earlier, *self._items.values()]
        return "".join(item.text for item in items if isinstance(item, _AgentMessage))

    @property
    def function_calls(self) -> list[FunctionCall]:
        """The tool calls of the response being read."""
        return list(self._calls.values())

    def model_input(self) -> list[dict[str, Any]]:
        """The response being read as model input for later requests:
        reasoning, replies and function calls, in the order they came."""
        replay: list[dict[str, Any]] = []
        for key, item in self._items.items():
            if isinstance(item, _Reasoning) and (reasoning := item.model_input()) is not None:
                replay.append(reasoning)
            elif isinstance(item, _AgentMessage) and item.text:
                replay.append({"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": item.text}]})
            elif isinstance(item, _Call) and key in self._calls:
                replay.append(self._calls[key].model_input())
            elif isinstance(item, _WebSearch) and (search := item.model_input()) is not None:
                replay.append(search)
        return replay

    def end_response(self) -> list[dict[str, Any]]:
        """The response that called tools is over: its items close, and what
        it said is returned as model input; the next response starts afresh."""
        replay = self.model_input()
        for item in self._items.values():
            self._complete(item)
        self._earlier += self._items.values()
        self._items, self._calls = {}, {}
        self.completed = False
        return replay

    def feed(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind in ("response.output_item.added", "response.output_item.done"):
            self._output_item(event, done=kind.endswith(".done"))
        elif kind in TEXT_DELTAS:
            self._text_delta(event)
        elif kind == "response.reasoning_summary_part.added":
            reasoning = self._reasoning(event)
            index = _index(event, "summary_index")
            reasoning.summary.setdefault(index, [])
            self._item_notification("item/reasoning/summaryPartAdded", itemId=reasoning.id, summaryIndex=index)
        elif kind == "response.reasoning_summary_text.delta":
            self._reasoning_delta(event, "summary_index", "summary", "item/reasoning/summaryTextDelta", "summaryIndex")
        elif kind == "response.reasoning_text.delta":
            self._reasoning_delta(event, "content_index", "content", "item/reasoning/textDelta", "contentIndex")
        elif kind in ("response.completed", "response.incomplete", "response.failed"):
            # An incomplete or failed response was billed too: its usage counts (issue 24, 9).
            self.completed = self.completed or kind == "response.completed"
            response = _object(event.get("response"))
            if isinstance(response.get("usage"), dict):
                self.usages.append(response["usage"])

    def announce(self, record: ItemRecord) -> None:
        """Tell of an item that is whole before the model says anything (the user's message)."""
        self._item_notification("item/started", item=record.item, startedAtMs=record.started_at_ms)
        self._item_notification("item/completed", item=record.item, completedAtMs=record.completed_at_ms)

    def finish(self) -> None:
        """At the end of the turn, however it ended: close every open item."""
        for item in [*self._earlier, *self._items.values()]:
            self._complete(item)

    # --- items ----------------------------------------------------------------

    def _key(self, event: dict[str, Any], item_id: Any) -> str:
        # Items without an id are told apart by their place in the output.
        return item_id if isinstance(item_id, str) and item_id else f"output:{event.get('output_index', 0)}"

    def _output_item(self, event: dict[str, Any], done: bool) -> None:
        item = _object(event.get("item"))
        key = self._key(event, item.get("id"))
        if item.get("type") == "message":
            message = self._message(key)
            if item.get("phase") in PHASES:
                message.phase = item["phase"]
            if done:
                final = _content_text(item)
                if final is not None:
                    message.final_text = final
                self._complete(message)
        elif item.get("type") == "function_call":
            self._function_call(key, item)
        elif item.get("type") == WEB_SEARCH_CALL:
            search = self._items.get(key)
            if not isinstance(search, _WebSearch):
                search = _WebSearch(*self._new_item(key))
                self._start(key, search)
            if done:
                search.action = _search_action(item.get("action"))
                self._complete(search)
        elif item.get("type") == REASONING:
            reasoning = self._reasoning_item(key)
            if isinstance(item.get("encrypted_content"), str):
                reasoning.encrypted_content = made_storable(item["encrypted_content"])
            if done:
                _fill_parts(reasoning.summary, item.get("summary"))
                _fill_parts(reasoning.content, item.get("content"))
                self._complete(reasoning)

    def _function_call(self, key: str, item: dict[str, Any]) -> None:
        """Kept, not shown: what the call does becomes its own item when it runs."""
        if key not in self._items:
            self._items[key] = _Call(key, ItemRecord({}, now_ms()), completed=True)
        call_id, name = item.get("call_id"), item.get("name")
        if isinstance(call_id, str) and call_id and isinstance(name, str):
            arguments = item.get("arguments") if isinstance(item.get("arguments"), str) else ""
            namespace = made_storable(item["namespace"]) if isinstance(item.get("namespace"), str) else None
            self._calls[key] = FunctionCall(made_storable(call_id), made_storable(name), made_storable(arguments), namespace)

    def _text_delta(self, event: dict[str, Any]) -> None:
        # Every delta of the reply comes here: its ordinary case (an item
        # already started, found by its upstream id) calls no helper but
        # made_storable, and builds _item_notification's params itself.
        delta = event.get("delta")
        if not isinstance(delta, str) or not delta:
            return
        delta = made_storable(delta)
        item_id = event.get("item_id")
        message = self._items.get(item_id) if isinstance(item_id, str) else None
        if not isinstance(message, _AgentMessage):
            message = self._message(self._key(event, item_id))
        message.parts.append(delta)
        self._notify(
            "item/agentMessage/delta",
            {"threadId": self.thread_id, "turnId": self.turn_id, "itemId": message.id, "delta": delta},
        )

    def _reasoning(self, event: dict[str, Any]) -> _Reasoning:
        return self._reasoning_item(self._key(event, event.get("item_id")))

    def _reasoning_delta(self, event: dict[str, Any], index_name: str, part: str, method: str, wire_index: str) -> None:
        delta = _text(event.get("delta"))
        if not delta:
            return
        reasoning = self._reasoning(event)
        index = _index(event, index_name)
        getattr(reasoning, part).setdefault(index, []).append(delta)
        self._item_notification(method, itemId=reasoning.id, delta=delta, **{wire_index: index})

    def _message(self, key: str) -> _AgentMessage:
        message = self._items.get(key)
        if not isinstance(message, _AgentMessage):
            message = _AgentMessage(*self._new_item(key))
            self._start(key, message)
        return message

    def _reasoning_item(self, key: str) -> _Reasoning:
        reasoning = self._items.get(key)
        if not isinstance(reasoning, _Reasoning):
            reasoning = _Reasoning(*self._new_item(key))
            self._start(key, reasoning)
        return reasoning

    def _new_item(self, key: str) -> tuple[str, ItemRecord]:
        # The upstream's id where it is one a client and the databases can
        # take; the key stays the upstream's, so its deltas still find the item.
        upstream_id = not key.startswith("output:") and len(key) <= MAX_ITEM_ID_CHARS and storable_str(key)
        return (key if upstream_id else new_id()), ItemRecord({}, now_ms())

    def _start(self, key: str, item: _AgentMessage | _Reasoning | _WebSearch) -> None:
        self._items[key] = item
        item.record.item = item.to_json()
        self.turn.items.append(item.record)
        self._item_notification("item/started", item=item.record.item, startedAtMs=item.record.started_at_ms)

    def _complete(self, item: _Item) -> None:
        if not item.completed:
            item.completed = True
            item.record.item = item.to_json()
            item.record.completed_at_ms = now_ms()
            self._item_notification("item/completed", item=item.record.item, completedAtMs=item.record.completed_at_ms)

    def _item_notification(self, method: str, **params: Any) -> None:
        # (_text_delta builds the same params for each delta: change both)
        self._notify(method, {"threadId": self.thread_id, "turnId": self.turn_id, **params})


def _text(value: Any) -> str | None:
    """A delta's text, as it can be stored (``made_storable``)."""
    return made_storable(value) if isinstance(value, str) else None


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _index(event: dict[str, Any], name: str) -> int:
    value = event.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _content_text(item: dict[str, Any]) -> str | None:
    """A done message's text: its output_text parts, or its refusal."""
    content = item.get("content")
    if not isinstance(content, list):
        return None
    parts = [
        part.get("text") if part.get("type") == "output_text" else part.get("refusal")
        for part in content
        if isinstance(part, dict) and part.get("type") in ("output_text", "refusal")
    ]
    parts = [part for part in parts if isinstance(part, str)]
    return made_storable("".join(parts)) if parts else None


def _fill_parts(parts: dict[int, list[str]], done: Any) -> None:
    """The done item's summary or content texts replace what the deltas built."""
    if not isinstance(done, list):
        return
    for index, part in enumerate(done):
        if isinstance(part, dict) and isinstance(part.get("text"), str):
            parts[index] = [made_storable(part["text"])]


# The API's web search action types (the schema names them in camelCase).
SEARCH_ACTIONS = frozenset({"search", "open_page", "find_in_page"})


def _search_action(action: Any) -> dict[str, Any] | None:
    """The done item's action, kept to what the schema and a replay use, storable."""
    if not isinstance(action, dict) or not isinstance(action.get("type"), str):
        return None
    kept: dict[str, Any] = {"type": action["type"] if action["type"] in SEARCH_ACTIONS else "other"}
    for name in ("query", "url", "pattern"):
        if isinstance(action.get(name), str):
            kept[name] = made_storable(action[name])
    if isinstance(action.get("queries"), list):
        kept["queries"] = [made_storable(query) for query in action["queries"] if isinstance(query, str)]
    return kept


def _wire_action(action: dict[str, Any] | None) -> dict[str, Any] | None:
    if action is None:
        return None
    kind = action["type"]
    if kind == "search":
        return {"type": "search", "query": action.get("query"), "queries": action.get("queries")}
    if kind == "open_page":
        return {"type": "openPage", "url": action.get("url")}
    if kind == "find_in_page":
        return {"type": "findInPage", "url": action.get("url"), "pattern": action.get("pattern")}
    return {"type": "other"}


def _search_query(action: dict[str, Any] | None) -> str:
    """One line for the item's ``query``, as Codex shows a search."""
    if action is None:
        return ""
    if action["type"] == "search":
        queries = action.get("queries") or []
        return action.get("query") or (queries[0] + (" ..." if len(queries) > 1 else "") if queries else "")
    if action["type"] == "open_page":
        return action.get("url") or ""
    if action["type"] == "find_in_page":
        return f"'{action.get('pattern') or ''}' in {action.get('url') or ''}"
    return ""

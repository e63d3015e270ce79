"""One mapping from Responses stream events to app-server item notifications.

Both transports (SSE and WebSocket) feed the same translator, so the
notifications a client sees do not depend on how the model was reached.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .threads import ItemRecord, Turn, new_id, now_ms

AGENT_MESSAGE = "agentMessage"


@dataclass(eq=False)
class _AgentMessage:
    id: str
    record: ItemRecord
    parts: list[str] = field(default_factory=list)  # joined once, not re-concatenated per delta
    completed: bool = False

    @property
    def text(self) -> str:
        return "".join(self.parts)


class TurnEventTranslator:
    """Feeds a turn's items (``turn.items``) and tells ``notify`` as they change."""

    def __init__(self, thread_id: str, turn: Turn, notify: Callable[[str, dict[str, Any]], None]):
        self.thread_id = thread_id
        self.turn = turn
        self.turn_id = turn.id
        self._notify = notify
        self._messages: dict[str, _AgentMessage] = {}

    @property
    def text(self) -> str:
        """Everything the model said this turn, items in order."""
        return "".join(message.text for message in self._messages.values())

    def feed(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "response.output_item.added":
            item = _object(event.get("item"))
            if item.get("type") == "message":
                self._message(item.get("id"))
        elif kind == "response.output_text.delta":
            delta = event.get("delta")
            if isinstance(delta, str) and delta:
                message = self._message(event.get("item_id"))
                message.parts.append(delta)
                self._item_notification(
                    "item/agentMessage/delta", itemId=message.id, delta=delta
                )
        elif kind == "response.output_item.done":
            item = _object(event.get("item"))
            if item.get("type") == "message":
                message = self._message(item.get("id"))
                final = _message_text(item)
                if final is not None and not message.parts:
                    message.parts.append(final)
                self._complete(message)

    def finish(self) -> None:
        """At the end of the turn, however it ended: close every open item."""
        for message in self._messages.values():
            self._complete(message)

    def _message(self, upstream_id: Any) -> _AgentMessage:
        key = upstream_id if isinstance(upstream_id, str) else ""
        message = self._messages.get(key)
        if message is None:
            item_id = key or new_id()
            record = ItemRecord({"id": item_id, "type": AGENT_MESSAGE, "text": ""}, now_ms())
            message = self._messages[key] = _AgentMessage(item_id, record)
            self.turn.items.append(record)
            self._item_notification("item/started", item=record.item, startedAtMs=record.started_at_ms)
        return message

    def _complete(self, message: _AgentMessage) -> None:
        if not message.completed:
            message.completed = True
            record = message.record
            record.item = {**record.item, "text": message.text}
            record.completed_at_ms = now_ms()
            self._item_notification("item/completed", item=record.item, completedAtMs=record.completed_at_ms)

    def _item_notification(self, method: str, **params: Any) -> None:
        self._notify(method, {"threadId": self.thread_id, "turnId": self.turn_id, **params})


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _message_text(item: dict[str, Any]) -> str | None:
    content = item.get("content")
    if not isinstance(content, list):
        return None
    parts = [
        part.get("text")
        for part in content
        if isinstance(part, dict) and part.get("type") == "output_text" and isinstance(part.get("text"), str)
    ]
    return "".join(parts) if parts else None

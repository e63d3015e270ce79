"""One mapping from Responses stream events to app-server item notifications.

Both transports (SSE and WebSocket) feed the same translator, so the
notifications a client sees do not depend on how the model was reached.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .threads import new_id

AGENT_MESSAGE = "agentMessage"


@dataclass(eq=False)
class _AgentMessage:
    id: str
    parts: list[str] = field(default_factory=list)  # joined once, not re-concatenated per delta
    completed: bool = False

    @property
    def text(self) -> str:
        return "".join(self.parts)


class TurnEventTranslator:
    def __init__(self, thread_id: str, turn_id: str, notify: Callable[[str, dict[str, Any]], None]):
        self.thread_id = thread_id
        self.turn_id = turn_id
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
            message = self._messages[key] = _AgentMessage(key or new_id())
            self._item_notification("item/started", item=self._item(message))
        return message

    def _complete(self, message: _AgentMessage) -> None:
        if not message.completed:
            message.completed = True
            self._item_notification("item/completed", item=self._item(message))

    @staticmethod
    def _item(message: _AgentMessage) -> dict[str, Any]:
        return {"id": message.id, "type": AGENT_MESSAGE, "text": message.text}

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

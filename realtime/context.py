"""What a method handler gets: its connection, identity and an after-reply hook."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from identity.client_identity import ClientIdentity

from .protocol import JsonRpcError, Request
from .threads import Thread, thread_store

if TYPE_CHECKING:
    from .connection import AppServerConnection

logger = logging.getLogger(__name__)


class RequestContext:
    def __init__(self, connection: AppServerConnection, request: Request):
        self.connection = connection
        self.request = request
        self._after_reply: list[Callable[[], Any]] = []

    @property
    def identity(self) -> ClientIdentity:
        """The connection's identity; handlers other than initialize always have one."""
        assert self.connection.identity is not None
        return self.connection.identity

    def notify(self, method: str, params: dict[str, Any]) -> None:
        self.connection.notify(method, params)

    def after_reply(self, callback: Callable[[], Any]) -> None:
        """Run ``callback`` once the reply is queued, still inside the identity scope."""
        self._after_reply.append(callback)

    def run_after_reply(self) -> None:
        for callback in self._after_reply:
            try:
                callback()
            except Exception:
                logger.exception("work after the reply to %s failed", self.request.method)

    def subscribed_thread(self, thread_id: str) -> Thread:
        """A thread this connection started or resumed (PROTOCOL §5); any other is unknown."""
        thread = self.connection.threads.get(thread_id)
        if thread is None:
            raise JsonRpcError.invalid_params("unknown threadId")
        return thread

    def stored_thread(self, thread_id: str) -> Thread:
        """Any thread of the store, for reading and resuming (one server is one tenant)."""
        thread = thread_store.get(thread_id)
        if thread is None:
            raise JsonRpcError.invalid_params("unknown threadId")
        return thread

"""What a method handler gets: its connection, identity and an after-reply hook."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from identity.client_identity import ClientIdentity
from identity.principals import AuthenticatedPrincipal
from realtime.fanout.thread_hub import thread_hub
from realtime.store.thread_store import DatabaseThreads
from realtime.store.threads import Thread

from .protocol import JsonRpcError, Request

if TYPE_CHECKING:
    from .connection import AppServerConnection

logger = logging.getLogger(__name__)

MAX_ID_CHARS = 64  # thread ids are UUIDs; StoredThread.thread_id holds 64


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

    @property
    def principal(self) -> AuthenticatedPrincipal:
        return self.connection.principal

    def subscribed_thread(self, thread_id: str) -> Thread:
        """A thread this connection started or resumed (PROTOCOL §5); any other
        is unknown. It can only have subscribed to its principal's."""
        thread = self.connection.threads.get(thread_id)
        if thread is None:
            raise JsonRpcError.invalid_params("unknown threadId")
        return thread

    async def stored_thread(self, thread_id: str) -> tuple[Thread, bool]:
        """Any thread of this connection's principal, for reading and resuming,
        and whether a turn of it runs on another process. A thread loaded here
        is this process's object, brought up to date from the store. Another
        principal's thread is unknown, by the same path as a made-up id: the
        store's query names the principal (PROTOCOL §12)."""
        principal_id = self.principal.id
        local = thread_hub().get(thread_id)
        if local is not None and local.ephemeral and local.principal_id == principal_id:
            return local, False
        if len(thread_id) > MAX_ID_CHARS or not thread_id.isascii() or "\x00" in thread_id:  # never one of ours
            raise JsonRpcError.invalid_params("unknown threadId")
        stored = await DatabaseThreads.load(thread_id, principal_id)
        if stored is None:
            raise JsonRpcError.invalid_params("unknown threadId")
        return thread_hub().as_seen_here(*stored)

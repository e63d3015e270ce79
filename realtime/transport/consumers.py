"""The WebSocket transport: frames in, frames out, lifecycle. Protocol lives elsewhere."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import uuid
from http import HTTPStatus

from channels.consumer import get_handler_name
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from codexserver.freed_memory import freed_memory
from codexserver.health import channel_layer_available
from identity.actions import record_connection_closed, record_connection_opened
from identity.principals import AuthenticatedPrincipal
from realtime.lifecycle.process import process_lifecycle
from realtime.rpc.connection import CLOSE_POLICY_VIOLATION, AppServerConnection
from realtime.rpc.protocol import MAX_FRAME_BYTES, JsonRpcError

from .connection_limits import SERVICE_UNAVAILABLE, connection_limits
from .outbox import WRITE_NOW_EXTENSION, Outbox
from .upgrade_policy import (
    DENIAL_EXTENSION,
    UNAUTHORIZED,
    bearer_token,
    refusal_headers,
    token_gate,
    upgrade_refusal,
)

logger = logging.getLogger(__name__)

_closing: set[asyncio.Future] = set()  # connections closed after their consumer was cancelled

CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013


class DatabaseUnavailable(Exception):
    """The upgrade cannot be recorded: refused with 503."""


def _frame_size(text_data: str | None, bytes_data: bytes | None) -> int:
    if bytes_data is not None:
        return len(bytes_data)
    if len(text_data) * 4 <= MAX_FRAME_BYTES:  # UTF-8 is at most 4 bytes a character
        return len(text_data)
    return len(text_data.encode("utf-8", "surrogatepass"))


def _peer_address(scope: dict) -> str | None:
    """The client's IP address, or None. Under daphne's ``--proxy-headers`` it
    comes from ``X-Forwarded-For``, which a client can write anything into:
    a value that is not an IP address is dropped, never stored (or a 500)."""
    client = scope.get("client") or (None,)
    try:
        return str(ipaddress.ip_address(client[0]))
    except ValueError:
        if client[0] is not None:
            logger.warning("ignoring a client address that is not an IP address: %r", str(client[0])[:100])
        return None


class AppServerConsumer(AsyncWebsocketConsumer):
    # No channel of its own on the layer: other processes reach a connection
    # through this process's thread hub (one layer channel per process), so
    # a channel per consumer would only cost a pending receive per connection.
    channel_layer_alias = None

    connection: AppServerConnection | None = None
    _writer: asyncio.Task | None = None
    _closing: asyncio.Task | None = None  # held: the loop keeps only weak references to tasks
    _row_closed: asyncio.Future | None = None
    _peer: str | None = None
    _holds_place = False  # counted in connection_limits, under _peer

    async def __call__(self, scope, receive, send):
        # However the consumer ends: daphne cancels one still busy 10 s after
        # its socket closed, and channels then calls no disconnect. Its place,
        # its row, its tasks, its writer and its subscriptions must not outlive it.
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._uncount()
            if self.connection is not None and self._row_closed is None:
                ending = asyncio.ensure_future(self._close_connection())
                _closing.add(ending)  # the loop keeps only weak references to tasks
                ending.add_done_callback(_closing.discard)

    async def dispatch(self, message):
        # channels retires the database connections of asgiref's shared thread
        # before every message: a thread round trip per frame, spent on a
        # connection this consumer never uses (rows are written on
        # identity.actions' own threads, which retire theirs around each call).
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    async def connect(self):
        """Called at the upgrade: refuse it, or open the row and accept."""
        refusal = upgrade_refusal(self.scope)
        if refusal is not None:
            logger.info("refused a WebSocket upgrade with HTTP %d", refusal)
            await self._refuse(refusal)
            return
        peer = _peer_address(self.scope)
        refusal = connection_limits().admit(peer)
        if refusal is not None:
            logger.info("refused a WebSocket upgrade with HTTP %d: too many connections", refusal)
            await self._refuse(refusal)
            return
        self._peer, self._holds_place = peer, True
        try:
            await self._open(peer)
        finally:
            if self.connection is None:  # refused, or failed: it holds no place
                self._uncount()

    def _uncount(self) -> None:
        if self._holds_place:
            self._holds_place = False
            connection_limits().release(self._peer)

    async def _open(self, peer: str | None) -> None:
        bearer, gate = bearer_token(self.scope), token_gate()
        if gate.refuses(bearer):
            logger.info("refused a WebSocket upgrade with HTTP %d: no valid token", UNAUTHORIZED)
            await self._refuse(UNAUTHORIZED)
            return
        connection_id = uuid.uuid4()
        try:
            principal = await self._open_row(connection_id, bearer, peer)
        except DatabaseUnavailable:
            await self._refuse(SERVICE_UNAVAILABLE)
            return
        gate.learn(principal)
        if principal is None:
            logger.info("refused a WebSocket upgrade with HTTP %d: no valid token", UNAUTHORIZED)
            await self._refuse(UNAUTHORIZED)
            return
        write_now = self.scope.get("extensions", {}).get(WRITE_NOW_EXTENSION, {}).get("write")
        outbox = Outbox(
            self._send_text,
            on_overflow=self._drop_slow_client,
            stall_seconds=settings.CODEX_CLIENT_STALL_TIMEOUT,
            write_now=write_now,
            on_write_failure=self._drop_after_a_failed_write,
        )
        self.connection = AppServerConnection(connection_id, outbox, self.scope, principal, close_socket=self._close_soon)
        await self.accept()
        self._writer = outbox.start()
        self._writer.add_done_callback(self._writer_stopped)

    async def _open_row(self, connection_id: uuid.UUID, bearer: str | None, peer: str | None) -> AuthenticatedPrincipal | None:
        """Check the token and write the connection's row: the principal, or
        None when the token is refused. Raises DatabaseUnavailable when the
        database or the channel layer is down: the upgrade is refused rather
        than left half-open."""
        if not await channel_layer_available():
            raise DatabaseUnavailable
        lifecycle = process_lifecycle()
        try:
            await lifecycle.ensure_started()
            return await record_connection_opened(
                connection_id,
                settings.CODEX_SERVER_INSTANCE,
                lifecycle.boot_id,
                peer,
                bearer,
            )
        except Exception as exc:
            logger.warning("refusing a WebSocket upgrade: the database is unavailable (%s)", type(exc).__name__)
            raise DatabaseUnavailable from None

    async def receive(self, text_data=None, bytes_data=None):
        """Called for each frame from the client."""
        if self.connection is None:
            return
        frame_size = _frame_size(text_data, bytes_data)
        if frame_size > MAX_FRAME_BYTES:
            logger.warning("closing connection %s: frame of %d bytes", self.connection.connection_id, frame_size)
            await self.close(code=CLOSE_MESSAGE_TOO_BIG)
            return
        if bytes_data is not None:
            self.connection.send_error(None, JsonRpcError.parse_error("binary frames are not accepted"))
            return
        await self.connection.handle_frame(text_data)

    async def disconnect(self, code):
        """Called when the socket has closed, whichever side closed it."""
        self._uncount()
        if self.connection is None:
            return
        await self._close_connection()

    async def _close_connection(self) -> None:
        # The row first, and shielded: daphne cancels a consumer that is slow
        # to finish, and the close must not be lost with it.
        self._row_closed = asyncio.ensure_future(record_connection_closed(self.connection.connection_id))
        await self.connection.close()  # it stops the outbox's writer too
        freed_memory.release_after(self.connection.outbox.peak_bytes)
        await asyncio.shield(self._row_closed)

    async def _refuse(self, status: int) -> None:
        await refuse_upgrade(self.scope, self.base_send, status)

    async def _send_text(self, text: str) -> None:
        await self.send(text_data=text)

    def _writer_stopped(self, writer: asyncio.Task) -> None:
        # Cancelled at disconnect as planned; anything else leaves a socket
        # nobody writes to, so close it rather than let the client hang.
        if not writer.cancelled() and writer.exception() is not None:
            logger.error("outbound writer failed; closing the connection", exc_info=writer.exception())
            self._close_soon(CLOSE_INTERNAL_ERROR)

    def _drop_slow_client(self) -> None:
        self.connection.abandon()
        self._close_soon(CLOSE_TRY_AGAIN_LATER)

    def _drop_after_a_failed_write(self) -> None:
        self.connection.abandon()
        self._close_soon(CLOSE_INTERNAL_ERROR)

    def _close_soon(self, code: int) -> None:
        """Close from a synchronous callback (the outbox's, a task's)."""
        if code == CLOSE_POLICY_VIOLATION and self.connection is not None and self.connection.identity is None:
            connection_limits().cool_off(self._peer)  # closed for never saying who it is: not again at once
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self.close(code=code))


async def refuse_upgrade(scope: dict, send, status: int) -> None:
    """Refuse a WebSocket upgrade with ``status``. Without the denial-response
    extension an ASGI server can only say 403."""
    if DENIAL_EXTENSION in scope.get("extensions", {}):
        await send({"type": "websocket.http.response.start", "status": status, "headers": refusal_headers(status)})
        await send({"type": "websocket.http.response.body", "body": HTTPStatus(status).phrase.encode()})
    else:
        await send({"type": "websocket.close"})


async def no_such_path(scope: dict, receive, send) -> None:
    """An upgrade anywhere but ``/``: 404, before any auth."""
    if (await receive())["type"] == "websocket.connect":
        await refuse_upgrade(scope, send, HTTPStatus.NOT_FOUND)

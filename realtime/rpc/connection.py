"""Protocol state of one WebSocket connection: identity, threads, tasks, outbox.

The consumer hands every decoded text frame to ``handle_frame``. ``initialize``
runs inline, so no later request can overtake it; every other request runs as
its own task inside the connection's identity scope, so a streaming turn never
blocks the socket and everything the request starts inherits the identity.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
import weakref
from collections import Counter
from collections.abc import Callable, Coroutine
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

from django.conf import settings

from codexserver.loop_local import LoopLocal
from identity.client_identity import ClientIdentity
from identity.principals import AuthenticatedPrincipal
from identity.scope import identity_scope
from realtime.fanout.thread_hub import thread_hub
from realtime.services.upstream_errors import UpstreamError
from realtime.store.threads import Thread
from realtime.tools.dynamic_tools import ClientGone

from . import protocol
from .handlers import HANDLERS, INITIALIZE, INTERRUPT, STORE_READS
from .protocol import ClientResponse, JsonRpcError, Notification, Request
from .request_context import RequestContext

if TYPE_CHECKING:  # the transport above builds it and hands it in
    from realtime.transport.outbox import Outbox

logger = logging.getLogger(__name__)

CLOSE_GRACE_SECONDS = 5.0

# Every open connection of this process, for shutdown (daphne cancels the
# consumers without a disconnect). Weak: a closed connection just disappears.
live_connections: weakref.WeakSet[AppServerConnection] = weakref.WeakSet()


CLOSE_POLICY_VIOLATION = 1008  # its token was revoked (PROTOCOL §12), or it never initialized
MAX_REFUSED_INITIALIZES = 16  # initialize requests refused on one connection, then it is closed
FIRST_FRAMES = 20  # frames a new connection may send at once: a Codex TUI sends about a dozen as it starts
# turn/interrupt requests of one connection running side by side: one per
# running turn (CODEX_MAX_RUNNING_TURNS_PER_CONNECTION's default).
MAX_INTERRUPTS_IN_FLIGHT = 16
# Store reads (handlers.STORE_READS) of one connection running at once.
MAX_STORE_READS_IN_FLIGHT = 2


# Upstream holders (turns, realtime calls) of each principal on this process.
_held_by_principal: LoopLocal[Counter[int]] = LoopLocal(Counter)


class AppServerConnection:
    def __init__(
        self,
        connection_id: uuid.UUID,
        outbox: Outbox,
        asgi_scope: dict[str, Any],
        principal: AuthenticatedPrincipal,
        close_socket: Callable[[int], None] | None = None,
    ):
        self.connection_id = connection_id
        self.outbox = outbox
        self.asgi_scope = asgi_scope
        # Whose it is, fixed at the upgrade: it sees only this principal's threads.
        self.principal = principal
        asgi_scope["codex_principal"] = principal
        # The principal's budget as last read (the process's principal watch
        # refreshes it): a turn/start checks stored usage only where there is one.
        self.token_budget = principal.token_budget
        self._close_socket = close_socket  # the transport's: close with a code
        self._revoked = False
        # Server requests sent to it and not yet resolved: id → the channel of the process that asked.
        self.server_requests: dict[str, str | None] = {}
        # Server requests to this connection alone (its dynamic tools' calls): id → its answer.
        self._own_requests: dict[str, asyncio.Future] = {}
        self.identity: ClientIdentity | None = None
        self.opted_out: frozenset[str] = frozenset()
        self.threads: dict[str, Thread] = {}  # subscribed to
        self.own_turns: set = set()  # turns this connection started that have not ended
        self.realtime_sessions: set = set()  # its realtime calls, starting or open
        self._upstream_holders: set = set()  # its turns and realtime calls, counted for its principal
        self._tasks: set[asyncio.Task] = set()
        self._requests_in_flight = 0
        self._interrupts_in_flight = 0
        self.store_reads = asyncio.Semaphore(MAX_STORE_READS_IN_FLIGHT)
        self._refused_initializes = 0
        # A new connection starts with a few frames' credit, not a whole
        # second's: a client reconnecting in a loop gets no burst for free.
        self._frame_tokens, self._tokens_at = float(FIRST_FRAMES), None
        self._closed = False
        live_connections.add(self)

    # --- identity -----------------------------------------------------------

    def adopt_identity(self, identity: ClientIdentity, opted_out: frozenset[str]) -> None:
        """Called once, by ``initialize``, after the row holds the identity."""
        self.identity = identity
        self.opted_out = opted_out
        self.asgi_scope["codex_identity"] = identity

    # --- threads ------------------------------------------------------------

    async def subscribe(self, thread: Thread) -> Thread:
        """Follow ``thread``'s notifications; returns this process's object for it."""
        thread = await thread_hub().subscribe(thread, self)
        self.threads[thread.id] = thread
        return thread

    async def unsubscribe(self, thread: Thread) -> None:
        self.threads.pop(thread.id, None)
        await thread_hub().unsubscribe(thread, self)

    # --- frames in ----------------------------------------------------------

    async def handle_frame(self, text: str) -> None:
        if self._closed:  # closing (the server's shutdown): nothing new may start
            return
        await self._pace()
        try:
            message = protocol.parse_message(text)
        except JsonRpcError as error:
            self.send_error(error.request_id, error)  # (a frame it could not read leaves it open: PROTOCOL §3)
            if error.method == INITIALIZE:  # (one nested too deep)
                self._count_refusal()
            return
        if isinstance(message, Request):
            await self._handle_request(message)
        elif isinstance(message, Notification):
            self._handle_notification(message)
        elif isinstance(message, ClientResponse):
            self._take_client_response(message)

    async def _pace(self) -> None:
        """At most CODEX_MAX_FRAMES_PER_SECOND frames of this connection are
        read a second (bursts of as many allowed, once earned): past that, its next frame
        waits, and so does its socket, so a client flooding cheap requests
        slows itself, not the process's other connections. Nothing is refused."""
        rate = settings.CODEX_MAX_FRAMES_PER_SECOND
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._tokens_at is None:
            self._tokens_at = now
        self._frame_tokens = min(rate, self._frame_tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        if self._frame_tokens < 1:
            await asyncio.sleep((1 - self._frame_tokens) / rate)
            self._frame_tokens, self._tokens_at = 1.0, loop.time()
        self._frame_tokens -= 1

    async def _handle_request(self, request: Request) -> None:
        if request.method == INITIALIZE:
            await self._run_request(request)
        elif self.identity is None:
            self.send_error(request.id, JsonRpcError.not_initialized())
        elif request.method == INTERRUPT:
            # Always accepted (PROTOCOL §3: it is what relieves the pressure),
            # but a few at a time are all anyone needs: past those, the next
            # runs before this connection's next frame is read (5,000
            # pipelined ones all ran at once before).
            if self._interrupts_in_flight >= MAX_INTERRUPTS_IN_FLIGHT:
                await self._run_request(request)
                return
            self._interrupts_in_flight += 1
            task = self.spawn(self._run_request(request), name=f"request {request.method}")
            task.add_done_callback(self._interrupt_done)
        elif self.outbox.overloaded or self._requests_in_flight >= settings.CODEX_MAX_REQUESTS_IN_FLIGHT:
            self.send_error(request.id, JsonRpcError.overloaded())
        else:
            self._requests_in_flight += 1
            task = self.spawn(self._run_request(request), name=f"request {request.method}")
            task.add_done_callback(self._request_done)

    def _take_client_response(self, response: ClientResponse) -> None:
        """The client answered a server request (an approval): to the process
        that asked; the first answer from any subscriber wins there."""
        own = self._own_requests.pop(response.id, None) if isinstance(response.id, str) else None
        if own is not None:
            if not own.done():
                own.set_result(response.result if response.error is None else None)
            return
        if response.id not in self.server_requests:
            logger.debug("ignoring a client response to id %r", response.id)
            return
        asked_by = self.server_requests.pop(response.id)
        result = response.result if response.error is None else None
        self.spawn(thread_hub().answer(response.id, asked_by, result), name=f"answer {response.id}")

    def _request_done(self, task: asyncio.Task) -> None:
        self._requests_in_flight -= 1

    def _interrupt_done(self, task: asyncio.Task) -> None:
        self._interrupts_in_flight -= 1

    def _handle_notification(self, notification: Notification) -> None:
        # `initialized` needs no reply; other client notifications are not used yet.
        logger.debug("client notification %s", notification.method)

    async def _run_request(self, request: Request) -> None:
        context = RequestContext(self, request)
        # The scope covers the failure's log line too: it names whose request failed.
        with self._identity_scope():
            try:
                handler = HANDLERS.get(request.method)
                if handler is None:
                    raise JsonRpcError.method_not_found(request.method)
                async with self.store_reads if request.method in STORE_READS else nullcontext():
                    result = await handler(context, request.params)
            except JsonRpcError as error:
                self._refuse(request, error)
                return
            except UpstreamError as error:
                self.send_error(request.id, JsonRpcError.upstream_failure(error.message, error.codex_error_info))
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("request %s failed", request.method)
                self._refuse(request, JsonRpcError.internal_error())
                return
        # One reply per id, always: work after the reply can fail, but
        # never answer the request a second time.
        self.send(protocol.response(request.id, result))
        with self._identity_scope():
            context.run_after_reply()

    def _refuse(self, request: Request, error: JsonRpcError) -> None:
        self.send_error(request.id, error)
        if request.method == INITIALIZE:
            self._count_refusal()

    def _count_refusal(self) -> None:
        """An ``initialize`` refused: a client that cannot say who it is, again
        and again, is closed (1008)."""
        if self.identity is not None:
            return
        self._refused_initializes += 1
        if self._refused_initializes == MAX_REFUSED_INITIALIZES:
            logger.info("closing connection %s: initialize refused %d times", self.connection_id, MAX_REFUSED_INITIALIZES)
            self.abandon()
            if self._close_socket is not None:
                self._close_socket(CLOSE_POLICY_VIOLATION)

    def _identity_scope(self) -> AbstractContextManager:
        # The one place a request enters its scope; `initialize` runs before
        # there is an identity, so it runs in none.
        if self.identity is None:
            return nullcontext()
        return identity_scope(self.identity, str(self.connection_id))

    # --- frames out ---------------------------------------------------------

    def send(self, message: dict[str, Any]) -> None:
        # (notify does this inline)
        if not self._closed:
            self.outbox.put(message)

    def send_error(self, request_id, error: JsonRpcError) -> None:
        self.send(protocol.error_response(request_id, error))

    def notify(self, method: str, params: dict[str, Any]) -> None:
        # (send's work, inline: every delta of every turn comes here)
        if method not in self.opted_out and not self._closed:
            self.outbox.put({"method": method, "params": params})

    def send_server_request(self, request_id: str, asked_by: str | None, method: str, params: dict[str, Any]) -> None:
        """A request of the server's own (an approval), answered by a ClientResponse."""
        if self._closed or request_id in self.server_requests:
            return  # (one it was sent already, heard twice across processes)
        self.server_requests[request_id] = asked_by
        self.send({"id": request_id, "method": method, "params": params})

    def forget_server_request(self, request_id: str) -> None:
        self.server_requests.pop(request_id, None)

    async def ask(self, method: str, params: dict[str, Any]) -> Any:
        """A server request to this connection alone (a call of a tool it
        declared): the answer's ``result``, None for an error answer.
        ClientGone if it closes first; a request the turn stops waiting
        for is resolved (``serverRequest/resolved``), as an approval is."""
        if self._closed:
            raise ClientGone
        request_id = f"request-{uuid.uuid4()}"
        answered = asyncio.get_running_loop().create_future()
        self._own_requests[request_id] = answered
        self.send({"id": request_id, "method": method, "params": params})
        try:
            return await answered
        finally:
            if self._own_requests.pop(request_id, None) is not None:  # stopped waiting: no answer is wanted now
                self.notify("serverRequest/resolved", {"threadId": params.get("threadId"), "requestId": request_id})

    def _fail_own_requests(self) -> None:
        pending, self._own_requests = self._own_requests, {}
        for answered in pending.values():
            if not answered.done():
                answered.set_exception(ClientGone())

    # --- tasks --------------------------------------------------------------

    def spawn(self, coro: Coroutine, name: str | None = None) -> asyncio.Task:
        """Start work owned by this connection; it is cancelled at disconnect,
        and right after its first step if the connection is closing: that step
        enters its ``try``, so its ``finally`` still closes what it holds (a
        realtime call's sideband socket, a turn's stream and record)."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        if self._closed:
            asyncio.get_running_loop().call_soon(task.cancel)  # after the step create_task scheduled
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("task %s failed", task.get_name(), exc_info=task.exception())

    def hold_upstream(self, holder: Any) -> None:
        """Count ``holder`` (a turn, a realtime call: each holds upstream
        streams) toward this connection's principal on this process; -32001
        past CODEX_MAX_UPSTREAM_STREAMS_PER_PRINCIPAL, so one principal's
        many connections cannot take the whole shared upstream pool."""
        held, limit = _held_by_principal.get(), settings.CODEX_MAX_UPSTREAM_STREAMS_PER_PRINCIPAL
        if holder in self._upstream_holders:
            return
        if limit and held[self.principal.id] >= limit:
            raise JsonRpcError.overloaded()
        self._upstream_holders.add(holder)
        held[self.principal.id] += 1

    def let_go_upstream(self, holder: Any) -> None:
        if holder in self._upstream_holders:
            self._upstream_holders.discard(holder)
            held = _held_by_principal.get()
            held[self.principal.id] -= 1
            if not held[self.principal.id]:
                del held[self.principal.id]

    @property
    def running_turns(self) -> int:
        # Its own turns, subscribed or not: unsubscribing does not free a slot.
        return len(self.own_turns)

    def revoke(self) -> None:
        """Its token was revoked: nothing more runs for it, and the socket
        closes with 1008."""
        if self._revoked:
            return
        self._revoked = True
        logger.info("closing connection %s: its token was revoked", self.connection_id)
        self.abandon()
        if self._close_socket is not None:
            self._close_socket(CLOSE_POLICY_VIOLATION)

    def abandon(self) -> None:
        """The client is being dropped for not reading: nothing more can reach
        it, so nothing more starts and its work stops now, not at disconnect.
        The socket's close waits out the close handshake, and a turn in the
        meantime would read the rest of its stream for nobody: four flooding
        turns held the event loop for a second and more."""
        self._closed = True
        self._fail_own_requests()
        for task in list(self._tasks):
            task.cancel()

    async def close(self) -> None:
        """Called at disconnect: cancel every task; their upstream streams close with them."""
        self._closed = True
        self._fail_own_requests()
        live_connections.discard(self)
        try:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            if tasks:
                _, pending = await asyncio.wait(tasks, timeout=CLOSE_GRACE_SECONDS)
                if pending:
                    logger.warning("%d task(s) did not stop within %ss", len(pending), CLOSE_GRACE_SECONDS)
            # After the tasks: a turn that ended on the way out was still told to its subscribers.
            for thread in list(self.threads.values()):
                try:
                    await self.unsubscribe(thread)
                except Exception as exc:  # the layer is down: its group forgets us when it expires
                    logger.warning("could not leave thread %s: %s", thread.id, exc)
        finally:
            # Also when daphne cancels a consumer still closing at shutdown:
            # the writer must not outlive its connection.
            self.outbox.stop()
            for holder in list(self._upstream_holders):  # (a turn never started, its reply never sent)
                self.let_go_upstream(holder)

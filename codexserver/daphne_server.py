"""daphne, tuned for the app-server: the one place we reach into its internals.

Eight gaps in stock daphne 4.2 matter to us:
- it refuses every WebSocket upgrade with 403; we need 401 for a missing
  bearer token. ASGI's "websocket.http.response" extension lets the consumer
  choose the status, so we advertise and implement it.
- autobahn drops the TCP connection on an oversized frame (``failByDrop``);
  we want the close frame with code 1009 sent first.
- it has no start or shutdown hook for the application: at start we record
  this process's boot, close the rows of processes that stopped beating and
  start our heartbeat; at shutdown, the rows of our own connections (daphne
  cancels them without a disconnect) and buffered telemetry.
- its process keeps CPython's collector defaults, made for small heaps; we
  collect less often (``tune_garbage_collector``).
- its ``send`` never waits: a client that stops reading makes Twisted buffer
  without bound, and the consumer never learns. We register the protocol as
  the socket's push producer and hold each ``websocket.send`` while Twisted
  says its write buffer is full, so the consumer's bounded outbox fills and
  the slow client is dropped (PROTOCOL §3) instead of the process growing.
- it reads a socket as fast as the client writes, into an unbounded queue
  of frames for the consumer: a client sending faster than it is served
  (CODEX_MAX_FRAMES_PER_SECOND paces each connection) grew the process by
  every frame it sent, about 1 MiB a second, kept after it left. Past
  PAUSE_READING_AT frames waiting, the socket is not read until the
  consumer has caught up (``ReadPacedQueue``): the kernel's buffers fill
  and the client's sends wait instead.
- its access log writes each request's path and query as they came, past
  the logging formatter that redacts secrets; we pass it through the same
  redaction and escaping (``RedactedAccessLog``).
- each frame sent takes the ASGI send's task switch and dozen awaits, and
  autobahn builds a debug line's arguments for it, logged or not: together
  about a third of the server's Python calls for a streamed turn. A
  connection's outbox writes through ``write_text_now`` when nothing waits
  before the frame and the socket has room (``WRITE_NOW_EXTENSION``), and
  ``sendData`` skips that line.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from functools import partial
from urllib.parse import unquote

import txaio
from autobahn.twisted.websocket import ConnectionDeny
from daphne.access import AccessLogGenerator
from daphne.cli import CommandLineInterface
from daphne.server import Server
from daphne.ws_protocol import WebSocketProtocol
from twisted.internet import defer, reactor
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from codexserver.log_format import escape_controls, redact_secrets
from realtime.transport.outbox import WRITE_NOW_EXTENSION
from realtime.transport.upgrade_policy import DENIAL_EXTENSION

logger = logging.getLogger(__name__)

SERVER_CLOSE_CODES = frozenset({1000, 1001, 1008, 1009, 1011, 1013})
# Frames of one WebSocket waiting for its consumer: at this many its socket
# stops being read, and from this few it is read again.
PAUSE_READING_AT, RESUME_READING_AT = 64, 16
DEBUG_LEVELS = frozenset({"debug", "trace"})  # txaio's levels below info
GC_THRESHOLDS = (10_000, 10, 10)  # gc.set_threshold; see tune_garbage_collector


@implementer(IPushProducer)
class AppServerWebSocketProtocol(WebSocketProtocol):
    """daphne's protocol plus the ASGI denial response and write backpressure."""

    _denial_status: int | None = None
    _denial_headers: tuple[tuple[str, str], ...] = ()
    _writable: asyncio.Event | None = None

    def connectionMade(self):
        super().connectionMade()
        self._writable = asyncio.Event()
        self._writable.set()
        # After the upgrade the HTTP channel is still the socket's producer;
        # unregistering is safe when there is none (TCP and TLS alike).
        self.transport.unregisterProducer()
        self.transport.registerProducer(self, True)

    # IPushProducer: Twisted pauses us when the socket's write buffer is full.
    def pauseProducing(self):
        self._writable.clear()

    def resumeProducing(self):
        self._writable.set()

    def stopProducing(self):
        self._writable.set()

    def unregisterProducer(self):
        # autobahn lets go of us when the close handshake starts: from then on
        # nothing waits for room, and sends are dropped (handle_reply).
        super().unregisterProducer()
        if self._writable is not None:
            self._writable.set()

    def connectionLost(self, reason):
        if self._writable is not None:
            self._writable.set()
        super().connectionLost(reason)

    async def wait_writable(self) -> None:
        if self._writable is not None:
            await self._writable.wait()

    def handle_reply(self, message):
        kind = message.get("type")
        if kind == "websocket.http.response.start" and self.state == self.STATE_CONNECTING:
            self._denial_status = int(message["status"])
            self._denial_headers = tuple(
                (name.decode("latin-1"), value.decode("latin-1")) for name, value in message.get("headers", ())
            )
            return
        if kind == "websocket.http.response.body" and self._denial_status is not None:
            if not message.get("more_body", False):
                self._deny(self._denial_status, message.get("body", b"").decode("utf-8", "replace"))
            return
        if kind == "websocket.send" and self.state in (self.STATE_CLOSING, self.STATE_CLOSED):
            return  # the close has begun: autobahn would raise, and the peer would never read it
        super().handle_reply(message)

    def write_text_now(self, text: str) -> bool:
        """The outbox's write, past the ASGI send (WRITE_NOW_EXTENSION): a text
        frame into the socket's buffer now, True; or False, and the frame
        goes the ASGI way, which waits for room or drops it once closing."""
        if self.state != self.STATE_OPEN or not self._writable.is_set():
            return False
        limit, self.maxMessagePayloadSize = self.maxMessagePayloadSize, 0  # as serverSend does
        try:
            self.sendMessage(text.encode("utf-8"), False)
        finally:
            self.maxMessagePayloadSize = limit
        return True

    def serverSend(self, content, binary=False):
        # autobahn applies the message size limit to both directions. The
        # 1 MiB limit is for what clients send (PROTOCOL §3); what we send (a
        # long reply's item/completed) may be larger.
        limit, self.maxMessagePayloadSize = self.maxMessagePayloadSize, 0
        try:
            super().serverSend(content, binary)
        finally:
            self.maxMessagePayloadSize = limit

    def sendData(self, data, sync=False, chopsize=None):
        # autobahn builds a debug line's arguments for every frame it writes,
        # logged or not: two qualified names and three click-styled strings,
        # 17% of the server's Python calls for a streamed turn. The ordinary
        # case (nothing queued, no chopping) is written here as autobahn
        # 26.10 writes it, without that line; anything else, or autobahn at
        # debug level, is autobahn's own.
        if sync or chopsize or self.send_queue or txaio.get_global_log_level() in DEBUG_LEVELS:
            super().sendData(data, sync, chopsize)
            return
        self.transport.write(data)
        if self.state == self.STATE_OPEN:
            self.trafficStats.outgoingOctetsWireLevel += len(data)
        elif self.state in (self.STATE_CONNECTING, self.STATE_PROXY_CONNECTING):
            self.trafficStats.preopenOutgoingOctetsWireLevel += len(data)
        if self.logOctets:
            self.logTxOctets(data, False)

    def serverClose(self, code=None):
        # autobahn's sendClose lets applications use only 1000 and 3000-4999,
        # but the registered codes we send (1009 message too big, 1011 internal
        # error, 1013 try again later) are valid for a server to put on the wire.
        if code is None or not (code in SERVER_CLOSE_CODES or 3000 <= code <= 4999):
            code = 1000
        self.sendCloseFrame(code=code, isReply=False)

    def failHandshake(self, reason, code=400, responseHeaders=None):
        # autobahn's ConnectionDeny carries no headers; a denial's own (a
        # 401's WWW-Authenticate) are added here.
        if code == 400 and reason.startswith("HTTP Origin header invalid"):
            code = 403  # an Origin that is no URL is just one more Origin not allowed (PROTOCOL §2)
        return super().failHandshake(reason, code, [*(responseHeaders or ()), *self._denial_headers])

    def _deny(self, status: int, reason: str) -> None:
        if not hasattr(self, "handshake_deferred"):
            return
        self.handshake_deferred.errback(ConnectionDeny(code=status, reason=reason or "Denied"))
        del self.handshake_deferred
        self.server.protocol_disconnected(self)
        logger.debug("WebSocket %s denied with HTTP %d", self.client_addr, status)


class ReadPacedQueue(asyncio.Queue):
    """One WebSocket's messages for its consumer; reading its socket pauses
    while PAUSE_READING_AT of them wait. (The disconnect goes through it too,
    once the socket is read again: the consumer drains the queue first.)"""

    def __init__(self, transport) -> None:
        super().__init__()
        self._transport = transport
        self._paused = False

    def put_nowait(self, item) -> None:
        super().put_nowait(item)
        if not self._paused and self.qsize() >= PAUSE_READING_AT:
            self._paused = True
            self._transport.pauseProducing()

    async def get(self):
        item = await super().get()
        if self._paused and self.qsize() <= RESUME_READING_AT:
            self._paused = False
            self._transport.resumeProducing()
        return item


class RedactedAccessLog:
    """daphne's access log, written where the operator chose, but through our
    redaction and escaping: its lines carry the request's path and query
    (``GET /healthz?api_key=sk-…``; a ``%0a`` in a path is a newline)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        # Redacted as it came and once decoded: a secret in a query string may arrive percent-encoded.
        line = redact_secrets(escape_controls(unquote(redact_secrets(text.removesuffix("\n")))))
        return self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


class AppServerDaphne(Server):
    def __init__(self, *args, action_logger=None, **kwargs):
        if isinstance(action_logger, AccessLogGenerator):
            action_logger.stream = RedactedAccessLog(action_logger.stream)
        super().__init__(*args, action_logger=action_logger, **kwargs)

    async def handle_reply(self, protocol, message):
        if message.get("type") == "websocket.send" and isinstance(protocol, AppServerWebSocketProtocol):
            await protocol.wait_writable()
        await super().handle_reply(protocol, message)

    def create_application(self, protocol, scope):
        if not isinstance(protocol, AppServerWebSocketProtocol):
            return super().create_application(protocol, scope)
        # daphne's own, with the extension we implement and a queue that paces reading.
        assert "application_instance" not in self.connections[protocol]
        extensions = {DENIAL_EXTENSION: {}, WRITE_NOW_EXTENSION: {"write": protocol.write_text_now}}
        scope = {**scope, "extensions": {**scope.get("extensions", {}), **extensions}}
        scope.setdefault("asgi", {"version": "3.0"})
        input_queue = ReadPacedQueue(protocol.transport)
        application_instance = self.application(scope=scope, receive=input_queue.get, send=partial(self.handle_reply, protocol))
        if protocol not in self.connections:
            return None
        self.connections[protocol]["application_instance"] = asyncio.ensure_future(application_instance)
        return input_queue

    def run(self):
        tune_garbage_collector()
        # The factory is made inside run(); adjust it once the reactor starts.
        reactor.callWhenRunning(self._tune_websocket_factory)
        reactor.callWhenRunning(self._run_soon, "start")
        reactor.addSystemEventTrigger("before", "shutdown", self._run_soon, "shut_down")
        super().run()

    @staticmethod
    def _run_soon(step: str) -> defer.Deferred:
        from realtime.lifecycle import process as lifecycle

        deferred = defer.Deferred.fromFuture(asyncio.ensure_future(getattr(lifecycle, step)()))
        # Twisted's own log goes nowhere at daphne's default verbosity.
        deferred.addErrback(lambda failure: logger.error("%s failed: %s", step, failure.getTraceback()))
        return deferred

    def _tune_websocket_factory(self) -> None:
        self.ws_factory.protocol = AppServerWebSocketProtocol
        # `Origin: null` (a sandboxed page, a file) goes to the application,
        # which refuses it with 403 unless CODEX_ALLOWED_ORIGINS lists it;
        # daphne's options made autobahn answer 400 itself.
        self.ws_factory.setProtocolOptions(failByDrop=False, allowNullOrigin=True)
        build = self.http_factory.buildProtocol
        self.http_factory.buildProtocol = lambda addr: with_deadline(build(addr))


def with_deadline(protocol):
    """The protocol, each of its requests under a deadline."""
    if protocol is not None:
        request_deadline(getattr(protocol, "_channel", protocol))  # (Twisted's proxy holds the HTTP channel)
    return protocol


def request_deadline(channel) -> None:
    """Abort a connection whose request (head and body; the WebSocket
    upgrade's included) is not whole within CODEX_REQUEST_HEAD_SECONDS of
    its first byte (of the accept, for the first). Twisted restarts its
    idle timeout at every byte, so a client sending one every 20 s held its
    socket (and a file descriptor) for good: 260 of them made real upgrades
    and /healthz fail on a 256-descriptor limit. A request being answered is
    never cut: the deadline is off from its last byte to its response's end."""
    from django.conf import settings

    data_received, content_received, lost = channel.dataReceived, channel.allContentReceived, channel.connectionLost
    deadline = None

    def arm() -> None:
        nonlocal deadline
        if deadline is None or not deadline.active():
            deadline = reactor.callLater(settings.CODEX_REQUEST_HEAD_SECONDS, expire)

    def disarm() -> None:
        if deadline is not None and deadline.active():
            deadline.cancel()

    def on_data(data):
        if not channel._handlingRequest:  # (a kept-alive connection's next request is starting)
            arm()
        data_received(data)

    def all_content_received():
        disarm()
        content_received()

    def connection_lost(reason):
        disarm()
        lost(reason)

    def expire():
        if channel.transport is not None and not channel._handlingRequest:
            logger.info("closing a connection that sent no whole request within %gs", settings.CODEX_REQUEST_HEAD_SECONDS)
            channel.transport.abortConnection()

    channel.dataReceived, channel.allContentReceived, channel.connectionLost = on_data, all_content_received, connection_lost
    arm()


def tune_garbage_collector() -> None:
    """Collect less often than CPython's defaults, which were made for small
    heaps. A server holding thousands of connections tracks millions of
    objects, and each full collection walks them all: in a burst of 2,000
    turns, full collections took 1.9 s of the burst's 5 s (timed with
    ``gc.callbacks``). The young generation is now collected every 10,000 net
    allocations instead of 700, the older ones at the default ratios, and the
    objects made at start-up (modules, settings, the application) are frozen
    out of every walk."""
    gc.collect()  # start-up's garbage is not frozen with it
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class AppServerCommandLine(CommandLineInterface):
    server_class = AppServerDaphne

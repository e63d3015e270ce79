"""daphne, tuned for the app-server: the one place we reach into its internals.

Three gaps in stock daphne 4.2 matter to us:
- it refuses every WebSocket upgrade with 403; we need 401 for a missing
  bearer token. ASGI's "websocket.http.response" extension lets the consumer
  choose the status, so we advertise and implement it.
- autobahn drops the TCP connection on an oversized frame (``failByDrop``);
  we want the close frame with code 1009 sent first.
- it has no shutdown hook for the application; buffered telemetry must be
  flushed before the process exits.
"""

from __future__ import annotations

import asyncio
import logging

from autobahn.twisted.websocket import ConnectionDeny
from daphne.cli import CommandLineInterface
from daphne.server import Server
from daphne.ws_protocol import WebSocketProtocol
from twisted.internet import defer, reactor

from realtime.upgrade_policy import DENIAL_EXTENSION

logger = logging.getLogger(__name__)



class DenialCapableWebSocketProtocol(WebSocketProtocol):
    """Adds the ASGI WebSocket Denial Response to daphne's protocol."""

    _denial_status: int | None = None

    def handle_reply(self, message):
        kind = message.get("type")
        if kind == "websocket.http.response.start" and self.state == self.STATE_CONNECTING:
            self._denial_status = int(message["status"])
            return
        if kind == "websocket.http.response.body" and self._denial_status is not None:
            if not message.get("more_body", False):
                self._deny(self._denial_status, message.get("body", b"").decode("utf-8", "replace"))
            return
        super().handle_reply(message)

    def _deny(self, status: int, reason: str) -> None:
        if not hasattr(self, "handshake_deferred"):
            return
        self.handshake_deferred.errback(ConnectionDeny(code=status, reason=reason or "Denied"))
        del self.handshake_deferred
        self.server.protocol_disconnected(self)
        logger.debug("WebSocket %s denied with HTTP %d", self.client_addr, status)


class AppServerDaphne(Server):
    def create_application(self, protocol, scope):
        if isinstance(protocol, DenialCapableWebSocketProtocol):
            scope = {**scope, "extensions": {**scope.get("extensions", {}), DENIAL_EXTENSION: {}}}
        return super().create_application(protocol, scope)

    def run(self):
        # The factory is made inside run(); adjust it once the reactor starts.
        reactor.callWhenRunning(self._tune_websocket_factory)
        reactor.addSystemEventTrigger("before", "shutdown", self._flush_telemetry)
        super().run()

    @staticmethod
    def _flush_telemetry() -> defer.Deferred:
        from realtime.services.telemetry import flush_at_shutdown

        return defer.Deferred.fromFuture(asyncio.ensure_future(flush_at_shutdown()))

    def _tune_websocket_factory(self) -> None:
        self.ws_factory.protocol = DenialCapableWebSocketProtocol
        self.ws_factory.setProtocolOptions(failByDrop=False)


class AppServerCommandLine(CommandLineInterface):
    server_class = AppServerDaphne

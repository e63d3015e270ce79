"""A JSON-RPC client of the app-server (demo, tests, benchmarks)."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable
from typing import Any

MessageCheck = Callable[[dict, "str | None"], None]


class RpcClient:
    """One reader task files every incoming message into ``inbox``; any number
    of concurrent waits pick what they need from it.

    ``message_checks`` (the class's, copied to each client) are called with every
    message received and the method of the request it answers; one that raises
    ends the reader, so every later wait fails with its error."""

    message_checks: list[MessageCheck] = []

    def __init__(self, send_text, receive_text):
        self._send_text = send_text
        self._receive_text = receive_text
        self._ids = itertools.count(1)
        self.inbox: list[dict] = []  # received and not yet taken by a wait
        self._arrived = asyncio.Condition()
        self._reader: asyncio.Task | None = None
        self._reader_error: BaseException | None = None
        self._checks = list(self.message_checks)
        self._methods: dict[Any, str] = {}  # request id → method, for checking its response

    async def send_raw(self, text: str) -> None:
        await self._send_text(text)

    async def send(self, message: dict) -> None:
        await self._send_text(json.dumps(message))

    async def _read_forever(self) -> None:
        try:
            while True:
                message = json.loads(await self._receive_text())
                answered = self._methods.pop(message.get("id"), None) if "method" not in message else None
                for check in self._checks:
                    check(message, answered)
                async with self._arrived:
                    self.inbox.append(message)
                    self._arrived.notify_all()
        except BaseException as exc:  # the socket closed: wake every waiter
            self._reader_error = exc
            async with self._arrived:
                self._arrived.notify_all()
            if isinstance(exc, asyncio.CancelledError):
                raise

    async def receive(self, timeout: float = 5.0) -> dict:
        """The next message, in arrival order."""
        return await self.wait_for(lambda message: True, timeout)

    async def wait_for(self, predicate, timeout: float = 5.0) -> dict:
        """The first message (buffered or new) for which predicate holds."""
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_forever())
        async with asyncio.timeout(timeout):
            async with self._arrived:
                while True:
                    for index, message in enumerate(self.inbox):
                        if predicate(message):
                            return self.inbox.pop(index)
                    if isinstance(self._reader_error, AssertionError):
                        raise self._reader_error
                    if self._reader_error is not None:
                        raise ConnectionError("the connection closed") from self._reader_error
                    await self._arrived.wait()

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()

    async def request(self, method: str, params: Any = None, timeout: float = 5.0) -> dict:
        """Send a request and return its whole response (result or error)."""
        request_id = next(self._ids)
        message: dict[str, Any] = {"id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        self._methods[request_id] = method
        await self.send(message)
        return await self.wait_for(lambda m: m.get("id") == request_id and "method" not in m, timeout)

    async def call(self, method: str, params: Any = None, timeout: float = 5.0) -> Any:
        response = await self.request(method, params, timeout)
        assert "result" in response, response
        return response["result"]

    async def notification(self, method: str, timeout: float = 5.0, **match: Any) -> dict:
        """The next notification ``method`` whose params contain ``match``."""

        def wanted(message: dict) -> bool:
            params = message.get("params") or {}
            return message.get("method") == method and all(params.get(k) == v for k, v in match.items())

        return (await self.wait_for(wanted, timeout))["params"]

    async def initialize(self, name: str, version: str = "1.0.0", **capabilities: Any) -> dict:
        result = await self.call(
            "initialize",
            {"clientInfo": {"name": name, "title": name.title(), "version": version}, "capabilities": capabilities},
        )
        await self.send({"method": "initialized"})
        return result

    async def start_thread(self, timeout: float = 5.0, **params: Any) -> str:
        return (await self.call("thread/start", params, timeout))["thread"]["id"]

    async def run_turn(self, thread_id: str, text: str = "hi", timeout: float = 10.0) -> dict:
        """Start a turn and return its turn/completed params."""
        result = await self.call("turn/start", {"threadId": thread_id, "input": [{"type": "text", "text": text}]}, timeout)
        turn_id = result["turn"]["id"]

        def completed(message: dict) -> bool:
            params = message.get("params") or {}
            return message.get("method") == "turn/completed" and params.get("turn", {}).get("id") == turn_id

        return (await self.wait_for(completed, timeout))["params"]


class SocketClient(RpcClient):
    """Against a real server, over a websockets client connection."""

    def __init__(self, websocket):
        self.websocket = websocket
        super().__init__(websocket.send, websocket.recv)

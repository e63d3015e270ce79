"""Hostile traffic for a running app-server, and a check of every reply.

``fuzz_server`` opens several connections to a real server and sends frames
from ``hostile_frames``: random bytes, invalid UTF-8 (in text and binary
frames), deep nesting, odd and huge ids, wrong types, missing fields, frames
over 1 MiB and floods of requests, mixed with valid traffic. Every reply must
be valid JSON-RPC; a connection the server closes (oversized frame, invalid
UTF-8) is replaced by a new one.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

ONE_MIB = 1024 * 1024


@dataclass
class Frame:
    payload: str | bytes
    invalid_utf8_text: bool = False  # bytes to send as a *text* frame

    @property
    def closes_connection(self) -> bool:
        """The server must close on these (1007 invalid UTF-8, 1009 too big)."""
        return self.invalid_utf8_text or len(self.payload) > ONE_MIB


@dataclass
class FuzzReport:
    frames_sent: int = 0
    replies: int = 0
    invalid_replies: list[Any] = field(default_factory=list)
    server_closes: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        return (
            f"{self.frames_sent} frames sent, {self.replies} replies, "
            f"{len(self.invalid_replies)} invalid, server closes by code {dict(self.server_closes)}"
        )


def is_valid_reply(message: Any) -> bool:
    """A JSON-RPC response (result xor error) or notification, as PROTOCOL §3 shapes them."""
    if not isinstance(message, dict):
        return False
    if "method" in message:
        return isinstance(message["method"], str) and "id" not in message
    if "id" not in message or not (message["id"] is None or isinstance(message["id"], (str, int))):
        return False
    if ("result" in message) == ("error" in message):
        return False
    if "error" in message:
        error = message["error"]
        return isinstance(error, dict) and isinstance(error.get("code"), int) and isinstance(error.get("message"), str)
    return True


def _odd_id(rng: random.Random) -> Any:
    return rng.choice(
        [None, 1.5, -0.0, True, {}, [], [1], "", "x" * 10_000, 10**300, -(10**300), 2**63, rng.randint(-9, 9), "id\u0000"]
    )


def _garbage_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.randint(-(2**70), 2**70)
    if kind == 1:
        return "".join(chr(rng.randint(0, 0x2FFF)) for _ in range(rng.randint(0, 40)))
    if kind == 2:
        return rng.random() * 10**rng.randint(-5, 300)
    if kind == 3:
        return rng.choice([None, True, False])
    if kind == 4:
        return "\ud800" if rng.random() < 0.5 else "\r\nX-Injected: 1"
    if kind == 5:
        return [_garbage_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {str(_garbage_value(rng, depth + 1))[:20]: _garbage_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


METHODS = [
    "initialize", "thread/start", "turn/start", "turn/interrupt", "thread/realtime/start",
    "thread/realtime/stop", "app/list", "plugin/list", "no/such", "", "initialized",
]


def hostile_frames(rng: random.Random, thread_ids: list[str]):
    """An endless stream of frames, mostly hostile, some valid."""
    counter = 0
    while True:
        counter += 1
        kind = rng.randrange(16)
        if kind == 0:
            yield Frame(rng.randbytes(rng.randint(0, 2048)))
        elif kind == 1:
            yield Frame(b"\xff\xfe\xc3\x28" + rng.randbytes(16), invalid_utf8_text=rng.random() < 0.5)
        elif kind == 2:
            depth = rng.choice([10, 500, 5000, 200_000])
            yield Frame("[" * depth + "]" * depth)
        elif kind == 3:
            depth = rng.choice([50, 900, 3000])
            params = '{"a":' * depth + "1" + "}" * depth
            yield Frame(f'{{"id": {counter}, "method": "thread/start", "params": {params}}}')
        elif kind == 4:
            yield Frame(json.dumps({"id": _odd_id(rng), "method": rng.choice(METHODS), "params": {}}, default=str))
        elif kind == 5:
            message = {"id": counter, "method": rng.choice(METHODS), "params": _garbage_value(rng)}
            yield Frame(json.dumps(message, default=str))
        elif kind == 6:
            message = {"id": counter, "method": rng.choice(METHODS)}
            yield Frame(json.dumps(message))
        elif kind == 7:
            yield Frame(json.dumps({"id": counter, "method": _garbage_value(rng)}, default=str))
        elif kind == 8 and rng.random() < 0.02:
            yield Frame("x" * (ONE_MIB + rng.randint(1, 1000)))
        elif kind == 9:
            yield Frame("".join(chr(rng.randint(1, 0x7F)) for _ in range(rng.randint(0, 200))))
        elif kind == 10:
            client_info = {"name": _garbage_value(rng), "version": _garbage_value(rng), "title": _garbage_value(rng)}
            yield Frame(json.dumps({"id": counter, "method": "initialize", "params": {"clientInfo": client_info}}, default=str))
        elif kind == 11:
            thread = rng.choice(thread_ids) if thread_ids else "t"
            params = {"threadId": thread, "input": [{"type": rng.choice(["text", "image", "x"]), "text": _garbage_value(rng)}]}
            yield Frame(json.dumps({"id": counter, "method": "turn/start", "params": params}, default=str))
        elif kind == 12:
            yield Frame(json.dumps({"id": counter, "result": _garbage_value(rng)}, default=str))
        elif kind == 13:  # a flood of cheap requests in one burst
            for offset in range(50):
                yield Frame(json.dumps({"id": f"flood-{counter}-{offset}", "method": rng.choice(["app/list", "no/such", "thread/start"])}))
        else:
            yield Frame(json.dumps({"id": counter, "method": "thread/start", "params": {"cwd": "/x", "model": None}}))


SYNC_EVERY = 32


class _Connection:
    """One fuzzed socket: a reader checks every reply; ``sync`` waits for the server to catch up."""

    def __init__(self, socket, report: FuzzReport):
        self.socket = socket
        self.report = report
        self.thread_ids: list[str] = []
        self._synced: dict[str, asyncio.Event] = {}
        self._syncs = 0
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.socket:
                self._check(raw)
        except ConnectionClosed:
            pass
        if self.socket.close_code is not None:
            self.report.server_closes[self.socket.close_code] += 1

    def _check(self, raw: str | bytes) -> None:
        self.report.replies += 1
        try:
            message = json.loads(raw)
        except ValueError:
            self.report.invalid_replies.append(raw[:200])
            return
        if not is_valid_reply(message):
            self.report.invalid_replies.append(message)
            return
        result = message.get("result")
        if isinstance(result, dict) and isinstance(result.get("thread"), dict):
            self.thread_ids.append(result["thread"]["id"])
        if message.get("id") in self._synced:
            self._synced[message["id"]].set()

    async def sync(self, timeout: float = 30.0) -> None:
        """A marker request whose reply shows the server has read what came before."""
        self._syncs += 1
        marker = f"sync-{self._syncs}"
        self._synced[marker] = asyncio.Event()
        await self.socket.send(json.dumps({"id": marker, "method": "no/such"}))
        synced = asyncio.ensure_future(self._synced[marker].wait())
        # The server may close the connection instead (a client that never initializes is closed).
        done, _ = await asyncio.wait([synced, self.reader], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        synced.cancel()
        if not done:
            raise TimeoutError(f"no reply to {marker} within {timeout}s")

    async def send(self, frame: Frame) -> None:
        if frame.invalid_utf8_text:
            # The library refuses to build such a frame; write it below its API.
            async with self.socket.send_context():
                self.socket.protocol.send_text(frame.payload)
        else:
            await self.socket.send(frame.payload)

    async def close(self) -> None:
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)


async def _drive_connection(ws_url: str, frames, budget: list[int], report: FuzzReport, seed: int) -> None:
    rng = random.Random(seed)
    while budget[0] > 0:
        async with connect(ws_url, max_size=None, open_timeout=30) as socket:
            connection = _Connection(socket, report)
            if rng.random() < 0.7:  # most connections get past initialize
                await socket.send(json.dumps({"id": "init", "method": "initialize", "params": {"clientInfo": {"name": f"fuzz_{seed}", "version": "1"}}}))
            try:
                await _send_frames(connection, frames(rng, connection.thread_ids), budget, report)
            finally:
                await connection.close()


async def _send_frames(connection: _Connection, frames, budget: list[int], report: FuzzReport) -> None:
    try:
        for sent, frame in enumerate(frames, 1):
            if budget[0] <= 0:
                break
            budget[0] -= 1
            report.frames_sent += 1
            await connection.send(frame)
            if frame.closes_connection:
                await asyncio.wait_for(asyncio.shield(connection.reader), 10)
                break
            if sent % SYNC_EVERY == 0:
                await connection.sync()
            if connection.reader.done():  # the server closed it
                break
        if not connection.reader.done():
            await connection.sync()
    except ConnectionClosed:  # the server closed it (1007, 1008, 1009): the next connection goes on
        pass


async def fuzz_server(ws_url: str, frames: int, connections: int = 8, seed: int = 0) -> FuzzReport:
    report = FuzzReport()
    budget = [frames]
    await asyncio.gather(
        *(_drive_connection(ws_url, hostile_frames, budget, report, seed * 1000 + i) for i in range(connections))
    )
    return report

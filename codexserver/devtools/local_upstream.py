"""A real local upstream on loopback that records every request it receives.

Used by the test suite, ``manage.py demo`` and the benchmarks: its replies are
canned text, never a real model. It plays the Responses API (SSE and WebSocket), realtime calls, telemetry,
the connector directory and the plugin list. What a turn's upstream does is
chosen by the user's text, so tests script faults without mocking anything:

    "fail:401"        answer 401 (any status; "fail:500x2" fails twice, then streams)
    "cut"             stream two deltas, then drop the connection
    "hangup"          drop the connection before answering
    "garbage"         answer with bytes that are not HTTP (SSE only)
    "slow:N"          stream N deltas 0.1 s apart (for interrupts and disconnects)
    "flood:N:SIZE"    stream N deltas of SIZE characters as fast as possible
    "numbered:N"      stream N deltas "0 ", "1 ", ... as fast as possible (to check their order)
    "response-failed" stream a response.failed event (server_is_overloaded)
    "hang"            send response.created, then nothing at all
    "fixture:NAME"    replay NAME.chunks.txt of ``fixtures_dir`` line by line, as recorded
    "incomplete:WHY"  two deltas, then response.incomplete (reason WHY), and keep the stream open
    "instream:CODE"   response.created, then an in-stream error event with CODE
                      ("instream:server_errorx1" fails once, then streams)
    "exec[CMD]"       call exec_command with cmd CMD (several: parallel calls in one response)
    "escalate[CMD]"   the same, asking to run it outside the sandbox (require_escalated)
    "bg[CMD]"         the same, yielding after 250 ms (a command left running: a background terminal)
    "*** Begin Patch" … "*** End Patch"  call exec_command with that patch, as `apply_patch <<'EOF'`
                      (after "cd DIR && ": as `cd DIR && apply_patch <<'EOF'`)
    "stdin[N:TEXT]"   call write_stdin on session N with TEXT (a newline added)
    "ask[QUESTION]"   call request_user_input with QUESTION (options Red and Blue)
    "call:NAME"       call a tool NAME with no arguments (one the server does not have, say)
    "call:NS/NAME"    call the function NAME of the namespace NS (a client's dynamic tools)
    "view[PATH]"      call view_image on PATH
    "steps:N"         with exec[…]: call again until N calls were answered this turn
    anything else     stream "Hello" + " world" and complete

A request whose input ends with tool outputs (and needs no more steps) is
answered "got: " and the outputs, so a test sees what the model was given.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

DEFAULT_DELTAS = ["Hello", " world"]
RAW = "__recorded_line__"  # a replayed event's line, sent byte for byte


def _wire(event: dict) -> str:
    return event.get(RAW) or json.dumps(event)


def _holds_open(text: str, events: list[dict]) -> bool:
    """A hanging stream, or one whose terminal event must end the turn by itself."""
    return (re.search(r"\bhang\b", text) is not None and len(events) == 1) or "incomplete:" in text


@dataclass
class Recorded:
    kind: str  # "http", "ws" (handshake), "closed" (a stream or socket ended early), "ws-message"
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: Any = None
    at: float = field(default_factory=time.monotonic)
    repeated_headers: tuple[str, ...] = ()  # names sent more than once (e.g. two User-Agents)

    @property
    def originator(self) -> str | None:
        return self.headers.get("originator")

    @property
    def user_agent(self) -> str | None:
        return self.headers.get("user-agent")


def _last_user_text(body: dict) -> str:
    for item in reversed(body.get("input") or []):
        if item.get("role") == "user":
            return " ".join(part.get("text", "") for part in item.get("content", []))
    return ""


def function_call_events(calls: list[tuple]) -> list[dict]:
    """One response that calls each (tool name, arguments[, namespace]), side by side."""
    events: list[dict] = [{"type": "response.created", "response": {"id": "resp_tools"}}]
    for index, (name, arguments, *namespace) in enumerate(calls):
        item = {
            "id": f"fc_{uuid.uuid4().hex[:12]}",
            "type": "function_call",
            "status": "in_progress",
            "call_id": f"call_{uuid.uuid4().hex[:12]}",
            "name": name,
            "arguments": "",
            **({"namespace": namespace[0]} if namespace else {}),
        }
        text = json.dumps(arguments)
        events.append({"type": "response.output_item.added", "output_index": index, "item": item})
        events.append({"type": "response.function_call_arguments.delta", "item_id": item["id"], "output_index": index, "delta": text})
        events.append({"type": "response.output_item.done", "output_index": index, "item": {**item, "status": "completed", "arguments": text}})
    events.append({"type": "response.completed", "response": {"id": "resp_tools"}})
    return events


def calls_without_output(body: dict) -> list[str]:
    """Function calls in the input with no output after them: the real API
    refuses such a request (400), so the recording upstream does too."""
    items = body.get("input") or []
    answered = {item.get("call_id") for item in items if item.get("type") == "function_call_output"}
    return [item.get("call_id") for item in items if item.get("type") == "function_call" and item.get("call_id") not in answered]


def _said(output: Any) -> str:
    """A call's output as the scripted model repeats it: text, or what its parts are."""
    if isinstance(output, str):
        return output
    parts = [part.get("image_url", "")[:30] if part.get("type") == "input_image" else part.get("text", "") for part in output]
    return "[" + ", ".join(parts) + "]"


def _tool_step(text: str, body: dict) -> list[dict] | None:
    """The scripted agent: call tools as the user's text says, then say what they gave."""
    items = body.get("input") or []
    user_at = max((i for i, item in enumerate(items) if item.get("role") == "user"), default=-1)
    outputs = [_said(item.get("output", "")) for item in items[user_at + 1 :] if item.get("type") == "function_call_output"]
    calls = [("exec_command", {"cmd": command}) for command in re.findall(r"(?<![a-z])exec\[(.+?)\]", text)]
    calls += [
        ("exec_command", {"cmd": command, "sandbox_permissions": "require_escalated", "justification": "scripted"})
        for command in re.findall(r"escalate\[(.+?)\]", text)
    ]
    calls += [("exec_command", {"cmd": command, "yield_time_ms": 250}) for command in re.findall(r"bg\[(.+?)\]", text)]
    calls += [
        ("write_stdin", {"session_id": int(session), "chars": chars + "\n", "yield_time_ms": 500})
        for session, chars in re.findall(r"stdin\[(\d+):(.*?)\]", text)
    ]
    calls += [
        ("request_user_input", {"questions": [{
            "id": "choice", "header": "Choice", "question": question,
            "options": [{"label": "Red", "description": "warm"}, {"label": "Blue", "description": "cool"}],
        }]})
        for question in re.findall(r"ask\[(.+?)\]", text)
    ]  # fmt: skip
    calls += [("view_image", {"path": path}) for path in re.findall(r"view\[(.+?)\]", text)]
    calls += [(name, {}) for name in re.findall(r"call:(\w+)(?![\w/])", text)]
    calls += [(name, {}, namespace) for namespace, name in re.findall(r"call:(\w+)/(\w+)", text)]
    calls += [
        ("exec_command", {"cmd": f"{'cd ' + directory + ' && ' if directory else ''}apply_patch <<'EOF'\n{patch}\nEOF"})
        for directory, patch in re.findall(r"(?:cd (\S+) && )?(\*\*\* Begin Patch.*?\*\*\* End Patch)", text, re.DOTALL)
    ]
    steps = re.search(r"steps:(\d+)", text)
    wanted = int(steps.group(1)) if steps else len(calls)
    if calls and len(outputs) < wanted:
        return function_call_events(calls)
    if outputs:
        return response_events("got:" + text, ["got: ", " | ".join(outputs[-max(1, len(calls)) :])])
    return None


def response_events(text: str, deltas: list[str], item_id: str | None = None) -> list[dict]:
    item_id = item_id or "msg_" + format(abs(hash(text)) % 10**8, "08d")
    events: list[dict] = [
        {"type": "response.created", "response": {"id": "resp_1"}},
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {"id": item_id, "type": "message", "role": "assistant", "status": "in_progress", "content": []},
        },
    ]
    events += [
        {"type": "response.output_text.delta", "item_id": item_id, "output_index": 0, "content_index": 0, "delta": d}
        for d in deltas
    ]
    events.append(
        {
            "type": "response.output_item.done",
            "output_index": 0,
            "item": {
                "id": item_id,
                "type": "message",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": "".join(deltas), "annotations": []}],
            },
        }
    )
    events.append({"type": "response.completed", "response": {"id": "resp_1"}})
    return events


class UpstreamServer:
    """Runs in its own thread and event loop, so any test (sync or async) can use it."""

    def __init__(self, fixtures_dir: Path | None = None, max_records: int | None = None):
        self.fixtures_dir = fixtures_dir
        # A server that runs for days (serve --local-model) keeps only the newest requests.
        self.records: list[Recorded] | deque[Recorded] = [] if max_records is None else deque(maxlen=max_records)
        self._lock = threading.Lock()
        self.abandoned_requests = 0  # model requests whose client left before sending them whole
        self._failures: Counter[str] = Counter()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="upstream")
        self.port: int | None = None
        self.apps: list[dict] = []
        self.plugins: list[dict] = []
        self.canned_reply = list(DEFAULT_DELTAS)  # deltas of an ordinary turn
        self.canned_item_id: str | None = None  # its message's id (else one made from the text)

    # --- lifecycle ------------------------------------------------------------

    def start(self, port: int = 0) -> UpstreamServer:
        self._requested_port = port
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        app = web.Application(client_max_size=16 * 1024 * 1024, middlewares=[self._count_abandoned])
        app.router.add_post("/v1/responses", self._responses_sse)
        app.router.add_get("/v1/responses", self._responses_ws)
        app.router.add_post("/v1/realtime/calls", self._realtime_call)
        app.router.add_get("/v1/realtime", self._realtime_sideband)
        app.router.add_post("/backend-api/codex/analytics-events/events", self._telemetry)
        app.router.add_get("/backend-api/connectors/directory/list", self._connectors)
        app.router.add_get("/backend-api/plugins/list", self._plugins)
        # Any request under /status/NNN/ is answered with that status (plain HTTP
        # and WebSocket handshakes alike), e.g. CODEX_API_BASE_URL=.../status/401/v1.
        app.router.add_route("*", r"/status/{status:\d{3}}/{tail:.*}", self._status)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self._requested_port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base_url(self) -> str:
        return self.url + "/v1"

    @property
    def chatgpt_base_url(self) -> str:
        return self.url + "/backend-api"

    # --- records --------------------------------------------------------------

    def reset(self) -> None:
        with self._lock:
            self.records.clear()
            self._failures.clear()
        self.apps = []
        self.plugins = []
        self.canned_reply = list(DEFAULT_DELTAS)
        self.canned_item_id = None

    def _record(self, request: web.Request, kind: str, body: Any = None) -> Recorded:
        names = Counter(k.lower() for k in request.headers.keys())
        record = Recorded(
            kind=kind,
            method=request.method,
            path=request.path,
            query=request.query_string,
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
            repeated_headers=tuple(sorted(name for name, count in names.items() if count > 1)),
        )
        with self._lock:
            self.records.append(record)
        return record

    def requests(self, path_suffix: str | None = None, kind: str | None = None) -> list[Recorded]:
        with self._lock:
            return [
                r
                for r in self.records
                if (path_suffix is None or r.path.endswith(path_suffix)) and (kind is None or r.kind == kind)
            ]

    def model_requests(self) -> list[Recorded]:
        return [r for r in self.requests("/responses") if r.kind in ("http", "ws-message")]

    def wait_for(self, predicate, timeout: float = 5.0) -> list[Recorded]:
        """Block until ``predicate(records)`` is truthy; returns the records."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                snapshot = list(self.records)
            if predicate(snapshot):
                return snapshot
            if time.monotonic() > deadline:
                raise AssertionError(f"upstream never saw what was expected; it saw {[(r.kind, r.path) for r in snapshot]}")
            time.sleep(0.01)

    async def await_for(self, predicate, timeout: float = 5.0) -> list[Recorded]:
        return await asyncio.to_thread(self.wait_for, predicate, timeout)

    # --- behaviour --------------------------------------------------------------

    def _count(self, script: str, text: str) -> int:
        """How many times ``text`` has asked for ``script``, this time included."""
        with self._lock:
            self._failures[f"{script}:{text}"] += 1
            return self._failures[f"{script}:{text}"]

    def _fixture_events(self, name: str) -> list[dict]:
        """A recorded stream; each event keeps its recorded line (``RAW``) to send as is."""
        if self.fixtures_dir is None:
            raise RuntimeError("this upstream was started without fixtures_dir")
        lines = (self.fixtures_dir / f"{name}.chunks.txt").read_text(encoding="utf-8").splitlines()
        return [{**json.loads(line), RAW: line} for line in lines if line.strip()]

    def _scripted_failure(self, text: str) -> int | None:
        match = re.search(r"fail:(\d{3})(?:x(\d+))?", text)
        if not match:
            return None
        status, times = int(match.group(1)), match.group(2)
        seen = self._count("fail", text)
        if times is not None and seen > int(times):
            return None
        return status

    def _plan(self, text: str, body: dict) -> tuple[list[dict], float, bool]:
        """(events, delay between them, whether to cut the stream after two deltas)"""
        tool_step = _tool_step(text, body)
        if tool_step is not None:
            return tool_step, 0.0, False
        fixture = re.search(r"fixture:([\w.-]+)", text)
        if fixture:
            return self._fixture_events(fixture.group(1)), 0.0, False
        flood = re.search(r"flood:(\d+):(\d+)", text)
        if flood:
            size = int(flood.group(2))
            return response_events(text, ["x" * size for _ in range(int(flood.group(1)))]), 0.0, False
        numbered = re.search(r"numbered:(\d+)", text)
        if numbered:
            return response_events(text, [f"{i} " for i in range(int(numbered.group(1)))]), 0.0, False
        slow = re.search(r"slow:(\d+)", text)
        if slow:
            return response_events(text, [f"d{i} " for i in range(int(slow.group(1)))]), 0.1, False
        if "response-failed" in text:
            failed = {"type": "response.failed", "response": {"error": {"code": "server_is_overloaded", "message": "model busy"}}}
            return [{"type": "response.created", "response": {}}, failed], 0.0, False
        incomplete = re.search(r"incomplete:(\w+)", text)
        if incomplete:
            events = response_events(text, ["partial ", "text"])[:-2]  # no done, no completed
            reason = incomplete.group(1)
            events.append({
                "type": "response.incomplete",
                "response": {
                    "status": "incomplete", "incomplete_details": {"reason": reason},
                    "usage": {"input_tokens": 7, "output_tokens": 3, "total_tokens": 10},
                },
            })  # fmt: skip
            return events, 0.0, False
        instream = re.search(r"instream:(\w+?)(?:x(\d+))?\b", text)
        if instream and self._count("instream", text) <= int(instream.group(2) or 10**9):
            error = {"type": "error", "code": instream.group(1), "message": f"scripted {instream.group(1)}"}
            return [{"type": "response.created", "response": {}}, {"type": "response.in_progress", "response": {}}, error], 0.0, False
        if re.search(r"\bhang\b", text):
            return [{"type": "response.created", "response": {}}], 0.0, False
        cut = re.search(r"\bcut\b", text) is not None
        return response_events(text, self.canned_reply, self.canned_item_id), 0.0, cut

    @web.middleware
    async def _count_abandoned(self, request: web.Request, handler) -> web.StreamResponse:
        """A client that leaves before its request is whole (a server stopped
        mid-flush, say) is expected: counted, not logged as a traceback."""
        try:
            return await handler(request)
        except ConnectionError:
            self.abandoned_requests += 1
            return web.Response(status=499)

    async def _responses_sse(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        record = self._record(request, "http", body)
        text = _last_user_text(body)
        if missing := calls_without_output(body):
            return web.json_response({"error": {"message": f"No tool output found for function call {missing[0]}."}}, status=400)
        status = self._scripted_failure(text)
        if status is not None:
            # Like real APIs, echo (part of) the credential back in the error.
            echoed = request.headers.get("Authorization", "")
            return web.json_response(
                {"error": {"message": f"scripted {status} for {echoed}", "code": "scripted"}}, status=status
            )
        if re.search(r"\b(hangup|garbage)\b", text):
            if "garbage" in text:
                request.transport.write(b"NOT-HTTP/9 what\r\n\r\n")
            request.transport.close()
            return web.Response(status=499)  # never sent: the connection is gone
        events, delay, cut = self._plan(text, body)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        # As the real API's edge does: a client must not send it on another identity's request.
        response.set_cookie("__cf_bm", f"for-{record.originator}", path="/")
        await response.prepare(request)
        deltas = 0
        try:
            for event in events:
                await response.write(f"event: {event['type']}\ndata: {_wire(event)}\n\n".encode())
                deltas += event["type"] == "response.output_text.delta"
                if cut and deltas == 2:
                    await asyncio.sleep(0.05)
                    request.transport.close()
                    return response
                if delay:
                    await asyncio.sleep(delay)
            if _holds_open(text, events):
                await self._until_client_leaves(request)
                self._record_close(record)
                return response
            await response.write_eof()
        except ConnectionError:  # the client left mid-stream: expected, recorded, not logged
            self._record_close(record)
            return response
        except asyncio.CancelledError:
            self._record_close(record)
            raise
        return response

    @staticmethod
    async def _until_client_leaves(request: web.Request) -> None:
        while request.transport is not None and not request.transport.is_closing():
            await asyncio.sleep(0.05)

    def _record_close(self, origin: Recorded) -> None:
        closed = Recorded("closed", origin.method, origin.path, origin.query, origin.headers, origin.body)
        with self._lock:
            self.records.append(closed)

    async def _responses_ws(self, request: web.Request) -> web.WebSocketResponse:
        handshake = self._record(request, "ws")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sender: asyncio.Task | None = None
        # Keep reading while a response streams, so a close frame is seen at once.
        async for message in ws:
            if message.type != WSMsgType.TEXT:
                continue
            body = json.loads(message.data)
            record = Recorded("ws-message", "WS", request.path, request.query_string, handshake.headers, body)
            with self._lock:
                self.records.append(record)
            sender = asyncio.create_task(self._stream_ws_response(ws, _last_user_text(body), body))
        if sender is not None and not sender.done():
            sender.cancel()
            self._record_close(handshake)
        return ws

    async def _stream_ws_response(self, ws: web.WebSocketResponse, text: str, body: dict) -> None:
        if missing := calls_without_output(body):
            await ws.send_json({"type": "error", "status": 400, "error": {"message": f"No tool output found for function call {missing[0]}."}})
            return
        status = self._scripted_failure(text)
        if status is not None:
            await ws.send_json({"type": "error", "status": status, "error": {"message": f"scripted {status}"}})
            return
        if re.search(r"\bhangup\b", text):
            await ws.close()
            return
        events, delay, cut = self._plan(text, body)
        deltas = 0
        for event in events:
            await ws.send_str(_wire(event))
            deltas += event["type"] == "response.output_text.delta"
            if cut and deltas == 2:
                await ws.close()
                return
            if delay:
                await asyncio.sleep(delay)
        if _holds_open(text, events):
            await asyncio.Event().wait()  # until cancelled by the client leaving

    async def _status(self, request: web.Request) -> web.Response:
        self._record(request, "http")
        status = int(request.match_info["status"])
        return web.json_response({"error": {"message": f"scripted {status}"}}, status=status)

    async def _realtime_call(self, request: web.Request) -> web.Response:
        offer = await request.text()
        self._record(request, "http", offer)
        call_id = f"rtc_{uuid.uuid4().hex[:12]}"
        return web.Response(
            status=201,
            text=f"v=0\r\na=answer-for:{call_id}\r\n",
            content_type="application/sdp",
            headers={"Location": f"/v1/realtime/calls/{call_id}"},
        )

    async def _realtime_sideband(self, request: web.Request) -> web.WebSocketResponse:
        handshake = self._record(request, "ws")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for _ in ws:
            pass
        self._record_close(handshake)
        return ws

    async def _telemetry(self, request: web.Request) -> web.Response:
        self._record(request, "http", await request.json())
        return web.json_response({})

    async def _connectors(self, request: web.Request) -> web.Response:
        self._record(request, "http")
        return web.json_response({"apps": self.apps})

    async def _plugins(self, request: web.Request) -> web.Response:
        self._record(request, "http")
        return web.json_response({"plugins": self.plugins})

"""Commands the model runs, as sessions that may outlive the call that
started them (``exec_command``, then ``write_stdin`` to poll or type).

A session is one sandboxed process (``sandbox``) with its output kept up to
``MAX_KEPT_OUTPUT`` (head and tail) and read in pieces: each call gives what
arrived since the last. Killing a session kills the bubblewrap process, and
with it every process inside the sandbox (its PID namespace ends with it).
Sessions are kept per thread and bounded per thread and per process.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import itertools
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from codexserver.loop_local import LoopLocal
from realtime.store.storable_text import made_storable

MAX_KEPT_OUTPUT = 1024 * 1024  # of a command's output kept in its item: half from the head, half the tail
MAX_UNREAD_OUTPUT = 1024 * 1024  # not yet given to the model: the newest kept, the rest counted
READ_CHUNK = 64 * 1024
MAX_SESSIONS_PER_THREAD = 16
MAX_SESSIONS_PER_PROCESS = 256


class SessionLimitReached(RuntimeError):
    """Too many commands still run: the model is told, and may end some."""


class KeptOutput:
    """A command's whole output up to a bound: the first half and the last half."""

    def __init__(self, limit: int = MAX_KEPT_OUTPUT):
        self._half = limit // 2
        self._head: list[str] = []
        self._head_size = 0
        self._tail = ""
        self.dropped = 0  # characters left out between head and tail

    def add(self, text: str) -> None:
        room = self._half - self._head_size
        if room > 0:
            self._head.append(text[:room])
            self._head_size += len(text[:room])
            text = text[room:]
        if text:
            joined = self._tail + text
            self.dropped += max(0, len(joined) - self._half)
            self._tail = joined[-self._half :]

    def text(self) -> str:
        middle = f"\n[… {self.dropped} characters left out …]\n" if self.dropped else ""
        return "".join(self._head) + middle + self._tail


@dataclass(eq=False)
class CommandSession:
    id: int
    thread_id: str
    turn_id: str  # the turn that started it: interrupting that turn kills it while it runs
    item_id: str
    command: str
    cwd: str
    process: asyncio.subprocess.Process
    started: float = field(default_factory=time.monotonic)
    kept: KeptOutput = field(default_factory=KeptOutput)
    unread: list[str] = field(default_factory=list)
    unread_size: int = 0
    unread_dropped: int = 0  # characters the model never saw: more arrived than it polled
    exit_code: int | None = None
    on_output: Callable[[str], None] | None = None
    timed_out: bool = False  # killed for outliving CODEX_COMMAND_TIMEOUT
    timeout_seconds: float = 0.0
    detached_at: float | None = None  # (monotonic) its turn ended: a background terminal, polled by later turns if at all
    record: Any = None  # its commandExecution item, completed when it ends
    _reader: asyncio.Task | None = None
    _watchdog: asyncio.TimerHandle | None = None  # kills it at CODEX_COMMAND_TIMEOUT, polled or not
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def running(self) -> bool:
        return self.exit_code is None

    @property
    def wall_seconds(self) -> float:
        return time.monotonic() - self.started

    def take_unread(self) -> str:
        text = "".join(self.unread)
        if self.unread_dropped:
            text = f"[… {self.unread_dropped} earlier characters dropped …]\n{text}"
        self.unread, self.unread_size, self.unread_dropped = [], 0, 0
        return text

    def _keep_unread(self, text: str) -> None:
        """What the model has not read yet, bounded: a command that prints for
        ever between two polls costs the server no more than this."""
        self.unread.append(text)
        self.unread_size += len(text)
        while self.unread_size > MAX_UNREAD_OUTPUT and len(self.unread) > 1:
            oldest = self.unread.pop(0)
            self.unread_size -= len(oldest)
            self.unread_dropped += len(oldest)

    async def wait(self, seconds: float) -> None:
        """Until the process exits or ``seconds`` pass, whichever is first."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while self.running:
                    self._changed.clear()
                    await self._changed.wait()

    async def write(self, chars: str) -> None:
        stdin = self.process.stdin
        if stdin is None or stdin.is_closing() or not self.running:
            return
        stdin.write(chars.encode())
        with contextlib.suppress(ConnectionError):
            await stdin.drain()

    def close_stdin(self) -> None:
        if self.process.stdin is not None and not self.process.stdin.is_closing():
            self.process.stdin.close()

    def time_out(self, seconds: float) -> None:
        if self.running:
            self.timed_out, self.timeout_seconds = True, seconds
            self.kill()

    def kill(self) -> None:
        """The whole sandbox: bubblewrap and every process in its namespace."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)

    async def _read(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stdout = self.process.stdout
        while True:
            chunk = await stdout.read(READ_CHUNK)
            # A NUL (binary output) is replaced as it arrives: no database keeps one in text.
            text = made_storable(decoder.decode(chunk, final=not chunk))
            if text:
                self.kept.add(text)
                self._keep_unread(text)
                if self.on_output is not None:
                    self.on_output(text)
                self._changed.set()
            if not chunk:
                break
        self.exit_code = await self.process.wait()
        # Its pipes and transport close now, not when collected (by then
        # their event loop may be gone, and the close fails noisily).
        transport = getattr(self.process, "_transport", None)
        if transport is not None:
            transport.close()
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._changed.set()


class SessionRegistry:
    """This process's command sessions, by thread."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self.by_thread: dict[str, dict[int, CommandSession]] = {}
        self._unwatched_since: dict[str, float] = {}  # threads with sessions that nobody here follows

    def running_count(self) -> int:
        return sum(session.running for sessions in self.by_thread.values() for session in sessions.values())

    async def start(
        self,
        argv: list[str],
        *,
        thread_id: str,
        turn_id: str,
        item_id: str,
        command: str,
        cwd: str,
        on_output: Callable[[str], None] | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 600.0,
    ) -> CommandSession:
        """Start ``argv``. Its environment is ``env``, empty unless given:
        bubblewrap builds the sandboxed command's own from an allow list, and
        must not hold the server's either (a sandbox's PID 1 is bubblewrap)."""
        sessions = self.by_thread.setdefault(thread_id, {})
        if sum(session.running for session in sessions.values()) >= MAX_SESSIONS_PER_THREAD:
            raise SessionLimitReached(f"{MAX_SESSIONS_PER_THREAD} commands of this thread still run")
        if self.running_count() >= MAX_SESSIONS_PER_PROCESS:
            raise SessionLimitReached("this server runs as many commands as it may")
        process = await asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # its own process group: killed whole
            env=env or {},
        )
        session = CommandSession(next(self._ids), thread_id, turn_id, item_id, command, cwd, process, on_output=on_output)
        session._reader = asyncio.create_task(session._read(), name=f"command session {session.id}")
        session._watchdog = asyncio.get_running_loop().call_later(timeout, session.time_out, timeout)
        sessions[session.id] = session
        return session

    def get(self, thread_id: str, session_id: int) -> CommandSession | None:
        return self.by_thread.get(thread_id, {}).get(session_id)

    def of_thread(self, thread_id: str) -> list[CommandSession]:
        return list(self.by_thread.get(thread_id, {}).values())

    def forget(self, session: CommandSession) -> None:
        self.by_thread.get(session.thread_id, {}).pop(session.id, None)

    def kill_turns(self, thread_id: str, turn_id: str) -> None:
        """The turn was interrupted, or its starter left: its commands stop now."""
        for session in self.of_thread(thread_id):
            if session.turn_id == turn_id:
                session.kill()

    async def ended(self, thread_id: str, turn_id: str, within: float) -> None:
        """Wait, at most ``within`` seconds, for the turn's sessions to end (after a kill)."""
        running = [session for session in self.of_thread(thread_id) if session.turn_id == turn_id and session.running]
        if running:
            await asyncio.wait([asyncio.ensure_future(session.wait(within)) for session in running], timeout=within)

    def detach_turn(self, thread_id: str, turn_id: str) -> None:
        """The turn ended: its sessions still running tell nobody of their
        output (the model may still poll them in a later turn)."""
        for session in self.of_thread(thread_id):
            if session.turn_id == turn_id:
                session.on_output = None
                session.detached_at = time.monotonic()

    def end_unwatched(self, watched: Callable[[str], bool], idle_seconds: float) -> int:
        """Background terminals of threads that nobody on this process has
        followed (no subscriber, no turn running) for ``idle_seconds``
        (CODEX_SESSION_IDLE_SECONDS), and that have been background
        terminals that long, end, each whole sandbox, and are forgotten: how
        many. A running turn's own commands are its turn's to end."""
        now, ended = time.monotonic(), 0
        for thread_id in list(self.by_thread):
            if not self.by_thread[thread_id]:
                del self.by_thread[thread_id]  # (an empty entry: the thread's sessions were all forgotten)
            if thread_id not in self.by_thread or watched(thread_id):
                self._unwatched_since.pop(thread_id, None)
                continue
            if now - self._unwatched_since.setdefault(thread_id, now) < idle_seconds:
                continue
            for session in self.of_thread(thread_id):
                if session.detached_at is not None and now - session.detached_at >= idle_seconds:
                    session.kill()
                    self.forget(session)
                    ended += 1
        return ended

    async def stop_all(self, within: float = 1.0) -> None:
        """Kill every session and wait for them to end (the server stops)."""
        sessions = [session for by_id in self.by_thread.values() for session in by_id.values()]
        for session in sessions:
            session.kill()
        running = [asyncio.ensure_future(session.wait(within)) for session in sessions if session.running]
        if running:
            await asyncio.wait(running, timeout=within)


_registries: LoopLocal[SessionRegistry] = LoopLocal(SessionRegistry)


def command_sessions() -> SessionRegistry:
    """This process's (this event loop's) command sessions."""
    return _registries.get()

"""``exec_command`` and ``write_stdin``: a model's call becomes a sandboxed
command session, a ``commandExecution`` item the people on the thread
watch, and the text the model gets back (PROTOCOL §11).

The policy is an argument (``CommandContext``), never a global: the sandbox
the thread chose, its approval policy, the places to hide.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.conf import settings

from realtime.store.threads import ItemRecord, now_ms

from .approvals import (
    ACCEPT_FOR_SESSION,
    ASK,
    CANCEL,
    DECISIONS_OFFERED,
    DECLINE,
    REFUSE,
    approval_needed,
    decision_of,
    session_approvals,
)
from .definitions import DEFAULT_MAX_OUTPUT_TOKENS, DEFAULT_YIELD_MS, MAX_YIELD_MS, MIN_YIELD_MS
from .exec_sessions import CommandSession, SessionLimitReached, command_sessions
from .patches import PatchError, extract_patch, parse, unified_diff
from .sandbox import (
    FULL_ACCESS,
    READ_ONLY,
    SANDBOX_PATH,
    WORKSPACE_WRITE,
    SandboxPolicy,
    SandboxUnavailable,
    bwrap_binary,
    inside_or_equal,
    sandbox_environment,
    sandboxed_argv,
)

COMMAND_EXECUTION = "commandExecution"
DEFAULT_SHELL = "/bin/bash"
CHARS_PER_TOKEN = 4  # what the model is told of output size, as Codex estimates it


@dataclass(frozen=True, slots=True)
class CommandContext:
    """Everything a command of this turn is decided with."""

    thread_id: str
    turn_id: str
    cwd: str
    policy: SandboxPolicy
    approval_policy: Any  # "untrusted" | "on-request" | "never" | {"granular": …}
    hidden_paths: tuple[str, ...]
    # The server's own files (its code, its database's directory): never writable by a command.
    protected_paths: tuple[str, ...]
    # item notifications for the thread's subscribers (threadId and turnId added)
    notify: Callable[[str, dict[str, Any]], None]
    add_item: Callable[[ItemRecord], None]  # the turn's items: stored with it
    turn_diffs: list[str] = field(default_factory=list)  # the turn's file changes so far, as unified diffs
    # a server request to every subscriber of the thread, on every process: the first answer
    ask: Callable[[str, dict[str, Any]], Awaitable[Any]] | None = None
    full_access_allowed: bool = False  # CODEX_ALLOW_FULL_ACCESS: an approved escalation runs unsandboxed
    dynamic_tools: Any = None  # the thread's DeclaredTools (dynamic_tools.py), if a client declared some

    def start_item(self, item: dict[str, Any]) -> ItemRecord:
        """A new item of the turn: kept with it, and announced."""
        record = ItemRecord(item, now_ms())
        self.add_item(record)
        self.notify("item/started", {"item": record.item, "startedAtMs": record.started_at_ms})
        return record

    def complete_item(self, record: ItemRecord, item: dict[str, Any]) -> None:
        record.item = item
        record.completed_at_ms = now_ms()
        self.notify("item/completed", {"item": record.item, "completedAtMs": record.completed_at_ms})


class CallRefused(Exception):
    """The call is not run; the message is what the model is told."""


class TurnCancelledByUser(Exception):
    """An approval was answered ``cancel``: the turn is interrupted."""


def server_own_paths() -> tuple[str, ...]:
    """What a command may read but never write, even inside a writable
    workspace: the server's code and settings (the checkout it runs from),
    and the directory of its SQLite database (a journal or WAL file written
    beside it would be applied to the database)."""
    paths = [str(settings.BASE_DIR)]
    if (database := _sqlite_file()) is not None:
        paths.append(os.path.dirname(os.path.abspath(database)))
    return tuple(paths)


def server_private_paths() -> tuple[str, ...]:
    """What of the server no command may read, wherever the workspace is: its
    database files, its Codex home and its user's home (credentials)."""
    paths = [settings.CODEX_HOME, str(Path.home())]
    if (database := _sqlite_file()) is not None:
        paths += [database, f"{database}-wal", f"{database}-shm", f"{database}-journal"]
    return tuple(paths)


def _sqlite_file() -> str | None:
    """The embedded default's database file, or None (PostgreSQL, or in memory)."""
    database = settings.DATABASES["default"]
    if database["ENGINE"].endswith("sqlite3") and str(database["NAME"]) != ":memory:":
        return str(database["NAME"])
    return None


def _number(arguments: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = arguments.get(name)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return default
    return int(min(max(value, low), high))


def _workdir(context: CommandContext, arguments: dict[str, Any]) -> str:
    """Where the command runs: the thread's cwd, or a directory inside it.
    Never outside: a working directory is bound into the sandbox, and one
    elsewhere could bring back what is hidden (the server's home, say)."""
    workdir = arguments.get("workdir")
    if not isinstance(workdir, str) or not workdir:
        return context.cwd
    resolved = os.path.realpath(os.path.join(context.cwd, workdir))
    if not inside_or_equal(resolved, context.cwd):
        raise CallRefused(f"workdir {workdir!r} is outside the thread's working directory {context.cwd}")
    if not os.path.isdir(resolved):
        raise CallRefused(f"workdir {workdir!r} is not a directory")
    return resolved


def command_item(call_id: str, command: str, cmd: str, cwd: str, process_id: str | None) -> dict[str, Any]:
    """A ``commandExecution`` item as Codex 0.169.0 sends one, still running."""
    return {
        "id": call_id,
        "type": COMMAND_EXECUTION,
        "command": command,
        "cwd": cwd,
        "processId": process_id,
        "source": "unifiedExecStartup",
        "commandActions": [{"type": "unknown", "command": cmd}],
        "status": "inProgress",
        "aggregatedOutput": None,
        "exitCode": None,
        "durationMs": None,
    }


async def exec_command(context: CommandContext, call_id: str, arguments: dict[str, Any]) -> str:
    cmd = arguments.get("cmd")
    if not isinstance(cmd, str) or not cmd.strip():
        raise CallRefused("exec_command needs cmd, a non-empty string")
    invocation = extract_patch(cmd)
    if invocation is not None:  # parsed and applied by the server, never through a shell
        directory, patch = invocation
        workdir = _workdir(context, arguments)
        if directory is not None:  # `cd DIR && apply_patch …`: inside the thread's directory too
            workdir = _workdir(context, {"workdir": os.path.join(workdir, directory)})
        return await apply_patch(context, call_id, patch, workdir)
    escalated = arguments.get("sandbox_permissions") == "require_escalated"
    shell = arguments.get("shell") if isinstance(arguments.get("shell"), str) else DEFAULT_SHELL
    cwd = _workdir(context, arguments)
    argv = [shell, "-lc" if arguments.get("login", True) is not False else "-c", cmd]
    # What an acceptForSession covers: this very invocation (shell, flags, directory), as asked.
    invocation = shlex.join([cwd, *argv])
    approved = session_approvals().approved(context.thread_id, invocation, escalated)
    needed = approval_needed(context.approval_policy, cmd, escalated, approved, default_shell=shell == DEFAULT_SHELL)
    if needed == REFUSE:
        raise CallRefused(
            "running outside the sandbox is not available under this thread's approval policy: "
            "do what the sandbox allows, or tell the user what you need"
        )
    # The turn keeps the item once it is announced: one asked about and
    # interrupted before an answer was never shown, and is not stored.
    record = ItemRecord(command_item(call_id, shlex.join(argv), cmd, cwd, None), now_ms())
    policy = context.policy
    if needed == ASK:
        # Asked before the item starts, as Codex does: an accepted one starts with its process.
        decision = await _ask(context, record, cmd, arguments)
        if decision in (DECLINE, CANCEL):
            record.item.update(status="declined")
            _announce_ended(context, record)
            if decision == CANCEL:
                raise TurnCancelledByUser
            raise CallRefused("the user declined to run this command")
        if decision == ACCEPT_FOR_SESSION:
            session_approvals().approve(context.thread_id, invocation, escalated)
    if escalated and (needed == ASK or approved):  # approved: outside the sandbox only where the operator allows it
        policy = _escalated(context)
    launch, environment = _launch(argv, cwd, context, policy)
    started = time.monotonic()

    def on_output(delta: str) -> None:
        context.notify("item/commandExecution/outputDelta", {"itemId": call_id, "delta": delta})

    try:
        session = await command_sessions().start(
            launch,
            thread_id=context.thread_id,
            turn_id=context.turn_id,
            item_id=call_id,
            command=record.item["command"],
            cwd=cwd,
            on_output=on_output,
            env=environment,
            timeout=settings.CODEX_COMMAND_TIMEOUT,
        )
    except (SessionLimitReached, OSError) as exc:
        record.item.update(status="failed", aggregatedOutput=str(exc), durationMs=0)
        _announce_ended(context, record)
        raise CallRefused(f"the command could not start: {exc}") from None
    record.item["processId"] = str(session.id)
    context.add_item(record)
    context.notify("item/started", {"item": record.item, "startedAtMs": record.started_at_ms})
    session.record = record
    return await _yield(context, session, arguments, started, default_wait_ms=DEFAULT_YIELD_MS)


def _announce_ended(context: CommandContext, record: ItemRecord) -> None:
    """An item that ended before it ran (declined, or could not start): kept, started and completed at once."""
    record.completed_at_ms = now_ms()
    context.add_item(record)
    context.notify("item/started", {"item": record.item, "startedAtMs": record.started_at_ms})
    context.notify("item/completed", {"item": record.item, "completedAtMs": record.completed_at_ms})


async def write_stdin(context: CommandContext, call_id: str, arguments: dict[str, Any]) -> str:
    session_id = arguments.get("session_id")
    session = (
        command_sessions().get(context.thread_id, int(session_id))
        if isinstance(session_id, (int, float)) and not isinstance(session_id, bool)
        else None
    )
    if session is None:
        raise CallRefused(f"no command session {session_id!r} on this thread")
    chars = arguments.get("chars")
    if isinstance(chars, str) and chars:
        await session.write(chars)
        default_wait = 250
    else:
        default_wait = 5_000
    return await _yield(context, session, arguments, time.monotonic(), default_wait_ms=default_wait)


async def _ask(context: CommandContext, record: ItemRecord, cmd: str, arguments: dict[str, Any]) -> str:
    """Ask the people on the thread; the first answer decides."""
    if context.ask is None:
        return DECLINE
    justification = arguments.get("justification")
    params = {
        "threadId": context.thread_id,
        "turnId": context.turn_id,
        "itemId": record.item["id"],
        "startedAtMs": now_ms(),
        "command": record.item["command"],
        "cwd": record.item["cwd"],
        "commandActions": record.item["commandActions"],
        "reason": justification if isinstance(justification, str) else None,
        "availableDecisions": DECISIONS_OFFERED,
    }
    return decision_of(await context.ask("item/commandExecution/requestApproval", params))


def _escalated(context: CommandContext) -> SandboxPolicy:
    """An approved escalation: unsandboxed where the operator allows full
    access; otherwise the thread's workspace writable, still no network."""
    if context.full_access_allowed:
        return SandboxPolicy(FULL_ACCESS)
    return _workspace_writable(context)


def _launch(
    argv: list[str], cwd: str, context: CommandContext, policy: SandboxPolicy
) -> tuple[list[str], dict[str, str]]:
    """The process to start and its environment: bubblewrap's line (it builds
    the command's environment itself), or, only where the operator allowed
    full access, the command itself with the allow-listed environment."""
    if policy.mode == FULL_ACCESS:
        if not context.full_access_allowed:  # the operator may have withdrawn it since the thread started
            raise CallRefused("danger-full-access is not allowed on this server now (CODEX_ALLOW_FULL_ACCESS)")
        return argv, sandbox_environment(policy)
    try:
        line = sandboxed_argv(
            argv, cwd, context.cwd, policy, context.hidden_paths, bwrap_binary(), context.protected_paths
        )
        return line, {}
    except SandboxUnavailable as exc:
        raise CallRefused(f"commands are refused on this server: {exc}") from None


async def _yield(
    context: CommandContext, session: CommandSession, arguments: dict[str, Any], started: float, default_wait_ms: int
) -> str:
    wait_ms = _number(arguments, "yield_time_ms", default_wait_ms, MIN_YIELD_MS, MAX_YIELD_MS)
    await session.wait(wait_ms / 1000)
    output = session.take_unread()
    if not session.running:
        if session.turn_id == context.turn_id:  # an earlier turn's item was stored with that turn
            finish_item(context, session)
        command_sessions().forget(session)  # its end is told: nothing more to poll
    max_tokens = _number(arguments, "max_output_tokens", DEFAULT_MAX_OUTPUT_TOKENS, 1, 10**6)
    return model_output(session, output, time.monotonic() - started, max_tokens)


def finish_item(context: CommandContext, session: CommandSession) -> None:
    """The command ended: its item completes, with its whole kept output."""
    record: ItemRecord | None = getattr(session, "record", None)
    if record is None or record.item["status"] != "inProgress":
        return
    record.item.update(
        status="completed" if session.exit_code == 0 else "failed",
        aggregatedOutput=session.kept.text(),
        exitCode=session.exit_code,
        durationMs=int(session.wall_seconds * 1000),
    )
    record.completed_at_ms = now_ms()
    context.notify("item/completed", {"item": record.item, "completedAtMs": record.completed_at_ms})


def finish_command_items(context: CommandContext) -> None:
    """At the turn's end: the items of its commands that have ended complete,
    and those sessions are forgotten (nothing of them is left to poll)."""
    sessions = command_sessions()
    for session in sessions.of_thread(context.thread_id):
        if session.turn_id == context.turn_id and not session.running:
            finish_item(context, session)
            sessions.forget(session)


def model_output(session: CommandSession, output: str, wall_seconds: float, max_tokens: int) -> str:
    """What the model gets back, in the shape Codex gives it."""
    tokens = (len(output) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN
    state = (
        f"Process running with session ID {session.id}"
        if session.running
        else f"Process exited with code {session.exit_code}"
    )
    if session.timed_out:  # the model should not take -9 for the command's own failure
        state += f" (killed: it ran past this server's {session.timeout_seconds:g} s command timeout)"
    return (
        f"Chunk ID: {secrets.token_hex(3)}\n"
        f"Wall time: {wall_seconds:.4f} seconds\n"
        f"{state}\n"
        f"Original token count: {tokens}\n"
        f"Output:\n{_cut(output, max_tokens * CHARS_PER_TOKEN)}"
    )


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    left_out = (len(text) - 2 * half + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN
    return f"{text[:half]}\n…{left_out} tokens truncated…\n{text[-half:]}"


# --- apply_patch ------------------------------------------------------------------

PATCH_WRITER = Path(__file__).with_name("patches.py").read_text()  # run inside the sandbox, as -c source
PATCH_SECONDS = 30.0


async def apply_patch(context: CommandContext, call_id: str, patch: str, workdir: str | None = None) -> str:
    """A ``fileChange`` item; the patch applied inside the thread's sandbox
    (the kernel keeps its writes where the sandbox allows, whatever links
    the workspace holds). A change the sandbox would not allow asks the
    people on the thread first; under ``never`` it is refused."""
    try:
        operations = parse(patch)
    except PatchError as exc:
        raise CallRefused(f"apply_patch: {exc}") from None
    # What can be shown before it runs: an added file's lines (the server reads no file itself).
    preview = [
        {
            "path": op.path,
            "kind": op.change_kind(),
            "diff": unified_diff(op.path, [], op.added) if op.kind == "add" else "",
        }
        for op in operations
    ]
    record = ItemRecord({"id": call_id, "type": "fileChange", "changes": preview, "status": "inProgress"}, now_ms())
    targets = [path for op in operations for path in (op.path, op.move_path) if path]
    workdir = workdir or context.cwd  # the patch's paths are relative to it; the sandbox stays the thread's
    writable = _writable(context, targets, workdir)
    ask = not writable or context.approval_policy == "untrusted"  # untrusted: every change asks
    if ask and approval_needed(context.approval_policy, "apply_patch", True, False) == REFUSE:
        raise CallRefused("apply_patch: these files are outside what this thread may write, and it may not ask")
    context.add_item(record)
    context.notify("item/started", {"item": record.item, "startedAtMs": record.started_at_ms})
    try:
        if ask:
            decision = await _ask_file_change(context, record)
            if decision in (DECLINE, CANCEL):
                _complete_file_change(context, record, "declined")
                if decision == CANCEL:
                    raise TurnCancelledByUser
                raise CallRefused("the user declined these file changes")
        # Never unsandboxed, even where full access is allowed: hidden files stay hidden from a diff.
        policy = context.policy if writable and context.policy.mode == WORKSPACE_WRITE else _workspace_writable(context)
        result = await _run_patch_writer(context, policy, patch, workdir)
    except BaseException:
        if record.item["status"] == "inProgress":
            _complete_file_change(context, record, "failed")
        raise
    if "error" in result:
        _complete_file_change(context, record, "failed")
        raise CallRefused(f"apply_patch failed: {result['error']}")
    record.item["changes"] = result["changes"]
    _complete_file_change(context, record, "completed")
    context.turn_diffs.extend(change["diff"] for change in result["changes"])
    context.notify("turn/diff/updated", {"diff": "".join(context.turn_diffs)})
    letters = {"add": "A", "delete": "D", "update": "M"}
    listed = "\n".join(
        f"{letters[change['kind']['type']]} {change['kind'].get('move_path') or change['path']}" for change in result["changes"]
    )
    return f"Success. Updated the following files:\n{listed}\n"


def _writable(context: CommandContext, targets: list[str], workdir: str) -> bool:
    """Whether the thread's sandbox would let these paths be written without
    asking (a guess from their real paths: the sandbox itself decides, and a
    wrong guess only asks). The server's own files never are."""
    policy = context.policy
    if policy.mode == READ_ONLY:
        return False
    roots = (context.cwd,) if policy.mode == FULL_ACCESS else policy.writable_roots
    for target in (os.path.join(workdir, target) for target in targets):
        if not any(inside_or_equal(target, root) for root in roots):
            return False
        if any(inside_or_equal(target, protected) for protected in context.protected_paths):
            return False
    return True


def _workspace_writable(context: CommandContext) -> SandboxPolicy:
    return SandboxPolicy(WORKSPACE_WRITE, (context.cwd,), network_access=False)


async def _ask_file_change(context: CommandContext, record: ItemRecord) -> str:
    if context.ask is None:
        return DECLINE
    params = {"threadId": context.thread_id, "turnId": context.turn_id, "itemId": record.item["id"], "startedAtMs": now_ms(), "reason": None, "grantRoot": None}
    return decision_of(await context.ask("item/fileChange/requestApproval", params))


def _complete_file_change(context: CommandContext, record: ItemRecord, status: str) -> None:
    record.item["status"] = status
    record.completed_at_ms = now_ms()
    context.notify("item/completed", {"item": record.item, "completedAtMs": record.completed_at_ms})


async def _run_patch_writer(context: CommandContext, policy: SandboxPolicy, patch: str, workdir: str) -> dict[str, Any]:
    python = shutil.which("python3", path=SANDBOX_PATH) or sys.executable
    argv = [python, "-I", "-c", PATCH_WRITER]
    _, output = await run_in_sandbox(context, policy, argv, "apply_patch", patch, PATCH_SECONDS, workdir)
    lines = output.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        return {"error": "the patch could not be applied: " + " ".join(lines)[-500:]}


async def run_in_sandbox(
    context: CommandContext,
    policy: SandboxPolicy,
    argv: list[str],
    name: str,
    stdin: str | None,
    seconds: float,
    workdir: str | None = None,
) -> tuple[int | None, str]:
    """A helper program of the server's own (the patch writer, the image
    reader), run in the turn's sandbox as any command is, so it sees and
    writes only what a command could: its exit code (None if it did not end
    in time) and its output. It runs in ``workdir`` (a directory inside the
    thread's, the thread's if omitted); the sandbox is the thread's either way."""
    workdir = workdir or context.cwd
    launch, environment = _launch(argv, workdir, context, policy)
    session = await command_sessions().start(
        launch, thread_id=context.thread_id, turn_id=context.turn_id, item_id=name, command=name,
        cwd=workdir, env=environment, timeout=seconds,
    )  # fmt: skip
    try:
        if stdin is not None:
            await session.write(stdin.encode("utf-8", "replace").decode())
        session.close_stdin()
        await session.wait(seconds)
    finally:
        session.kill()
        command_sessions().forget(session)
    return session.exit_code, session.kept.text()

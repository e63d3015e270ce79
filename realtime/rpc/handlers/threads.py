"""Thread methods: start, resume, unsubscribe, and reading the store (PROTOCOL §8-9)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from django.conf import settings

from realtime.fanout.thread_hub import thread_hub
from realtime.services import telemetry
from realtime.services.config import UpstreamConfig
from realtime.store.thread_store import DatabaseThreads, store_for
from realtime.store.threads import Thread, Turn, new_id
from realtime.tools.dynamic_tools import ClientGone, DeclaredTools, parse_dynamic_tools
from realtime.tools.exec_sessions import command_sessions
from realtime.tools.workspace import outside_workspace_warning, thread_sandbox, within_workspace, workspace_roots

from ..params import (
    optional_bool,
    optional_int,
    optional_model,
    optional_stored_str,
    optional_str,
    optional_str_list,
    params_object,
    require_storable,
    required_str,
)
from ..policy_params import approval_policy, sandbox_mode
from ..protocol import INVALID_REQUEST, JsonRpcError

MODEL_PROVIDER = "openai"
# What a thread stores of the client's (and sends back in every listing) is bounded.
MAX_CWD_CHARS = 4096  # PATH_MAX
MAX_INSTRUCTIONS_CHARS = 256 * 1024
MAX_ORIGINATOR_FILTER = 100
CURSOR = re.compile(r"[0-9]{1,12}")  # as this server writes them
# thread/resume and thread/read's includeTurns give the newest this many
# turns with their items: one reply never carries an unbounded history.
# Older ones are paged with thread/turns/list.
MAX_TURNS_IN_A_THREAD = 100
DEFAULT_PAGE = 25
MAX_PAGE = 100


def _session_json(thread: Thread, turns: list[Turn] | None, running_elsewhere: bool = False) -> dict[str, Any]:
    """What ``thread/start`` and ``thread/resume`` answer: the thread and the
    effective settings its commands run with (PROTOCOL §11)."""
    policy = thread_sandbox(thread)
    return {
        "thread": thread.to_json(turns, running_elsewhere),
        "model": thread.model,
        "modelProvider": thread.model_provider,
        "cwd": thread.cwd,
        "approvalPolicy": thread.approval_policy,
        "approvalsReviewer": "user",
        "sandbox": policy.to_json(),
        "reasoningEffort": None,
        "serviceTier": None,
    }


def _cwd(params: dict[str, Any], roots: tuple[str, ...]) -> str:
    """The thread's working directory: the client's when absolute, else the
    first workspace root (the Codex TUI in --remote mode sends none, then
    uses the one answered)."""
    cwd = optional_stored_str(params, "cwd", MAX_CWD_CHARS)
    if cwd and os.path.isabs(cwd):
        return os.path.normpath(cwd)
    return roots[0] if roots else "/"


def _check_thread_limit(context, thread_id: str) -> None:
    connection = context.connection
    if thread_id not in connection.threads and len(connection.threads) >= settings.CODEX_MAX_THREADS_PER_CONNECTION:
        raise JsonRpcError(INVALID_REQUEST, f"Thread limit reached ({settings.CODEX_MAX_THREADS_PER_CONNECTION} per connection)")


def _dynamic_tools(params: dict[str, Any], connection) -> DeclaredTools | None:
    """The tools the client declares for the thread, run by this connection."""
    if params.get("dynamicTools") in (None, []):
        return None
    try:
        tools, namespaces = parse_dynamic_tools(params["dynamicTools"])
    except ValueError as exc:
        raise JsonRpcError.invalid_params(str(exc)) from None
    return DeclaredTools(tools, namespaces, ask=_asking(connection))


def _asking(connection) -> Callable[[str, dict[str, Any]], Awaitable[Any]]:
    """The declaring connection's server request, without keeping it alive:
    the thread may outlive it here (another subscriber holds it)."""
    declarer = weakref.ref(connection)

    async def ask(method: str, params: dict[str, Any]) -> Any:
        live = declarer()
        if live is None or params.get("threadId") not in live.threads:  # gone, or no longer following it
            raise ClientGone
        return await live.ask(method, params)

    return ask


async def start_thread(context, params: Any) -> dict[str, Any]:
    params = params_object(params)
    config = UpstreamConfig.from_settings()
    roots = workspace_roots(context.principal)
    dynamic_tools = _dynamic_tools(params, context.connection)
    thread = Thread(
        id=new_id(),
        model=optional_model(params) or config.model,
        model_provider=MODEL_PROVIDER,
        cwd=_cwd(params, roots),
        originator=context.identity.originator,
        principal_id=context.principal.id,
        base_instructions=optional_stored_str(params, "baseInstructions", MAX_INSTRUCTIONS_CHARS),
        sandbox_mode=sandbox_mode(params),
        approval_policy=approval_policy(params),
        ephemeral=bool(optional_bool(params, "ephemeral")),
    )
    _check_thread_limit(context, thread.id)
    # In its group before its row exists: a join that fails (Redis down)
    # leaves no thread its client was never told of.
    thread = await context.connection.subscribe(thread)
    try:
        await store_for(thread).create(thread)
    except BaseException:
        with contextlib.suppress(Exception):  # (its own failure is not the one to report)
            await asyncio.shield(context.connection.unsubscribe(thread))
        raise
    thread.dynamic_tools = dynamic_tools
    identity = context.identity

    connection = context.connection

    def announce() -> None:
        thread_hub().publish(thread, "thread/started", {"thread": thread.to_json()})
        if not thread.ephemeral and not within_workspace(thread.cwd, roots):
            connection.notify("warning", {"message": outside_workspace_warning(thread.cwd), "threadId": thread.id})
        telemetry.record_event(identity, telemetry.THREAD_STARTED, thread.id)

    context.after_reply(announce)
    return _session_json(thread, turns=None)


async def resume_thread(context, params: Any) -> dict[str, Any]:
    params = params_object(params)
    thread_id = required_str(params, "threadId")
    _check_thread_limit(context, thread_id)
    model = optional_model(params)
    exclude_turns = optional_bool(params, "excludeTurns")  # read first: a bad param must not leave it subscribed
    found, running_elsewhere = await context.stored_thread(thread_id)
    # Subscribed before the turns are read: nothing that ends after the read is missed.
    thread = await context.connection.subscribe(found)
    store = store_for(thread)
    if model:
        thread.model = model
        await store.set_model(thread, model)
    turns = None if exclude_turns else await store.turns(thread, MAX_TURNS_IN_A_THREAD)
    return _session_json(thread, turns, running_elsewhere)


async def unsubscribe_thread(context, params: Any) -> dict[str, Any]:
    params = params_object(params)
    thread = thread_hub().get(required_str(params, "threadId"))
    if thread is None or thread.principal_id != context.principal.id:  # another's is as unknown
        return {"status": "notLoaded"}
    if thread.id not in context.connection.threads:
        return {"status": "notSubscribed"}
    await context.connection.unsubscribe(thread)
    return {"status": "unsubscribed"}


def _window(params: dict[str, Any]) -> tuple[int, int]:
    """(cursor, limit) of the page asked for. The cursor is opaque: a number
    this server answered (an offset, or for turns the last one's place in its
    thread); 0 for the first page."""
    limit = min(optional_int(params, "limit") or DEFAULT_PAGE, MAX_PAGE)
    cursor = params.get("cursor")
    if cursor is None:
        return 0, limit
    # str.isdigit() takes "²" and five thousand digits, which int() or the database then refused (-32603).
    if not isinstance(cursor, str) or not CURSOR.fullmatch(cursor):
        raise JsonRpcError.invalid_params("cursor must be one this server answered (nextCursor)")
    return int(cursor), limit


def _next_cursor(offset: int, page_length: int, more: bool) -> str | None:
    return str(offset + page_length) if more else None


def _page(params: dict[str, Any], items: list[Any]) -> tuple[list[Any], str | None]:
    """One page of ``items`` after the cursor, and the next cursor."""
    offset, limit = _window(params)
    page = items[offset : offset + limit]
    return page, _next_cursor(offset, len(page), offset + len(page) < len(items))


async def list_threads(context, params: Any) -> dict[str, Any]:
    params = params_object(params)
    offset, limit = _window(params)
    ascending = params.get("sortDirection") == "asc"
    originators = optional_str_list(params, "originators")
    if originators is not None:
        require_storable(originators, "originators")  # the database could not even compare them
        # Each name is a parameter of the database's query: a 110,000-name filter held SQLite's one thread 0.5 s.
        if len(originators) > MAX_ORIGINATOR_FILTER or any(len(name) > 256 for name in originators):
            raise JsonRpcError.invalid_params(f"originators must be at most {MAX_ORIGINATOR_FILTER} names of at most 256 characters")
    found, more = await DatabaseThreads.page(context.principal.id, originators, ascending, offset, limit)
    hub = thread_hub()
    data = []
    for stored, running in found:
        thread, running_elsewhere = hub.as_seen_here(stored, running)
        data.append(thread.to_json(running_elsewhere=running_elsewhere))
    return {"data": data, "nextCursor": _next_cursor(offset, len(data), more), "backwardsCursor": None}


async def read_thread(context, params: Any) -> dict[str, Any]:
    params = params_object(params)
    thread, running = await context.stored_thread(required_str(params, "threadId"))
    turns = await store_for(thread).turns(thread, MAX_TURNS_IN_A_THREAD) if optional_bool(params, "includeTurns") else None
    return {"thread": thread.to_json(turns, running)}


async def list_thread_turns(context, params: Any) -> dict[str, Any]:
    """Newest first unless asked otherwise, as Codex pages a long history. The
    cursor is the last turn's place in its thread: the next page starts
    past it, however many turns start meanwhile."""
    params = params_object(params)
    thread, _ = await context.stored_thread(required_str(params, "threadId"))
    ascending = params.get("sortDirection") == "asc"
    after, limit = _window(params)
    after = None if params.get("cursor") is None else after
    include_items = params.get("itemsView") != "notLoaded"
    page, more = await store_for(thread).turn_page(thread, ascending, after, limit, include_items)
    return {
        "data": [turn.to_json(include_items) for turn in page],
        "nextCursor": str(page[-1].sequence) if more and page else None,
        "backwardsCursor": None,
    }


async def list_thread_items(context, params: Any) -> dict[str, Any]:
    params = params_object(params)
    thread, _ = await context.stored_thread(required_str(params, "threadId"))
    turn_id = optional_str(params, "turnId")
    offset, limit = _window(params)
    ascending = params.get("sortDirection") != "desc"
    found, more = await store_for(thread).item_page(thread, turn_id, ascending, offset, limit)
    page = [record.entry_json(turn) for turn, record in found]
    return {"data": page, "nextCursor": _next_cursor(offset, len(page), more), "backwardsCursor": None}


async def list_loaded_threads(context, params: Any) -> dict[str, Any]:
    params = params_object(params)
    principal_id = context.principal.id
    page, next_cursor = _page(
        params, [thread.id for thread in thread_hub().subscribed() if thread.principal_id == principal_id]
    )
    return {"data": page, "nextCursor": next_cursor}


async def update_read_state(context, params: Any) -> dict[str, Any]:
    params = params_object(params)
    thread, _ = await context.stored_thread(required_str(params, "threadId"))
    revision = await store_for(thread).next_read_revision(thread)
    return {"readState": {"revision": str(revision), "firstUnread": None}}


async def get_thread_goal(context, params: Any) -> dict[str, Any]:
    await context.stored_thread(required_str(params_object(params), "threadId"))
    return {"goal": None}  # no goals: the server runs no agents of its own


async def list_background_terminals(context, params: Any) -> dict[str, Any]:
    """The thread's commands still running on this process (a turn's commands
    run on the process that runs the turn, PROTOCOL §11)."""
    params = params_object(params)
    thread, _ = await context.stored_thread(required_str(params, "threadId"))
    running = [session for session in command_sessions().of_thread(thread.id) if session.running]
    page, next_cursor = _page(params, [_terminal_json(session) for session in running])
    return {"data": page, "nextCursor": next_cursor}


def _terminal_json(session) -> dict[str, Any]:
    return {
        "command": session.command,
        "cwd": session.cwd,
        "itemId": session.item_id,
        "processId": str(session.id),
        "osPid": session.process.pid,
        "cpuPercent": None,
        "rssKb": None,
    }


async def terminate_background_terminal(context, params: Any) -> dict[str, Any]:
    params = params_object(params)
    thread, _ = await context.stored_thread(required_str(params, "threadId"))
    process_id = required_str(params, "processId")
    session = command_sessions().get(thread.id, int(process_id)) if process_id.isascii() and process_id.isdigit() else None
    if session is None or not session.running:
        return {"terminated": False}
    session.kill()
    await session.wait(1.0)
    command_sessions().forget(session)
    return {"terminated": True}


async def clean_background_terminals(context, params: Any) -> dict[str, Any]:
    """End every command of the thread on this process, and forget them."""
    thread, _ = await context.stored_thread(required_str(params_object(params), "threadId"))
    sessions = command_sessions()
    for session in sessions.of_thread(thread.id):
        session.kill()
        await session.wait(1.0)
        sessions.forget(session)
    return {}

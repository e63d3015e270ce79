"""Thread methods: start, resume, unsubscribe, and reading the store (PROTOCOL §8-9)."""

from __future__ import annotations

import os
from typing import Any

from django.conf import settings

from ..params import optional_bool, optional_int, optional_str, optional_str_list, params_object, required_str
from ..protocol import INVALID_REQUEST, JsonRpcError
from ..services import telemetry
from ..services.config import UpstreamConfig
from ..threads import Thread, new_id, thread_store

MODEL_PROVIDER = "openai"
DEFAULT_PAGE = 25
MAX_PAGE = 100


def _session_json(thread: Thread, include_turns: bool) -> dict[str, Any]:
    """What ``thread/start`` and ``thread/resume`` answer: the thread and its settings.

    The server runs no tools (PROTOCOL §8), so nothing ever needs approval and
    nothing can write: ``never`` and a read-only sandbox say exactly that.
    """
    return {
        "thread": thread.to_json(include_turns=include_turns),
        "model": thread.model,
        "modelProvider": thread.model_provider,
        "cwd": thread.cwd,
        "approvalPolicy": "never",
        "approvalsReviewer": "user",
        "sandbox": {"type": "readOnly", "networkAccess": False},
        "reasoningEffort": None,
        "serviceTier": None,
    }


def _cwd(params: dict[str, Any]) -> str:
    # The client's working directory is its own; it is echoed back (Codex
    # clients show it), never used here. Only an absolute one is taken.
    cwd = optional_str(params, "cwd")
    return cwd if cwd and os.path.isabs(cwd) else os.getcwd()


def _subscribe(context, thread: Thread) -> None:
    connection = context.connection
    if thread.id not in connection.threads and len(connection.threads) >= settings.CODEX_MAX_THREADS_PER_CONNECTION:
        raise JsonRpcError(INVALID_REQUEST, f"Thread limit reached ({settings.CODEX_MAX_THREADS_PER_CONNECTION} per connection)")
    connection.subscribe(thread)


async def start_thread(context, params: Any) -> dict[str, Any]:
    params = params_object(params)
    config = UpstreamConfig.from_settings()
    thread = Thread(
        id=new_id(),
        model=optional_str(params, "model") or config.model,
        model_provider=MODEL_PROVIDER,
        cwd=_cwd(params),
        originator=context.identity.originator,
        base_instructions=optional_str(params, "baseInstructions"),
        ephemeral=bool(optional_bool(params, "ephemeral")),
    )
    _subscribe(context, thread)
    thread_store.add(thread, settings.CODEX_MAX_STORED_THREADS)
    identity = context.identity

    def announce() -> None:
        thread.notify("thread/started", {"thread": thread.to_json()})
        telemetry.record_event(identity, telemetry.THREAD_STARTED, thread.id)

    context.after_reply(announce)
    return _session_json(thread, include_turns=False)


async def resume_thread(context, params: Any) -> dict[str, Any]:
    params = params_object(params)
    thread = context.stored_thread(required_str(params, "threadId"))
    _subscribe(context, thread)
    model = optional_str(params, "model")
    if model:
        thread.model = model
    return _session_json(thread, include_turns=not optional_bool(params, "excludeTurns"))


async def unsubscribe_thread(context, params: Any) -> dict[str, Any]:
    params = params_object(params)
    thread = thread_store.get(required_str(params, "threadId"))
    if thread is None:
        return {"status": "notLoaded"}
    if thread.id not in context.connection.threads:
        return {"status": "notSubscribed"}
    context.connection.unsubscribe(thread)
    return {"status": "unsubscribed"}


def _page(params: dict[str, Any], items: list[Any]) -> tuple[list[Any], str | None]:
    """One page of ``items`` after the opaque ``cursor`` (an offset), and the next cursor."""
    limit = min(optional_int(params, "limit") or DEFAULT_PAGE, MAX_PAGE)
    cursor = params.get("cursor")
    start = int(cursor) if isinstance(cursor, str) and cursor.isdigit() else 0
    page = items[start : start + limit]
    following = start + len(page)
    return page, (str(following) if following < len(items) else None)


async def list_threads(context, params: Any) -> dict[str, Any]:
    params = params_object(params)
    threads = thread_store.newest_first()
    originators = optional_str_list(params, "originators")
    if originators:
        threads = [thread for thread in threads if thread.originator in originators]
    if params.get("sortDirection") == "asc":
        threads.reverse()
    page, next_cursor = _page(params, threads)
    return {"data": [thread.to_json() for thread in page], "nextCursor": next_cursor, "backwardsCursor": None}


async def read_thread(context, params: Any) -> dict[str, Any]:
    params = params_object(params)
    thread = context.stored_thread(required_str(params, "threadId"))
    return {"thread": thread.to_json(include_turns=bool(optional_bool(params, "includeTurns")))}


async def list_thread_turns(context, params: Any) -> dict[str, Any]:
    params = params_object(params)
    thread = context.stored_thread(required_str(params, "threadId"))
    turns = list(thread.turns)
    if params.get("sortDirection") != "asc":
        turns.reverse()  # newest first, as Codex pages a long history
    page, next_cursor = _page(params, turns)
    include_items = params.get("itemsView") != "notLoaded"
    return {"data": [turn.to_json(include_items) for turn in page], "nextCursor": next_cursor, "backwardsCursor": None}


async def list_thread_items(context, params: Any) -> dict[str, Any]:
    params = params_object(params)
    thread = context.stored_thread(required_str(params, "threadId"))
    turn_id = optional_str(params, "turnId")
    entries = [
        record.entry_json(turn.id)
        for turn in thread.turns
        if turn_id is None or turn.id == turn_id
        for record in turn.items
    ]
    if params.get("sortDirection") == "desc":
        entries.reverse()
    page, next_cursor = _page(params, entries)
    return {"data": page, "nextCursor": next_cursor, "backwardsCursor": None}


async def list_loaded_threads(context, params: Any) -> dict[str, Any]:
    params = params_object(params)
    page, next_cursor = _page(params, [thread.id for thread in thread_store.loaded()])
    return {"data": page, "nextCursor": next_cursor}


async def update_read_state(context, params: Any) -> dict[str, Any]:
    params = params_object(params)
    thread = context.stored_thread(required_str(params, "threadId"))
    thread.read_revision += 1
    return {"readState": {"revision": str(thread.read_revision), "firstUnread": None}}


async def get_thread_goal(context, params: Any) -> dict[str, Any]:
    context.stored_thread(required_str(params_object(params), "threadId"))
    return {"goal": None}  # no goals: the server runs no agents of its own


async def list_background_terminals(context, params: Any) -> dict[str, Any]:
    context.stored_thread(required_str(params_object(params), "threadId"))
    return {"data": [], "nextCursor": None}  # no terminals: the server runs no tools

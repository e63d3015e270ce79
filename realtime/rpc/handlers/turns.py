"""``turn/start`` and ``turn/interrupt``: one running turn per thread."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from django.conf import settings

from realtime.fanout.thread_hub import thread_hub
from realtime.services.config import UpstreamConfig
from realtime.store.history_cache import history_cache
from realtime.store.thread_store import DatabaseThreads, store_for
from realtime.store.threads import PREVIEW_CHARS, ItemRecord, Turn, new_id, now_ms
from realtime.store.turn_writes import WrittenButUnread
from realtime.tools.definitions import offered_tools
from realtime.tools.workspace import within_workspace, workspace_roots
from realtime.turns.early_stream import EarlyStream
from realtime.turns.lease import Lease
from realtime.turns.runner import (
    TurnContext,
    first_model_request,
    model_request,
    release_abandoned,
    run_turn,
    settle_turn,
    user_message,
)

from ..params import optional_model, params_object, require_storable, required_list, required_str
from ..policy_params import approval_policy, turn_sandbox
from ..protocol import INVALID_REQUEST, JsonRpcError


def _read_input(items: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(Responses API content parts, the schema's UserInput items) of ``input``."""
    if not items:
        raise JsonRpcError.invalid_params("input must not be empty")
    parts, user_inputs = [], []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise JsonRpcError.invalid_params(f"input[{index}] must be an object")
        kind = item.get("type")
        if kind == "text":
            if not isinstance(item.get("text"), str):
                raise JsonRpcError.invalid_params(f"input[{index}].text must be a string")
            require_storable(item["text"], f"input[{index}].text")
            parts.append({"type": "input_text", "text": item["text"]})
            user_inputs.append({"type": "text", "text": item["text"], "text_elements": _text_elements(item, index)})
        elif kind == "image" and isinstance(item.get("url"), str):
            require_storable(item["url"], f"input[{index}].url")
            parts.append({"type": "input_image", "image_url": item["url"]})
            user_inputs.append({"type": "image", "url": item["url"]})
        else:
            # Refused rather than dropped: the user would lose what they sent.
            # (A localImage path names a file on the client's machine, not ours.)
            raise JsonRpcError.invalid_params(f"input[{index}].type {kind!r} is not supported")
    return parts, user_inputs


MAX_BYTE_OFFSET = 2**32  # far past any frame this server accepts


def _text_elements(item: dict[str, Any], index: int) -> list[dict[str, Any]]:
    """The UI spans of a text input (schema TextElement), kept for the client's
    own rendering. They are echoed to every subscriber and stored, so each is
    checked and rebuilt with the schema's fields only."""
    elements = item.get("text_elements")
    if elements is None:
        return []
    if not isinstance(elements, list):
        raise JsonRpcError.invalid_params(f"input[{index}].text_elements must be an array")
    rebuilt = []
    for element in elements:
        span = element.get("byteRange") if isinstance(element, dict) else None
        placeholder = element.get("placeholder") if isinstance(element, dict) else None
        if not (
            isinstance(span, dict)
            and all(_offset(span.get(end)) for end in ("start", "end"))
            and span["start"] <= span["end"]
            and (placeholder is None or isinstance(placeholder, str))
        ):
            raise JsonRpcError.invalid_params(f"input[{index}].text_elements: each needs byteRange {{start, end}}")
        if placeholder is not None:
            require_storable(placeholder, f"input[{index}].text_elements.placeholder")
        rebuilt.append({"byteRange": {"start": span["start"], "end": span["end"]}, "placeholder": placeholder})
    return rebuilt


def _offset(value: Any) -> bool:
    """A byte offset the schema's ``uint`` and any client can read back."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_BYTE_OFFSET


def _preview(user_inputs: list[dict[str, Any]]) -> str:
    text = " ".join(item["text"] for item in user_inputs if item["type"] == "text")
    return text[:PREVIEW_CHARS]


async def start_turn(context, params: Any) -> dict[str, Any]:
    params = params_object(params)
    thread = context.subscribed_thread(required_str(params, "threadId"))
    parts, user_inputs = _read_input(required_list(params, "input"))
    model = optional_model(params)
    output_schema = params.get("outputSchema")
    if output_schema is not None and not isinstance(output_schema, dict):
        raise JsonRpcError.invalid_params("outputSchema must be an object")
    sandbox, approvals = turn_sandbox(params), approval_policy(params, default=None)
    if thread.active_turn is not None:
        raise JsonRpcError(INVALID_REQUEST, "Turn already in progress")
    if context.connection.running_turns >= settings.CODEX_MAX_RUNNING_TURNS_PER_CONNECTION:
        raise JsonRpcError.overloaded()
    await _check_budget(context)
    turn = Turn(
        new_id(),
        originator=context.identity.originator,
        client_name=context.identity.client_name,
        connection_id=str(context.connection.connection_id),
    )
    # Counted toward its principal from here: it will hold an upstream stream.
    context.connection.hold_upstream(turn)
    holds_lock = False
    early: EarlyStream | None = None
    try:
        started = now_ms()
        user_item = ItemRecord({"id": new_id(), "type": "userMessage", "content": user_inputs}, started, started)
        turn.items.append(user_item)
        thread.preview = thread.preview or _preview(user_inputs)
        message = user_message(parts)
        # The lock is the store's, deployment-wide: a turn of this thread running
        # on any process refuses this one.
        store = store_for(thread)
        hub = thread_hub()
        await hub.ensure_started()  # its channel is where turn/interrupt from elsewhere arrives
        lock_seconds = settings.CODEX_TURN_LOCK_SECONDS
        lease = Lease.forever() if thread.ephemeral else Lease.asked_now(lock_seconds)  # asked for from here
        max_history_bytes = settings.CODEX_MAX_HISTORY_BYTES
        cache = history_cache()
        cached = None if thread.ephemeral else cache.get(thread.id, max_history_bytes)
        config = UpstreamConfig.from_settings()
        tools_enabled = not thread.ephemeral and within_workspace(thread.cwd, workspace_roots(context.principal))
        tools = offered_tools(
            settings.CODEX_WEB_SEARCH, thread.dynamic_tools.for_model() if thread.dynamic_tools is not None else ()
        )
        if cached is not None:
            # Sent now, as the start is likely to confirm it; its output is held until then.
            mode, network = sandbox or (thread.sandbox_mode, thread.network_access)
            policy = (mode, network, thread.approval_policy if approvals is None else approvals)
            request = model_request(
                thread, model or thread.model, policy, cached.history, [message], output_schema,
                tools if tools_enabled else None,
            )  # fmt: skip
            early = EarlyStream(context.connection, context.identity, request, config)
        # Nothing that can fail between this and the wait below: a start
        # sent must be waited for, or its lock released (see the except).
        begin = asyncio.ensure_future(
            # like Codex: a model override sticks for later turns
            store.begin_turn(
                thread, turn, hub.channel, lock_seconds, max_history_bytes, model,
                sandbox, approvals, cached_sequence=cached.sequence if cached is not None else None,
            )  # fmt: skip
        )
        try:
            begun = await asyncio.shield(begin)
        except asyncio.CancelledError:
            # The client left while the lock was being taken: never leave it held.
            begin.add_done_callback(lambda done: _release_if_taken(done, thread, turn, store))
            raise
        except WrittenButUnread:
            release_abandoned(thread, turn, store)  # the lock and the turn were written: free them
            raise
        if not thread.ephemeral:
            # What was kept is stale (a turn runs elsewhere, or began since), or
            # one turn old from here (this one's end keeps the next): a start
            # while this turn's end is written must not send an early request without it.
            cache.forget(thread.id)
        if begun is None:
            raise JsonRpcError(INVALID_REQUEST, "Turn already in progress")
        holds_lock = True
        # The model and policy as stored, the overrides applied (another process's turn/start may have changed them).
        history, thread.model, turn.row_id, taken_over, policy = begun
        if history is None:  # no turn began since the one whose history this process kept
            history = cached.history
        thread.sandbox_mode, thread.network_access, thread.approval_policy = policy
        thread.active_turn = turn
        hub.hold(thread)
        thread.touch()
        turn_context = TurnContext(
            identity=context.identity,
            connection=context.connection,
            thread=thread,
            turn=turn,
            store=store,
            history=history,
            user_message=message,
            user_item=user_item,
            config=config,
            max_history_bytes=max_history_bytes,
            lock_seconds=lock_seconds,
            lease=lease,
            output_schema=output_schema,
            taken_over=taken_over,
            tools_enabled=tools_enabled,
            max_tool_steps=settings.CODEX_MAX_TOOL_STEPS,
            full_access_allowed=settings.CODEX_ALLOW_FULL_ACCESS,
            offered_tools=tools,
            early=early,
        )
        if early is not None and early.request != first_model_request(turn_context):
            # Another turn began since the history kept here, or another
            # process changed the thread's model or policy: sent again.
            early.cancel()
            turn_context = dataclasses.replace(turn_context, early=None)
    except BaseException:
        if early is not None:
            early.cancel()  # the turn will not take it
        context.connection.let_go_upstream(turn)  # never started: a later settle_turn will not run
        if holds_lock:
            release_abandoned(thread, turn, store)  # nor will it free the thread
        raise

    connection = context.connection
    connection.own_turns.add(turn)

    def start() -> None:
        turn.task = connection.spawn(run_turn(turn_context), name=f"turn {turn.id}")
        turn.task.add_done_callback(lambda task: settle_turn(turn_context))

    context.after_reply(start)
    return {"turn": turn.to_json(include_items=False)}


async def _check_budget(context) -> None:
    """A principal with a token budget may start turns until its turns'
    usage reaches it (PROTOCOL §12); a turn already running finishes.
    Without a budget (as the principal watch last read it) this costs
    nothing; with one, one read of the principal's row."""
    if context.connection.token_budget is None:
        return
    used, budget = await DatabaseThreads.usage_and_budget(context.principal.id)
    if budget is not None and used >= budget:
        raise JsonRpcError.usage_limit_exceeded(
            f"Usage limit reached: {context.principal.name} has used {used:,} of its {budget:,}-token budget"
        )


def _release_if_taken(begin: asyncio.Future, thread, turn: Turn, store) -> None:
    if not begin.cancelled() and begin.exception() is None and begin.result() is not None:
        release_abandoned(thread, turn, store)


async def interrupt_turn(context, params: Any) -> dict[str, Any]:
    """From any subscriber on any process: a turn running elsewhere is
    stopped by the process running it, and every subscriber hears it end."""
    params = params_object(params)
    thread = context.subscribed_thread(required_str(params, "threadId"))
    turn_id = required_str(params, "turnId")
    turn = thread.active_turn
    if turn is not None and turn.id == turn_id:
        turn.interrupt()
        return {}
    # Elsewhere, if anywhere: a store read, in the connection's few store-read places.
    async with context.connection.store_reads:
        running = await store_for(thread).running_turn(thread)
    if running is None or running[0] != turn_id or running[1] is None:
        raise JsonRpcError.invalid_params("turnId is not the thread's running turn")
    await thread_hub().interrupt_elsewhere(running[1], thread, turn_id)
    return {}

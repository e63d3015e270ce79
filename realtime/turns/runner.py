"""Runs one turn: stream the model's reply to the client under the turn's identity."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from identity.client_identity import ClientIdentity
from realtime.fanout.thread_hub import thread_hub
from realtime.services import telemetry
from realtime.services.config import UpstreamConfig
from realtime.services.responses import ModelRequest, stream_model_response
from realtime.services.upstream_errors import UpstreamError
from realtime.store.history_cache import history_cache
from realtime.store.storable_text import made_storable
from realtime.store.thread_store import DatabaseThreads, MemoryThreads
from realtime.store.threads import COMPLETED, FAILED, IN_PROGRESS, INTERRUPTED, History, ItemRecord, Thread, Turn
from realtime.store.turn_writes import ONE_WRITES_FAULT, NotStored, TurnLost
from realtime.tools.commands import (
    CommandContext,
    TurnCancelledByUser,
    finish_command_items,
    server_own_paths,
    server_private_paths,
)
from realtime.tools.definitions import AGENT_INSTRUCTIONS, environment_context
from realtime.tools.exec_sessions import command_sessions
from realtime.tools.workspace import thread_sandbox

from .early_stream import EarlyStream
from .lease import Lease
from .stream_events import TurnEventTranslator
from .tool_calls import aborted_output, run_calls

if TYPE_CHECKING:
    from realtime.rpc.connection import AppServerConnection

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TurnContext:
    """Everything a turn decides with, fixed when it starts: no decision reaches for a global."""

    identity: ClientIdentity
    connection: AppServerConnection
    thread: Thread
    turn: Turn
    store: type[DatabaseThreads] | type[MemoryThreads]
    history: History  # model input of the earlier turns, as the store read it (or this process kept it)
    user_message: dict[str, Any]  # Responses API input item
    user_item: ItemRecord  # the same message as a ThreadItem
    config: UpstreamConfig
    max_history_bytes: int
    lock_seconds: float
    lease: Lease  # until when this process may act for the thread, as far as it knows
    output_schema: dict[str, Any] | None = None
    # The turn whose lapsed lock this one took, and its process's channel
    # (dead, or stopped past its lease: if it wakes, it is told to stop).
    taken_over: tuple[str, str | None] | None = None
    # The thread's cwd lies in its principal's workspace: the model may run commands there.
    tools_enabled: bool = False
    max_tool_steps: int = 1
    full_access_allowed: bool = False
    offered_tools: tuple[dict[str, Any], ...] = ()  # to the model, where tools are enabled
    # Its first model request, sent while its start was written (``early_stream``).
    early: EarlyStream | None = None


async def run_turn(turn_context: TurnContext) -> None:
    connection, thread, turn = turn_context.connection, turn_context.thread, turn_context.turn
    # Kept from the start: the announcement below waits on Redis and the database.
    # (An ephemeral thread's lock is this process's memory: nothing to keep.)
    lock_keeper = (
        None if thread.ephemeral else asyncio.create_task(_keep_lock(turn_context), name=f"lock of turn {turn.id}")
    )
    try:
        if turn_context.taken_over is not None:  # its end is heard before this turn starts
            await _announce_taken_over(thread, *turn_context.taken_over)
        # Every subscriber sees the turn; the one that started it sets the pace.
        notify = functools.partial(thread_hub().publish, thread, pace_setter=connection)
        notify("turn/started", {"threadId": thread.id, "turn": turn.to_json()})
        notify("thread/status/changed", {"threadId": thread.id, "status": thread.status_json()})
        translator = TurnEventTranslator(thread.id, turn, notify)
        translator.announce(turn_context.user_item)
        tools = _tool_context(turn_context, notify)
        steps: list[dict[str, Any]] = []  # this turn's earlier responses and their calls' outputs
        status, error = COMPLETED, None

        def will_retry(failure: UpstreamError) -> None:
            notify("error", {"threadId": thread.id, "turnId": turn.id, "error": _error(failure.turn_error()), "willRetry": True})
    except BaseException:
        if lock_keeper is not None:  # (nothing below would: it must not extend the lock of a turn that never ran)
            lock_keeper.cancel()
        raise

    try:
        for step in range(1, turn_context.max_tool_steps + 1):
            if step == 1 and turn_context.early is not None:
                stream = turn_context.early.events(on_retry=will_retry)
            else:
                request = _model_request(turn_context, steps)
                stream = stream_model_response(turn_context.identity, request, turn_context.config, on_retry=will_retry)
            async with aclosing(stream) as events:
                async for event in events:
                    if connection.outbox.overloaded:  # a slow client slows the stream
                        await connection.outbox.wait_for_room()
                    if turn_context.lease.lapsed:
                        raise LeaseLapsed(turn.id)
                    translator.feed(event)
            calls = translator.function_calls
            if not calls:
                break
            if step == turn_context.max_tool_steps:
                raise ToolStepsExhausted(step)
            steps += translator.end_response()  # what the model said: kept whatever happens next
            if turn_context.lease.lapsed:
                raise LeaseLapsed(turn.id)
            try:
                steps += await run_calls(calls, tools)
            except BaseException:
                # Stopped mid-call: each call still gets an output, or the
                # API would refuse the history the next turn replays.
                steps += [aborted_output(call) for call in calls]
                raise
    except (asyncio.CancelledError, LeaseLapsed) as stopped:
        # turn/interrupt, the starting connection closed, or the lock's lease
        # ran out: either way the stored turn ends (unless whoever took the
        # lock ended it), its commands stop, and the thread's other
        # subscribers are told.
        if isinstance(stopped, asyncio.CancelledError):
            asyncio.current_task().uncancel()
        else:
            logger.warning("%s", stopped)
        await _stop_commands(thread, turn)
        # Cancelled while the finished stream drained: the reply is whole.
        status = COMPLETED if translator.completed else INTERRUPTED
    except UpstreamError as exc:
        logger.info("turn %s failed: %s", turn.id, exc.message)
        status, error = FAILED, _error(exc.turn_error())
    except TurnCancelledByUser:
        logger.info("turn %s cancelled at an approval", turn.id)
        await _stop_commands(thread, turn)
        status = INTERRUPTED
    except ToolStepsExhausted as exc:
        logger.info("turn %s stopped: %s", turn.id, exc)
        status, error = FAILED, _error({"message": str(exc), "codexErrorInfo": "other"})
    except Exception:
        # Whatever went wrong, the client is owed a turn/completed.
        logger.exception("turn %s failed unexpectedly", turn.id)
        status, error = FAILED, _error({"message": "internal error while streaming the turn", "codexErrorInfo": "other"})
    finally:
        if lock_keeper is not None:
            lock_keeper.cancel()

    translator.finish()
    if tools is not None:
        finish_command_items(tools)  # those still running stay sessions the model may poll later
    command_sessions().detach_turn(thread.id, turn.id)
    # A call never run has no output, and the API refuses a call without one.
    said = [item for item in translator.model_input() if item["type"] != "function_call"]
    turn.remember_input([turn_context.user_message, *steps, *said])
    turn.finish(status, error)
    usage = turn_token_usage(translator.usages)
    turn.usage = usage
    # Stored before anyone hears the turn ended: a client that reads the
    # thread on turn/completed finds it there, from any process.
    total = await _store_end(turn_context)
    if total is None:
        # Its end could not be stored, or another ended it (a takeover, the
        # sweep): nobody is told an outcome the store does not hold. Its lock
        # lapses, and the sweep ends it interrupted, for every subscriber on
        # every process: one story, told once.
        thread_hub().release_if_unused(thread)
        return
    # The turn as stored: without usage, and failed, if its output was not.
    if turn.usage is not None:
        token_usage_params = {"last": turn.usage, "total": total, "modelContextWindow": None}
        notify("thread/tokenUsage/updated", {"threadId": thread.id, "turnId": turn.id, "tokenUsage": token_usage_params})
    if turn.error is not None:
        notify("error", {"threadId": thread.id, "turnId": turn.id, "error": turn.error, "willRetry": False})
    _announce_end(thread, turn, notify)
    telemetry.record_event(turn_context.identity, telemetry.TURN_COMPLETED, thread.id, turn.id, usage=usage)


async def _stop_commands(thread: Thread, turn: Turn) -> None:
    """The turn was stopped: its commands end now, each whole sandbox, within a second."""
    command_sessions().kill_turns(thread.id, turn.id)
    await command_sessions().ended(thread.id, turn.id, within=1.0)


class LeaseLapsed(Exception):
    def __init__(self, turn_id: str):
        super().__init__(f"turn {turn_id} outlived its lock's lease (its process was stopped, or its database unreachable); stopped")


class ToolStepsExhausted(Exception):
    def __init__(self, steps: int):
        super().__init__(f"the model asked for tools {steps} times in one turn (CODEX_MAX_TOOL_STEPS); stopped there")


def _tool_context(turn_context: TurnContext, notify) -> CommandContext | None:
    """What the turn's commands run with, or None: no tools for this thread."""
    thread, turn = turn_context.thread, turn_context.turn
    if not turn_context.tools_enabled:
        return None
    return CommandContext(
        thread_id=thread.id,
        turn_id=turn.id,
        cwd=thread.cwd,
        policy=thread_sandbox(thread),
        approval_policy=thread.approval_policy,
        hidden_paths=server_private_paths(),
        protected_paths=server_own_paths(),
        notify=lambda method, params: notify(method, {"threadId": thread.id, "turnId": turn.id, **params}),
        add_item=turn.items.append,
        ask=functools.partial(thread_hub().ask, thread),
        full_access_allowed=turn_context.full_access_allowed,
        dynamic_tools=thread.dynamic_tools,
    )


def _model_request(turn_context: TurnContext, steps: list[dict[str, Any]]) -> ModelRequest:
    """The next request of the turn: the history, this turn's message, and what
    the model said and its tools answered so far."""
    thread = turn_context.thread
    return model_request(
        thread,
        thread.model,
        (thread.sandbox_mode, thread.network_access, thread.approval_policy),
        turn_context.history,
        [turn_context.user_message, *steps],
        turn_context.output_schema,
        turn_context.offered_tools if turn_context.tools_enabled else None,
    )


def first_model_request(turn_context: TurnContext) -> ModelRequest:
    return _model_request(turn_context, [])


def model_request(
    thread: Thread,
    model: str,
    policy: tuple[str, bool, Any],
    history: History,
    input_items: list[dict[str, Any]],
    output_schema: dict[str, Any] | None,
    tools: tuple[dict[str, Any], ...] | None,
) -> ModelRequest:
    """A request of a turn of ``thread`` with this model and policy (sandbox
    mode, network access, approvals); ``tools`` None: the thread has none."""
    instructions = thread.base_instructions
    if tools is not None:
        context = environment_context(thread.cwd, *policy)
        instructions = f"{instructions or AGENT_INSTRUCTIONS}\n\n{context}"
    return ModelRequest(
        thread_id=thread.id,
        model=model,
        history=history.text,
        input=input_items,
        instructions=instructions,
        output_schema=output_schema,
        tools=tools or (),
    )


# The database's faults at a turn's end (locked, down, a dropped connection)
# are tried again, a few seconds in all: well inside the turn's lock.
END_RETRY_DELAYS = (0.1, 0.25, 0.5, 1.0, 2.0)


async def _store_end(turn_context: TurnContext) -> dict[str, int] | None:
    """Write the turn's end and free the thread, even if cancelled meanwhile
    (the connection closing); returns the thread's running usage total, or
    None when the end could not be stored."""
    thread, turn = turn_context.thread, turn_context.turn
    thread.active_turn = None
    thread.trim(turn_context.max_history_bytes)
    thread.touch()
    try:
        return _remember_history(turn_context, await _end_written(turn_context))
    except TurnLost as exc:
        logger.warning("%s; its end is the one already told", exc)
        return None
    except ONE_WRITES_FAULT as exc:
        if isinstance(exc, NotStored):
            logger.error("could not store the end of turn %s: %r", turn.id, exc, exc_info=exc)
            return dict(turn.usage or {})
        # Something of the turn's own that the database refused (its other
        # writes went through): stored failed, without its output, its
        # thread is free now rather than when its lock lapses.
        logger.error(
            "could not store the output of turn %s (%r); storing the turn failed, without it", turn.id, exc, exc_info=exc
        )
        _drop_output(turn)
    except Exception:
        logger.exception("could not store the end of turn %s; its lock will lapse and the sweep end it", turn.id)
        return None
    try:
        return _remember_history(turn_context, await _end_written(turn_context))
    except Exception:
        logger.exception("could not store the end of turn %s; its lock will lapse and the sweep end it", turn.id)
        return None


def _remember_history(turn_context: TurnContext, total: dict[str, int]) -> dict[str, int]:
    """The turn's end is stored as this process has it: the thread's next
    turn here replays what the database holds without reading it. (Only
    here: what was kept before was dropped when this turn started, so an
    end not stored as this process has it leaves nothing kept.)"""
    thread, turn, bound = turn_context.thread, turn_context.turn, turn_context.max_history_bytes
    cache = history_cache()
    if not thread.ephemeral and cache.max_bytes > 0:
        cache.remember(thread.id, turn.sequence, turn_context.history.then(turn.model_input, turn.input_bytes, bound), bound)
    return total


async def _end_written(turn_context: TurnContext) -> dict[str, int]:
    """The turn's end, written; a fault of the database's (not of the turn's
    own rows) is tried again after each of END_RETRY_DELAYS."""
    thread, turn = turn_context.thread, turn_context.turn
    for delay in (*END_RETRY_DELAYS, None):
        try:
            return await _written(turn_context.store.finish_turn(thread, turn, first_new_item=1))
        except (TurnLost, *ONE_WRITES_FAULT):
            raise
        except Exception as exc:
            if delay is None:
                raise
            logger.warning("could not store the end of turn %s (%s); trying again in %gs", turn.id, type(exc).__name__, delay)
            await _written(asyncio.sleep(delay))  # (waited out even if cancelled meanwhile)
    raise AssertionError("unreachable")


async def _written(write: Awaitable[Any]) -> Any:
    """A store write's outcome (or a pause before trying it again), waited
    for even if cancelled meanwhile: the turn is ending anyway, and its end
    must be told."""
    written = asyncio.ensure_future(write)
    while not written.done():
        try:
            await asyncio.shield(written)
        except asyncio.CancelledError:
            asyncio.current_task().uncancel()
        except Exception:
            break
    return written.result()


def _drop_output(turn: Turn) -> None:
    turn.items = turn.items[:1]  # the user's message, stored when the turn began
    turn.model_input, turn.input_bytes, turn.usage = "[]", 0, None
    turn.finish(FAILED, _error({"message": "the turn's output could not be stored", "codexErrorInfo": "other"}))


async def _keep_lock(turn_context: TurnContext) -> None:
    """Extend the thread's turn lock while the turn runs, well before it
    lapses; a turn whose lease runs out unextended stops itself, before
    another process may take the lock over."""
    lease, turn = turn_context.lease, turn_context.turn
    while True:
        await asyncio.sleep(max(0.0, min(turn_context.lock_seconds / 3, lease.remaining())))
        if lease.lapsed:
            logger.warning("turn %s could not extend its thread's lock in time; interrupting it", turn.id)
            turn.interrupt()
            return
        try:
            # Never waited for past the lease: a database that does not answer
            # (a dead peer's TCP retransmissions take minutes) stops the turn in time.
            async with asyncio.timeout(max(0.01, lease.remaining())):
                asked_at = await turn_context.store.keep_lock(turn_context.thread, turn, turn_context.lock_seconds)
            if asked_at is None:
                # Another process may already run a turn of this thread: one at a time.
                logger.warning("turn %s lost its thread's lock; interrupting it", turn.id)
                turn.interrupt()
                return
            lease.extended(asked_at)
        except Exception as exc:  # the database is down, or slow: try again before the lease runs out
            logger.warning("could not extend the lock of turn %s: %r", turn.id, exc)


def settle_turn(turn_context: TurnContext) -> None:
    """When the turn's task is done, however: a task cancelled before its first
    step (the client left at once) ran none of ``run_turn``, so its turn is
    ended here, or the thread would stay busy for good."""
    turn = turn_context.turn
    if turn_context.early is not None:  # (a turn cancelled before its first step never took it)
        turn_context.early.cancel()
    turn_context.connection.own_turns.discard(turn)
    turn_context.connection.let_go_upstream(turn)
    if turn.status != IN_PROGRESS:
        return
    turn.finish(INTERRUPTED, None)
    end_in_background(_end_unstarted(turn_context))


_endings: set[asyncio.Future] = set()  # the loop keeps only weak references to tasks


async def background_endings_finished() -> None:
    """Once the ends started in the background (turns that never ran, locks
    taken for a client that left) are written: the server's shutdown waits."""
    loop = asyncio.get_running_loop()
    while pending := [ending for ending in _endings if ending.get_loop() is loop]:  # tests run many loops
        await asyncio.wait(pending)


def end_in_background(coro) -> None:
    ending = asyncio.ensure_future(coro)
    _endings.add(ending)
    ending.add_done_callback(_ended)


def _ended(ending: asyncio.Future) -> None:
    _endings.discard(ending)
    if not ending.cancelled() and isinstance(ending.exception(), TurnLost):
        logger.warning("%s; its end is the one already told", ending.exception())
    elif not ending.cancelled() and ending.exception() is not None:
        # Said here, not as asyncio's "exception was never retrieved" whenever
        # the future happens to be collected. The thread's lock lapses on its own.
        logger.error("could not store the end of a turn in the background", exc_info=ending.exception())


def release_abandoned(thread: Thread, turn: Turn, store) -> None:
    """The request that took the lock will not start the turn (its client
    left, or what its batch returned was lost): store it interrupted and free
    the thread."""
    turn.finish(INTERRUPTED, None)
    if thread.active_turn is turn:  # (an ephemeral thread's claim is its lock)
        thread.active_turn = None
    thread_hub().release_if_unused(thread)
    end_in_background(store.finish_turn(thread, turn, first_new_item=1))


async def _end_unstarted(turn_context: TurnContext) -> None:
    if await _store_end(turn_context) is None:
        thread_hub().release_if_unused(turn_context.thread)
        return  # not stored: the sweep ends it, once
    _announce_end(turn_context.thread, turn_context.turn, functools.partial(thread_hub().publish, turn_context.thread))


def _announce_end(thread: Thread, turn: Turn, notify) -> None:
    """Tell every subscriber the turn ended and the thread is idle; a thread
    nobody here follows any more is unloaded."""
    notify("turn/completed", {"threadId": thread.id, "turn": turn.to_json()})
    notify("thread/status/changed", {"threadId": thread.id, "status": thread.status_json()})
    thread_hub().release_if_unused(thread)


def announce_dead_processes_turn(thread: Thread, turn: Turn, idle: bool) -> None:
    """A turn whose process died was just stored interrupted (its lock
    lapsed): every subscriber, on every process, hears it end, as it would
    have from the turn's own process. ``idle``: no turn took the thread over
    (its subscribers, the only ones who hear this, see it idle)."""
    hub = thread_hub()
    local = hub.get(thread.id)
    thread = local or thread  # not followed here: only the other processes' subscribers hear it
    hub.publish(thread, "turn/completed", {"threadId": thread.id, "turn": turn.to_json()})
    if idle and thread.active_turn is None:
        hub.publish(thread, "thread/status/changed", {"threadId": thread.id, "status": {"type": "idle"}})


ANNOUNCE_SECONDS = 2.0  # for each step of announcing a taken-over turn


async def _announce_taken_over(thread: Thread, turn_id: str, channel: str | None) -> None:
    """The turn whose lapsed lock this one took was stored interrupted: its
    subscribers hear it, and its process, if it was only stopped and wakes,
    is told to stop it (its lease has run out too, and its end is fenced)."""
    if channel is not None:
        try:
            async with asyncio.timeout(ANNOUNCE_SECONDS):
                await thread_hub().interrupt_elsewhere(channel, thread, turn_id)
        except Exception as exc:  # Redis down or slow: its lease stops it
            logger.warning("could not tell the process of turn %s to stop it: %r", turn_id, exc)
    try:
        async with asyncio.timeout(ANNOUNCE_SECONDS):
            turn = await DatabaseThreads.turn(turn_id)
    except Exception as exc:  # the database is down: they find it interrupted on reading
        logger.warning("could not announce the end of turn %s of a stopped process: %s", turn_id, exc)
        return
    if turn is not None and turn.status == INTERRUPTED:  # not a turn whose end its process had stored
        announce_dead_processes_turn(thread, turn, idle=False)


def user_message(text_parts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": text_parts}


def _error(turn_error: dict[str, Any]) -> dict[str, Any]:
    """The schema's TurnError, as the ``error`` notification and turn carry
    it. Its message may quote the upstream: kept storable (``made_storable``)."""
    message = turn_error.get("message")
    return {"additionalDetails": None, **turn_error, "message": made_storable(message) if isinstance(message, str) else message}


MAX_TOKENS = 10**12  # a turn's count; a million turns of it still fit a thread's 64-bit sum


def turn_token_usage(usages: list[dict[str, Any]]) -> dict[str, int] | None:
    """The turn's usage: every model request of its loop, summed."""
    parts = [part for part in map(token_usage, usages) if part]
    if not parts:
        return None
    return {name: min(sum(part[name] for part in parts), MAX_TOKENS) for name in parts[0]}


def token_usage(usage: dict[str, Any] | None) -> dict[str, int] | None:
    """A Responses ``usage`` as the schema's TokenUsageBreakdown."""
    if not usage:
        return None

    def number(value: Any) -> int:
        # Capped: a count past a 64-bit column (or a thread's sum of them) would make the turn's end unstorable.
        return min(value, MAX_TOKENS) if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0

    input_details = usage.get("input_tokens_details") if isinstance(usage.get("input_tokens_details"), dict) else {}
    output_details = usage.get("output_tokens_details") if isinstance(usage.get("output_tokens_details"), dict) else {}
    input_tokens, output_tokens = number(usage.get("input_tokens")), number(usage.get("output_tokens"))
    total_tokens = number(usage.get("total_tokens")) or min(input_tokens + output_tokens, MAX_TOKENS)
    return {
        "inputTokens": input_tokens,
        "cachedInputTokens": number(input_details.get("cached_tokens")),
        "outputTokens": output_tokens,
        "reasoningOutputTokens": number(output_details.get("reasoning_tokens")),
        "totalTokens": total_tokens,
    }

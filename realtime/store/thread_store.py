"""Where threads are kept: the database for every thread, memory for ephemeral ones.

Two stores with one interface. ``DatabaseThreads`` is the deployment's shared
state (PROTOCOL §9): any process lists, reads and resumes any thread, and the
one-running-turn rule is a conditional UPDATE with an expiry on the
database's clock, so a process killed mid-turn frees its thread once its lock
lapses. ``MemoryThreads`` keeps an ephemeral thread's turns on the thread
object itself: the schema says those are never materialized.

The ORM calls run on the row writers' threads (``identity.actions``), never
on asgiref's one thread-sensitive thread. A turn's two writes, at its start
and at its end, are batched with other turns' (``realtime.turn_writes``).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from datetime import datetime
from typing import Any

from django.db import transaction
from django.db.models import F
from django.db.models.functions import Now

from identity.actions import database_read_to_async, database_sync_to_async
from identity.models import Principal
from realtime.models import StoredItem, StoredThread, StoredTurn

from . import turn_writes
from .threads import IN_PROGRESS, ItemRecord, Thread, Turn
from .turn_writes import (
    BeginTurn,
    Begun,
    CreateThread,
    FinishTurn,
    lock_until,
    mark_interrupted,
    with_lock_state,
)


def _seconds(moment: datetime) -> float:
    return moment.timestamp()


def _thread_from_row(row: StoredThread) -> Thread:
    return Thread(
        id=row.thread_id,
        model=row.model,
        model_provider=row.model_provider,
        cwd=row.cwd,
        originator=row.originator,
        principal_id=row.principal_id,
        base_instructions=row.base_instructions,
        sandbox_mode=row.sandbox_mode,
        network_access=row.network_access,
        approval_policy=row.approval_policy,
        created_at=_seconds(row.created_at),
        updated_at=_seconds(row.updated_at),
        preview=row.preview,
        read_revision=row.read_revision,
    )


def _turn_from_row(row: StoredTurn, items: list[StoredItem]) -> Turn:
    return Turn(
        row.turn_id,
        originator=row.originator,
        client_name=row.client_name,
        connection_id=str(row.connection_id),
        status=row.status,
        items=[ItemRecord(item.item, item.started_at_ms, item.completed_at_ms) for item in items],
        started_at_ms=row.started_at_ms,
        completed_at_ms=row.completed_at_ms,
        error=row.error,
        usage=row.usage(),
        sequence=row.sequence,
    )


def _running(row: StoredThread) -> bool:
    return bool(row.lock_held)


def _with_items(rows) -> list[Turn]:
    """The turns of a query of stored turns, in its order, each with its items
    (one query for all of them)."""
    turns = list(rows.defer("model_input"))
    items: dict[int, list[StoredItem]] = {row.pk: [] for row in turns}
    for item in StoredItem.objects.filter(turn__in=turns).order_by("turn_id", "position"):
        items[item.turn_id].append(item)
    return [_turn_from_row(row, items[row.pk]) for row in turns]


class DatabaseThreads:
    """Every non-ephemeral thread, in the database."""

    @staticmethod
    def create(thread: Thread) -> Awaitable[None]:
        return turn_writes.submit(CreateThread(thread))

    @staticmethod
    @database_read_to_async
    def load(thread_id: str, principal_id: int) -> tuple[Thread, bool] | None:
        """The thread, if it is ``principal_id``'s, and whether a turn runs on
        it anywhere. Another principal's thread is not found, by the same
        query that finds none."""
        row = with_lock_state(StoredThread.objects.filter(thread_id=thread_id, principal_id=principal_id)).first()
        return None if row is None else (_thread_from_row(row), _running(row))

    @staticmethod
    @database_read_to_async
    def page(
        principal_id: int, originators: list[str] | None, ascending: bool, offset: int, limit: int
    ) -> tuple[list[tuple[Thread, bool]], bool]:
        """One page of the principal's threads, most recently updated first; and whether more follow."""
        rows = with_lock_state(StoredThread.objects.filter(principal_id=principal_id))
        if originators:
            rows = rows.filter(originator__in=originators)
        order = ("updated_at", "id") if ascending else ("-updated_at", "-id")
        found = list(rows.order_by(*order)[offset : offset + limit + 1])
        return [(_thread_from_row(row), _running(row)) for row in found[:limit]], len(found) > limit

    @staticmethod
    @database_read_to_async
    def turns(thread: Thread, newest: int) -> list[Turn]:
        """The thread's ``newest`` turns, oldest first, with their items."""
        rows = StoredTurn.objects.filter(thread__thread_id=thread.id).order_by("-sequence")[:newest]
        return _with_items(rows)[::-1]

    @staticmethod
    @database_read_to_async
    def turn_page(thread: Thread, ascending: bool, after: int | None, limit: int, with_items: bool) -> tuple[list[Turn], bool]:
        """One page of the thread's turns in their order, after the one numbered
        ``after`` (the previous page's last), and whether more follow: the
        database pages by the turns' sequence, so a page costs the same at
        any depth and a turn started meanwhile never shifts it."""
        rows = StoredTurn.objects.filter(thread__thread_id=thread.id).order_by("sequence" if ascending else "-sequence")
        if after is not None:
            rows = rows.filter(sequence__gt=after) if ascending else rows.filter(sequence__lt=after)
        if with_items:
            found = _with_items(rows[: limit + 1])
        else:
            found = [_turn_from_row(row, []) for row in rows.defer("model_input")[: limit + 1]]
        return found[:limit], len(found) > limit

    @staticmethod
    @database_read_to_async
    def item_page(
        thread: Thread, turn_id: str | None, ascending: bool, offset: int, limit: int
    ) -> tuple[list[tuple[str, ItemRecord]], bool]:
        """One page of the thread's items, (turn id, item), in the turns' order
        and each turn's; only ``turn_id``'s if given; and whether more follow."""
        rows = StoredItem.objects.filter(turn__thread__thread_id=thread.id)
        if turn_id is not None:
            rows = rows.filter(turn__turn_id=turn_id)
        order = ("turn__sequence", "position") if ascending else ("-turn__sequence", "-position")
        found = list(
            rows.order_by(*order).values_list("turn__turn_id", "item", "started_at_ms", "completed_at_ms")[
                offset : offset + limit + 1
            ]
        )
        page = [(turn, ItemRecord(item, started, completed)) for turn, item, started, completed in found[:limit]]
        return page, len(found) > limit

    @staticmethod
    def begin_turn(
        thread: Thread,
        turn: Turn,
        channel: str | None,
        lock_seconds: float,
        max_history_bytes: int,
        model: str | None,
        sandbox: tuple[str, bool] | None = None,
        approvals: Any = None,
        cached_sequence: int | None = None,
    ) -> Awaitable[Begun | None]:
        """Take the thread's turn lock and store the turn with its user message;
        ``model``, ``sandbox`` and ``approvals`` (the request's overrides)
        stick for later turns.

        Gives the history to replay before it (None if no turn began since
        the one numbered ``cached_sequence``, whose history the caller has), the
        thread's model and policy as stored (another process may have changed
        them) with the overrides applied, the turn's row key and the turn
        whose lapsed lock it took over with its process's channel, or None
        when another turn holds the lock. A lock that lapsed (its process
        died, or stopped) is taken over, and the turn it held is marked
        interrupted.
        """
        return turn_writes.submit(
            BeginTurn(thread, turn, channel, lock_seconds, max_history_bytes, model, sandbox, approvals, cached_sequence)
        )

    @staticmethod
    @database_read_to_async
    def turn(turn_id: str) -> Turn | None:
        """One stored turn, with its items."""
        found = _with_items(StoredTurn.objects.filter(turn_id=turn_id))
        return found[0] if found else None

    @staticmethod
    @database_sync_to_async
    def keep_lock(thread: Thread, turn: Turn, lock_seconds: float) -> float | None:
        """Extend a running turn's lock: when it was asked for (``time.monotonic()``,
        taken here, after any wait for a row writer: the new expiry is at least
        that plus ``lock_seconds``), or None if the lock was lost."""
        asked_at = time.monotonic()
        extended = StoredThread.objects.filter(thread_id=thread.id, running_turn_id=turn.id).update(
            lock_expires_at=lock_until(lock_seconds)
        )
        return asked_at if extended else None

    @staticmethod
    def finish_turn(thread: Thread, turn: Turn, first_new_item: int) -> Awaitable[dict[str, int]]:
        """Store how the turn ended and free the thread; gives the thread's
        usage summed over its turns."""
        return turn_writes.submit(FinishTurn(thread, turn, first_new_item))

    @staticmethod
    @database_read_to_async
    def running_turn(thread: Thread) -> tuple[str, str | None] | None:
        """(turn id, channel of its process) of the turn running on the thread, if any."""
        row = with_lock_state(StoredThread.objects.filter(thread_id=thread.id)).first()
        if row is None or not _running(row):
            return None
        return row.running_turn_id, row.running_channel

    @staticmethod
    @database_read_to_async
    def usage_and_budget(principal_id: int) -> tuple[int, int | None]:
        """Tokens the principal's turns used (stored and ephemeral), and its budget, as now stored."""
        found = Principal.objects.filter(pk=principal_id).values_list("tokens_used", "token_budget").first()
        return found or (0, None)

    @staticmethod
    @database_sync_to_async
    def set_model(thread: Thread, model: str) -> None:
        StoredThread.objects.filter(thread_id=thread.id).update(model=model)

    @staticmethod
    @database_sync_to_async
    def next_read_revision(thread: Thread) -> int:
        with transaction.atomic():
            StoredThread.objects.filter(thread_id=thread.id).update(read_revision=F("read_revision") + 1)
            return StoredThread.objects.values_list("read_revision", flat=True).get(thread_id=thread.id)


@database_sync_to_async
def end_abandoned_turns() -> list[tuple[Thread, Turn]]:
    """Turns left running by a process that died: their lock lapsed. Each is
    marked interrupted and its thread freed; returns those it marked, as now
    stored (read in the same transaction: they can be announced at once)."""
    with transaction.atomic():
        # Thread rows locked first, in primary-key order, as a batch of turn
        # writes locks them (realtime.turn_writes): the two never deadlock.
        lapsed = list(
            StoredThread.objects.select_for_update()
            .filter(running_turn_id__isnull=False, lock_expires_at__lt=Now())
            .order_by("pk")
        )
        if not lapsed:
            return []
        running = StoredTurn.objects.filter(turn_id__in=[row.running_turn_id for row in lapsed], status=IN_PROGRESS)
        marked = set(running.values_list("turn_id", flat=True))  # a turn whose end was stored is not announced again
        mark_interrupted(list(marked))
        StoredThread.objects.filter(pk__in=[row.pk for row in lapsed]).update(
            running_turn_id=None, running_channel=None, lock_expires_at=None
        )
        turns = _with_items(StoredTurn.objects.filter(turn_id__in=marked))
    threads = {row.running_turn_id: _thread_from_row(row) for row in lapsed}  # as read before they were freed
    return [(threads[turn.id], turn) for turn in turns]


class MemoryThreads:
    """Ephemeral threads: their turns live on the thread object, and go with it."""

    @staticmethod
    async def create(thread: Thread) -> None:
        pass

    @staticmethod
    async def turns(thread: Thread, newest: int) -> list[Turn]:
        return thread.turns[-newest:]

    @staticmethod
    async def turn_page(thread: Thread, ascending: bool, after: int | None, limit: int, with_items: bool) -> tuple[list[Turn], bool]:
        """As the database's, numbering the turns by their place in the thread."""
        ordered = thread.turns if ascending else thread.turns[::-1]
        if after is not None:
            ordered = [turn for turn in ordered if (turn.sequence > after if ascending else turn.sequence < after)]
        return ordered[:limit], len(ordered) > limit

    @staticmethod
    async def item_page(
        thread: Thread, turn_id: str | None, ascending: bool, offset: int, limit: int
    ) -> tuple[list[tuple[str, ItemRecord]], bool]:
        entries = [(turn.id, record) for turn in thread.turns if turn_id in (None, turn.id) for record in turn.items]
        if not ascending:
            entries.reverse()
        return entries[offset : offset + limit], offset + limit < len(entries)

    @staticmethod
    async def begin_turn(
        thread: Thread,
        turn: Turn,
        channel: str | None,
        lock_seconds: float,
        max_history_bytes: int,
        model: str | None,
        sandbox: tuple[str, bool] | None = None,
        approvals: Any = None,
        cached_sequence: int | None = None,  # (its history is its own: always current)
    ) -> Begun | None:
        if thread.active_turn is not None:
            return None
        # Claimed here, before the caller's next await: two turn/starts sent
        # back to back both passed the check and both ran (issue 24, 5).
        thread.active_turn = turn
        history = thread.history(max_history_bytes)
        thread.turn_sequence += 1  # a counter: trimming may leave no turn to count from
        turn.sequence = thread.turn_sequence
        thread.turns.append(turn)
        mode, network = sandbox or (thread.sandbox_mode, thread.network_access)
        return history, model or thread.model, None, None, (mode, network, thread.approval_policy if approvals is None else approvals)

    @staticmethod
    async def keep_lock(thread: Thread, turn: Turn, lock_seconds: float) -> float | None:
        return time.monotonic()

    @staticmethod
    async def finish_turn(thread: Thread, turn: Turn, first_new_item: int) -> dict[str, int]:
        if turn.usage is not None:
            thread.add_usage(turn.usage)
            # Never stored, but its tokens count toward the principal's budget.
            await database_sync_to_async(turn_writes.add_principal_usage)({thread.principal_id: turn.usage.get("totalTokens", 0)})
        return dict(thread.total_usage)

    @staticmethod
    async def running_turn(thread: Thread) -> tuple[str, str | None] | None:
        return None  # an ephemeral thread lives on one process: its turn is local

    @staticmethod
    async def set_model(thread: Thread, model: str) -> None:
        pass

    @staticmethod
    async def next_read_revision(thread: Thread) -> int:
        thread.read_revision += 1
        return thread.read_revision


def store_for(thread: Thread) -> type[DatabaseThreads] | type[MemoryThreads]:
    return MemoryThreads if thread.ephemeral else DatabaseThreads

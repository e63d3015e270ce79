"""A turn's two writes, its start and its end, made in batches (group commit).

Every turn writes twice on the critical path: at ``turn/start`` (take the
thread's lock, store the turn and its user message, read the history to
replay) and before ``turn/completed`` (store how it ended, free the lock,
sum the thread's usage). One at a time, fifty turns starting together queued
fifty transactions of seven ORM statements each on the row writers; in a
batch they cost about five statements and one commit together
(``codexserver.group_commit``).

In a batch, the thread rows are locked first, in primary-key order (other
processes' batches take them in the same order, so batches never deadlock),
then the ends are applied before the starts: a ``turn/start`` that follows
its thread's ``turn/completed`` finds the thread free. A batch that fails is
retried one write at a time, so a bad write fails alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.db import connection, transaction
from django.db.models import BooleanField, DateTimeField, ExpressionWrapper, F, Q, Sum, Value, Window
from django.db.models.functions import Now

from codexserver.group_commit import GroupCommit
from codexserver.loop_local import LoopLocal
from identity.actions import database_sync_to_async

from .models import USAGE_FIELDS, StoredItem, StoredThread, StoredTurn
from .threads import IN_PROGRESS, INTERRUPTED, ItemRecord, Thread, Turn, newest_within, now_ms

# What a turn's end writes to its row.
END_FIELDS = ["status", "error", "completed_at_ms", "model_input", "input_bytes", "has_usage", *USAGE_FIELDS.values()]


@dataclass(eq=False)
class BeginTurn:
    thread: Thread
    turn: Turn
    channel: str | None
    lock_seconds: float
    max_history_bytes: int
    model: str | None  # the request's override; it sticks for later turns


@dataclass(eq=False)
class FinishTurn:
    thread: Thread
    turn: Turn
    first_new_item: int  # items before it were stored at the start


def with_lock_state(rows):
    """Rows annotated ``lock_held``: a turn runs and its lock has not lapsed."""
    held = ExpressionWrapper(Q(running_turn_id__isnull=False, lock_expires_at__gte=Now()), output_field=BooleanField())
    return rows.annotate(lock_held=held)


def lock_until(seconds: float) -> ExpressionWrapper:
    """``now() + seconds`` on the database's clock (hosts' clocks may disagree)."""
    return ExpressionWrapper(Now() + Value(timedelta(seconds=seconds)), output_field=DateTimeField())


def mark_interrupted(turn_ids: list[str]) -> int:
    """Turns whose process died mid-turn (their lock lapsed) end interrupted."""
    return StoredTurn.objects.filter(turn_id__in=turn_ids, status=IN_PROGRESS).update(
        status=INTERRUPTED, completed_at_ms=now_ms()
    )


def _item_rows(turn_pk: int, records: list[ItemRecord], first_position: int) -> list[StoredItem]:
    return [
        StoredItem(
            turn_id=turn_pk,
            position=first_position + offset,
            item_type=str(record.item.get("type", "")),
            item=record.item,
            started_at_ms=record.started_at_ms,
            completed_at_ms=record.completed_at_ms,
        )
        for offset, record in enumerate(records)
    ]


def update_each(model, fields: list[str], rows: list[tuple[int, list[Any]]]) -> None:
    """``UPDATE … WHERE pk = %s`` of (pk, values) rows, as one executemany.
    (Django's bulk_update builds a CASE per field per row: at fifty rows that
    cost more than the writes.)"""
    if not rows:
        return
    opts, quote = model._meta, connection.ops.quote_name
    columns = [opts.get_field(name) for name in fields]
    assignments = ", ".join(f"{quote(column.column)} = %s" for column in columns)
    sql = f"UPDATE {quote(opts.db_table)} SET {assignments} WHERE {quote(opts.pk.column)} = %s"
    params = [
        [column.get_db_prep_save(value, connection) for column, value in zip(columns, values, strict=True)] + [pk]
        for pk, values in rows
    ]
    with connection.cursor() as cursor:
        cursor.executemany(sql, params)


@database_sync_to_async
def write_turns(writes: list[BeginTurn | FinishTurn]) -> list[Any]:
    """Each write's outcome (see ``begin`` and ``finish``), or its exception."""
    try:
        return _write(writes)
    except Exception as exc:
        if len(writes) == 1:
            return [exc]
    outcomes: list[Any] = []
    for write in writes:
        try:
            outcomes.extend(_write([write]))
        except Exception as exc:
            outcomes.append(exc)
    return outcomes


def _write(writes: list[BeginTurn | FinishTurn]) -> list[Any]:
    ends = [write for write in writes if isinstance(write, FinishTurn)]
    starts = [write for write in writes if isinstance(write, BeginTurn)]
    with transaction.atomic():
        rows = _lock_threads({write.thread.id for write in writes})
        outcomes = dict(zip(map(id, ends), finish(ends, rows))) if ends else {}
        if starts:
            outcomes.update(zip(map(id, starts), begin(starts, rows)))
    return [outcomes[id(write)] for write in writes]


def _lock_threads(thread_ids: set[str]) -> dict[str, StoredThread]:
    rows = with_lock_state(StoredThread.objects.filter(thread_id__in=thread_ids)).order_by("pk").select_for_update()
    return {row.thread_id: row for row in rows}


def finish(ends: list[FinishTurn], rows: dict[str, StoredThread]) -> list[dict[str, int]]:
    """Store each turn's end and free its thread; each thread's usage summed
    over its turns."""
    turn_pks = dict(StoredTurn.objects.filter(turn_id__in=[end.turn.id for end in ends]).values_list("turn_id", "pk"))
    turn_rows, item_rows, freed = [], [], []
    for end in ends:
        turn, pk = end.turn, turn_pks[end.turn.id]
        usage = turn.usage or {}
        ended = [turn.status, turn.error, turn.completed_at_ms, turn.model_input, turn.input_bytes, turn.usage is not None]
        turn_rows.append((pk, ended + [usage.get(name, 0) for name in USAGE_FIELDS]))
        item_rows += _item_rows(pk, turn.items[end.first_new_item :], end.first_new_item)
        row = rows[end.thread.id]
        if row.running_turn_id == turn.id:
            row.running_turn_id, row.lock_held = None, False
            freed.append(row.pk)
    update_each(StoredTurn, END_FIELDS, turn_rows)
    StoredItem.objects.bulk_create(item_rows)
    touched = {rows[end.thread.id].pk for end in ends}
    StoredThread.objects.filter(pk__in=freed).update(
        running_turn_id=None, running_channel=None, lock_expires_at=None, updated_at=Now()
    )
    if touched - set(freed):  # turns that lost their lock still touch their thread
        StoredThread.objects.filter(pk__in=touched - set(freed)).update(updated_at=Now())
    totals = {
        summed.pop("thread_id"): summed
        for summed in StoredTurn.objects.filter(thread_id__in=touched, has_usage=True)
        .values("thread_id")
        .annotate(**{name: Sum(column) for name, column in USAGE_FIELDS.items()})
    }
    return [
        {name: totals.get(rows[end.thread.id].pk, {}).get(name) or 0 for name in USAGE_FIELDS} for end in ends
    ]


def begin(starts: list[BeginTurn], rows: dict[str, StoredThread]) -> list[tuple[list[dict[str, Any]], str] | None]:
    """Take each thread's lock and store its turn: (history to replay, the
    thread's model), or None where another turn holds the lock."""
    taken: list[tuple[BeginTurn, StoredThread]] = []
    lapsed_turns: list[str] = []
    for start in starts:
        row = rows.get(start.thread.id)
        if row is None or row.lock_held:
            continue
        if row.running_turn_id:
            lapsed_turns.append(row.running_turn_id)
        row.running_turn_id, row.lock_held = start.turn.id, True
        row.model = start.model or row.model
        row.preview = row.preview or start.thread.preview
        taken.append((start, row))
    if not taken:
        return [None] * len(starts)
    # What every lock of the batch shares, on the database's clock; then each
    # thread's own turn, model and preview.
    for (channel, seconds), group in _grouped(taken, lambda start: (start.channel, start.lock_seconds)).items():
        StoredThread.objects.filter(pk__in=[row.pk for row in group]).update(
            running_channel=channel, lock_expires_at=lock_until(seconds), updated_at=Now()
        )
    update_each(
        StoredThread,
        ["running_turn_id", "model", "preview"],
        [(row.pk, [row.running_turn_id, row.model, row.preview]) for _, row in taken],
    )
    if lapsed_turns:
        mark_interrupted(lapsed_turns)
    turn_rows = StoredTurn.objects.bulk_create(
        [
            StoredTurn(
                turn_id=start.turn.id,
                thread_id=row.pk,
                originator=start.turn.originator,
                connection_id=start.turn.connection_id,
                status=start.turn.status,
                started_at_ms=start.turn.started_at_ms,
            )
            for start, row in taken
        ]
    )
    StoredItem.objects.bulk_create(
        [item for (start, _), turn_row in zip(taken, turn_rows) for item in _item_rows(turn_row.pk, start.turn.items, 0)]
    )
    histories = _histories(taken, {turn_row.pk for turn_row in turn_rows})
    begun = {id(start): (histories[row.pk], row.model) for start, row in taken}
    return [begun.get(id(start)) for start in starts]


def _histories(taken: list[tuple[BeginTurn, StoredThread]], new_turns: set[int]) -> dict[int, list[dict[str, Any]]]:
    """Each thread's model input of its earlier turns, newest kept first
    within its bound; one query for every thread of the batch, bounded in
    the database by a running total."""
    most = max(start.max_history_bytes for start, _ in taken)
    newest_first = [F("started_at_ms").desc(), F("id").desc()]
    earlier = (
        StoredTurn.objects.filter(thread_id__in=[row.pk for _, row in taken], input_bytes__gt=0)
        .exclude(pk__in=new_turns)
        .annotate(bytes_so_far=Window(Sum("input_bytes"), partition_by=[F("thread_id")], order_by=newest_first))
        .filter(bytes_so_far__lte=most)
        .order_by("thread_id", *newest_first)
        .values_list("thread_id", "model_input", "input_bytes")
    )
    by_thread: dict[int, list[tuple[list[dict[str, Any]], int]]] = {row.pk: [] for _, row in taken}
    for thread_pk, model_input, size in earlier:
        by_thread[thread_pk].append((model_input, size))
    return {row.pk: newest_within(by_thread[row.pk], start.max_history_bytes) for start, row in taken}


def _grouped(taken: list[tuple[BeginTurn, StoredThread]], key) -> dict[Any, list[StoredThread]]:
    groups: dict[Any, list[StoredThread]] = {}
    for start, row in taken:
        groups.setdefault(key(start), []).append(row)
    return groups


_batches: LoopLocal[GroupCommit] = LoopLocal(lambda: GroupCommit(write_turns, name="turn writes"))


async def submit(write: BeginTurn | FinishTurn) -> Any:
    """The write's outcome once its batch is committed."""
    return await _batches.get().submit(write)

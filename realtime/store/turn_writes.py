"""A turn's two writes, its start and its end, made in batches (group commit).

Every turn writes twice on the critical path: at ``turn/start`` (take the
thread's lock, store the turn and its user message, read the history to
replay) and before ``turn/completed`` (store how it ended, free the lock,
sum the thread's usage). One at a time, fifty turns starting together queued
fifty transactions of seven ORM statements each on the row writers; in a
batch they cost about five statements and one commit together
(``codexserver.group_commit``), and on PostgreSQL two round trips: the
statements go out as one pipeline. The event loop writes the batches itself,
on a connection of its own (``loop_writers``); a row writer's thread runs
the same statements where it cannot (``write_turns``).

In a batch, the thread rows are locked first, in primary-key order (other
processes' batches take them in the same order, so batches never deadlock),
then the ends are applied before the starts: a ``turn/start`` that follows
its thread's ``turn/completed`` finds the thread free. A batch that fails is
retried one write at a time, so a bad write fails alone. A new thread's row
(``thread/start``) joins the batches too, written before the rest.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from functools import cache, lru_cache
from typing import Any, TypeVar

from django.db import (
    DEFAULT_DB_ALIAS,
    DataError,
    IntegrityError,
    close_old_connections,
    connection,
    connections,
    transaction,
)
from django.db.models import BooleanField, DateTimeField, ExpressionWrapper, JSONField, Q, UUIDField, Value
from django.db.models.functions import Now
from django.db.models.sql import Query

from codexserver.group_commit import GroupCommit
from codexserver.loop_local import LoopLocal
from identity.actions import row_writers
from identity.models import Principal
from realtime.models import USAGE_FIELDS, StoredItem, StoredThread, StoredTurn

from .threads import IN_PROGRESS, INTERRUPTED, History, ItemRecord, Thread, Turn, now_ms

# Columns given JSON already encoded, as text (``_json_text``).
JSON_TEXT_COLUMNS = {"model_input"}
# What a turn's end writes to its row.
END_FIELDS = ["status", "error", "completed_at_ms", "model_input", "input_bytes", "has_usage", *USAGE_FIELDS.values()]


# A thread's sandbox mode, network access and approval policy (PROTOCOL §11).
ThreadPolicy = tuple[str, bool, Any]
POLICY_COLUMNS = ("sandbox_mode", "network_access", "approval_policy")
# What a turn's start gives back: the history to replay (None: the one the
# start said it had cached is current), the thread's model,
# the turn's row key, the turn whose lapsed lock it took and that turn's
# process's channel, and the thread's policy.
Begun = tuple[History | None, str, int | None, tuple[str, str | None] | None, ThreadPolicy]


@dataclass(eq=False)
class BeginTurn:
    thread: Thread
    turn: Turn
    channel: str | None
    lock_seconds: float
    max_history_bytes: int
    model: str | None  # the request's override; it sticks for later turns
    # turn/start's sandboxPolicy as (mode, network access) and approvalPolicy:
    # overrides of the stored ones, which stick too (None: keep the stored).
    sandbox: tuple[str, bool] | None = None
    approvals: Any = None
    # The number of the thread's newest turn whose history this process
    # keeps (``history_cache``): if no turn began since, none is read.
    cached_sequence: int | None = None


@dataclass(eq=False)
class CreateThread:
    """A new thread's row (``thread/start``: two thousand at once must not
    queue two thousand transactions either)."""

    thread: Thread


@dataclass(eq=False)
class FinishTurn:
    thread: Thread
    turn: Turn
    first_new_item: int  # items before it were stored at the start


def with_lock_state(rows):
    """Rows annotated ``lock_held``: a turn runs and its lock has not lapsed."""
    unexpired = Q(lock_expires_at__isnull=True) | Q(lock_expires_at__gte=Now())  # as the batches decide it
    held = ExpressionWrapper(Q(running_turn_id__isnull=False) & unexpired, output_field=BooleanField())
    return rows.annotate(lock_held=held)


def lock_until(seconds: float) -> ExpressionWrapper:
    """``now() + seconds`` on the database's clock (hosts' clocks may disagree)."""
    return ExpressionWrapper(Now() + Value(timedelta(seconds=seconds)), output_field=DateTimeField())


def mark_interrupted(turn_ids: list[str]) -> None:
    """Turns whose process died mid-turn (their lock lapsed) end interrupted."""
    run_here(_mark_interrupted(turn_ids))


def _mark_interrupted(turn_ids: list[str]) -> Plan[None]:
    """None at all is no statement: PostgreSQL refuses an empty ``IN ()``."""
    if not turn_ids:
        return
    # Never before it started: the host that started it may have a clock ahead of this one's.
    now = now_ms()
    yield from _run(
        f"UPDATE {TURNS} SET status = %s, "
        f"completed_at_ms = CASE WHEN started_at_ms > %s THEN started_at_ms ELSE %s END "
        f"WHERE status = %s AND turn_id IN ({_marks(len(turn_ids))})",
        [INTERRUPTED, now, now, IN_PROGRESS, *turn_ids],
    )


Write = CreateThread | BeginTurn | FinishTurn
BATCH_ORDER = (CreateThread, FinishTurn, BeginTurn)

# Table names; the columns are the models' (realtime/migrations/0001).
THREADS, TURNS, ITEMS = (model._meta.db_table for model in (StoredThread, StoredTurn, StoredItem))
PRINCIPALS = Principal._meta.db_table
TURN_COLUMNS = [
    "turn_id",
    "thread_id",
    "principal_id",
    "originator",
    "client_name",
    "connection_id",
    "status",
    "sequence",
    "error",
    "started_at_ms",
    "completed_at_ms",
    "model_input",
    "input_bytes",
    "has_usage",
    *USAGE_FIELDS.values(),
]
ITEM_COLUMNS = ["turn_id", "position", "item_type", "item", "started_at_ms", "completed_at_ms"]
THREAD_COLUMNS = [
    "thread_id", "principal_id", "model", "model_provider", "cwd", "originator", "base_instructions", "preview",
    "created_at", "updated_at", "read_revision", "sandbox_mode", "network_access", "approval_policy", "turn_sequence",
]  # fmt: skip
# At most this many writes in one batch: a statement names each write's
# thread or turn at most once, within SQLite's oldest parameter limit (999).
MAX_BATCH = 400
# What one write can get wrong on its own (a row it names is not stored, a
# value the database refuses): the rest of its batch is written without it.
ONE_WRITES_FAULT = (IntegrityError, DataError, LookupError, ValueError, TypeError, OverflowError)


class NotStored(LookupError):
    """The write names a thread or turn that is not in the database."""


class TurnLost(Exception):
    """The turn's end was not written: it had lost its thread's lock, and
    whoever took the lock (another process's turn, or the sweep) already
    stored it interrupted and told its subscribers. That is its one story."""


class WrittenButUnread(Exception):
    """The batch committed, then what it returned could not be read. Not one
    write's fault: written again one at a time, its writes would be refused
    (their rows exist) or find their own locks held."""


@dataclass(eq=False)
class _ThreadRow:
    pk: int
    model: str
    preview: str
    running_turn_id: str | None
    running_channel: str | None  # of the process running it: a takeover interrupts it there
    held: bool  # a turn runs and its lock has not lapsed
    sequence: int  # of its newest turn (``StoredThread.turn_sequence``)
    policy: ThreadPolicy  # as stored: another process's turn/start may have changed it


def _marks(count: int) -> str:
    return ", ".join(["%s"] * count)


def _prepared(model, columns: list[str], values: list[Any]) -> list[Any]:
    """Values as the model's fields store them. Only JSON, UUID and datetime
    columns need the field's conversion (it differs per vendor); numbers, strings and
    booleans go as they are, which saves the field's per-value lookups of the
    connection, most of a batch's time."""
    converters = _converters(model, tuple(columns))
    db = connections[DEFAULT_DB_ALIAS]
    return [
        value if convert is None or value is None else convert(value, db)
        for convert, value in zip(converters, values, strict=True)
    ]


@cache
def _converters(model, columns: tuple[str, ...]) -> list[Any]:
    fields = {field.column: field for field in model._meta.concrete_fields}
    return [
        _json_text
        if column in JSON_TEXT_COLUMNS
        else fields[column].get_db_prep_save
        if isinstance(fields[column], (JSONField, UUIDField, DateTimeField))
        else None
        for column in columns
    ]


def _json_text(text: str, db) -> Any:
    """JSON the turn already encoded (``Turn.model_input``), stored as it is:
    SQLite keeps JSON as text, and on PostgreSQL this text is the jsonb's
    encoding (Django's field would encode a str again, as a JSON string)."""
    if db.vendor != "postgresql":
        return text
    from psycopg.types.json import Jsonb  # PostgreSQL's driver: not loaded where SQLite serves

    return Jsonb(text, dumps=_as_is)


def _as_is(text: str) -> str:
    return text


def _sql_of(expression) -> tuple[str, tuple[Any, ...]]:
    """An ORM expression as this database writes it (its clock, its interval
    arithmetic), to put into the statements below."""
    query = Query(StoredThread)
    sql, params = query.get_compiler(connection=connection).compile(expression.resolve_expression(query))
    return sql, tuple(params)


# Compiled once a process, not once a batch: compiling an expression took
# an eighth of a one-write batch's time on the event loop (cProfile), and
# what it gives depends only on the database (one a process) and the lease.
@cache
def _now_sql() -> tuple[str, tuple[Any, ...]]:
    return _sql_of(Now())


@lru_cache(maxsize=16)  # (a lease is a setting: a test changes it, rarely)
def _lock_until_sql(seconds: float) -> tuple[str, tuple[Any, ...]]:
    return _sql_of(lock_until(seconds))


@cache
def _locks_for_update() -> str:
    return " FOR UPDATE" if connection.features.has_select_for_update else ""


@cache
def _insert_returns_rows() -> bool:
    return connection.features.can_return_rows_from_bulk_insert


@cache
def _max_query_params() -> int:
    return connection.features.max_query_params or 65535


@contextmanager
def _one_transaction() -> Iterator[None]:
    """The batch's transaction. On PostgreSQL its statements go out as
    psycopg's pipeline, between an explicit BEGIN and COMMIT: the batch waits
    for the database twice, to read the thread rows it locks and at the end
    for everything else with the commit (a third time only for a turn end
    whose start's row key never came back), not once per statement (nine
    round trips a batch before). Each wait also hands the GIL back and forth
    with the event loop, which on a busy loop costs more than the round trip.
    Read what the statements return after this block (``_rows_later``)."""
    connection.ensure_connection()
    if not _can_pipeline():
        with transaction.atomic():
            yield
        return
    raw = connection.connection
    with connection.wrap_database_errors:  # an error raised by the pipeline's end, as Django's
        try:
            with raw.pipeline():
                run_here(_run("BEGIN", []))
                yield
                run_here(_run("COMMIT", []))
        except BaseException:
            raw.rollback()  # the failed or abandoned transaction; nothing if none is open
            raise


def _can_pipeline() -> bool:
    """PostgreSQL, in autocommit (a plain BEGIN inside a caller's transaction
    would commit it), with no transaction settings that psycopg's own BEGIN
    would carry and a plain one would drop."""
    if connection.vendor != "postgresql" or not pipelines_supported():
        return False
    raw = connection.connection
    return (
        connection.get_autocommit()
        and not connection.in_atomic_block
        and raw.isolation_level is None
        and raw.read_only is None
        and raw.deferrable is None
    )


@cache
def pipelines_supported() -> bool:
    import psycopg  # PostgreSQL's driver: not loaded where SQLite serves

    return psycopg.Pipeline.is_supported()  # libpq 14 and newer


# A batch's statements, as a plan: a generator that yields each statement and
# is sent back what it asked to read. One plan runs on Django's connection in
# a row writer's thread (``run_here``; the sweep's statements too) or on the
# event loop's own connection (``loop_writers``).
T = TypeVar("T")
Plan = Generator["Statement", Any, T]
NOW, LATER = "now", "later"


@dataclass(frozen=True, slots=True)
class Statement:
    """One statement of a plan. ``read``: None (nothing is read back), NOW
    (its rows, before the plan goes on: inside a pipeline, a round trip) or
    LATER (a callable that gives its rows once the batch has committed)."""

    sql: str
    params: list[Any]  # with ``many``, one list of parameters per execution
    many: bool = False
    read: str | None = None


def _run(sql: str, params: list[Any]) -> Plan[None]:
    """A statement without rows."""
    yield Statement(sql, params)


def _rows(sql: str, params: list[Any]) -> Plan[list[tuple]]:
    """The statement's rows, read now."""
    return (yield Statement(sql, params, read=NOW))


def _rows_later(sql: str, params: list[Any]) -> Plan[Callable[[], list[tuple]]]:
    """The statement's rows, to read once the batch has sent what it can
    (inside a pipeline, reading them is a round trip: read them last)."""
    return (yield Statement(sql, params, read=LATER))


def update_each(table: str, columns: list[str], rows: list[tuple[int, list[Any]]]) -> Plan[None]:
    """``UPDATE … WHERE id = %s`` for each (pk, prepared values), as one executemany."""
    if rows:
        assignments = ", ".join(f"{column} = %s" for column in columns)
        yield Statement(f"UPDATE {table} SET {assignments} WHERE id = %s", [[*values, pk] for pk, values in rows], many=True)


def insert_each(table: str, columns: list[str], rows: list[list[Any]]) -> Plan[None]:
    """``INSERT`` of each row of prepared values, as one executemany."""
    if rows:
        yield Statement(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({_marks(len(columns))})", rows, many=True)


def run_here(plan: Plan[T]) -> T:
    """Runs the plan's statements on this thread's Django connection."""
    return run_plan(plan, _execute_here)


def run_plan(plan: Plan[T], execute: Callable[[Statement], Any]) -> T:
    """Runs the plan, each statement by ``execute``, which gives what it
    asked to read (its twin on the loop: ``loop_writers._run_on_session``)."""
    result = None
    try:
        while True:
            try:
                statement = plan.send(result)
            except StopIteration as done:
                return done.value
            result = execute(statement)
    finally:
        plan.close()


def _execute_here(statement: Statement) -> Any:
    # On PostgreSQL, inside the pipeline: a LATER statement's rows are read after it.
    return execute_on(connection.cursor(), statement, later_when_asked=connection.vendor == "postgresql")


def execute_on(cursor, statement: Statement, later_when_asked: bool = False) -> Any:
    """Runs the statement on ``cursor``, which it closes once read, and gives
    what the statement asked to read. A LATER statement's rows are read now
    (a statement's rows are not left waiting), or ``later_when_asked``."""
    try:
        (cursor.executemany if statement.many else cursor.execute)(statement.sql, statement.params)
    except BaseException:
        cursor.close()
        raise
    if statement.read is None:
        cursor.close()
        return None
    if statement.read == LATER and later_when_asked:
        return lambda: _fetched(cursor)
    rows = _fetched(cursor)
    return (lambda: rows) if statement.read == LATER else rows


def _fetched(cursor) -> list[tuple]:
    try:
        return cursor.fetchall()
    finally:
        cursor.close()


def _item_rows(turn_pk: int, records: list[ItemRecord], first_position: int) -> list[list[Any]]:
    return [
        _prepared(
            StoredItem,
            ITEM_COLUMNS,
            [
                turn_pk,
                first_position + offset,
                str(record.item.get("type", "")),
                record.item,
                record.started_at_ms,
                record.completed_at_ms,
            ],
        )
        for offset, record in enumerate(records)
    ]


def write_turns(writes: list[Write]) -> list[Any]:
    """Each write's outcome (see ``begin`` and ``finish``), or its exception.
    Runs on a row writer's thread, which it leaves as a request would: stale
    or broken connections are retired before and after. (The server's event
    loop writes its batches itself where it can: ``loop_writers``.)"""
    close_old_connections()
    try:
        return _write_each_alone_if_need_be(writes)
    finally:
        close_old_connections()


def _write_each_alone_if_need_be(writes: list[Write]) -> list[Any]:
    tries, tried = attempts(writes), None
    while True:  # its twins on the loop: loop_writers
        try:
            batch = tries.send(tried)
        except StopIteration as done:
            return done.value
        try:
            tried = _write(batch)
        except Exception as exc:
            tried = exc


def attempts(writes: list[Write]) -> Generator[list[Write], list[Any] | Exception, list[Any]]:
    """The batches to write: the writes together, and if one of them is at
    fault, each alone. Sent back each batch's outcomes or the exception it
    raised; returns each write's outcome."""
    tried = yield writes
    if not isinstance(tried, Exception):
        return tried
    if not isinstance(tried, ONE_WRITES_FAULT) or len(writes) == 1:
        # The database's fault (locked, down, connection lost): a write alone
        # would wait and fail the same way, once per write, while every turn
        # of the process waits behind it.
        return [tried] * len(writes)
    outcomes = {}
    for write in _in_batch_order(writes):
        alone = yield [write]
        outcomes[id(write)] = alone if isinstance(alone, Exception) else alone[0]
    return [outcomes[id(write)] for write in writes]


def _by_kind(writes: list[Write]) -> tuple[list[CreateThread], list[FinishTurn], list[BeginTurn]]:
    """In the order a batch applies them: new threads first, then ends, then
    starts (a start whose thread's end is in the same batch finds it free)."""
    creates, ends, starts = ([write for write in writes if isinstance(write, kind)] for kind in BATCH_ORDER)
    return creates, ends, starts


def _in_batch_order(writes: list[Write]) -> list[Write]:
    return [write for kind in _by_kind(writes) for write in kind]


def _write(writes: list[Write]) -> list[Any]:
    with _one_transaction():
        outcomes = run_here(batch_plan(writes))
    return read_back(writes, outcomes)


# Each kind of write's outcomes, to read once the batch has committed.
Outcomes = list[tuple[list[Write], Callable[[], list[Any]]]]


def batch_plan(writes: list[Write]) -> Plan[Outcomes]:
    """A batch's statements, between its BEGIN and COMMIT."""
    creates, ends, starts = _by_kind(writes)
    outcomes: Outcomes = []
    if creates:
        yield from _insert_threads([create.thread for create in creates])
        outcomes.append((creates, lambda: [None] * len(creates)))
    if ends or starts:
        now = _now_sql()
        rows = yield from _lock_threads({write.thread.id for write in (*ends, *starts)}, now)
        if ends:
            outcomes.append((ends, (yield from finish(ends, rows, now))))
        if starts:
            outcomes.append((starts, (yield from begin(starts, rows, now))))
    return outcomes


def read_back(writes: list[Write], outcomes: Outcomes) -> list[Any]:
    try:
        by_write = {id(write): outcome for kind, read in outcomes for write, outcome in zip(kind, read(), strict=True)}
        return [by_write[id(write)] for write in writes]
    except Exception as exc:
        raise WrittenButUnread(f"a batch of {len(writes)} writes was committed but not read back") from exc


def _insert_threads(threads: list[Thread]) -> Plan[None]:
    rows = []
    for thread in threads:
        created = datetime.fromtimestamp(thread.created_at, dt_timezone.utc)
        rows.append(
            _prepared(
                StoredThread,
                THREAD_COLUMNS,
                [thread.id, thread.principal_id, thread.model, thread.model_provider, thread.cwd, thread.originator,
                 thread.base_instructions, thread.preview, created, created, thread.read_revision,
                 thread.sandbox_mode, thread.network_access, thread.approval_policy, 0],
            )  # fmt: skip
        )
    yield from insert_each(THREADS, THREAD_COLUMNS, rows)


def _lock_threads(thread_ids: set[str], now: tuple[str, tuple[Any, ...]]) -> Plan[dict[str, _ThreadRow]]:
    """The batch's threads, locked in primary-key order until it commits."""
    now_sql, now_params = now
    ids = sorted(thread_ids)
    found = yield from _rows(
        f"SELECT id, thread_id, model, preview, running_turn_id, running_channel, "
        f"running_turn_id IS NOT NULL AND (lock_expires_at IS NULL OR lock_expires_at >= {now_sql}), "
        f"turn_sequence, sandbox_mode, network_access, approval_policy "
        f"FROM {THREADS} WHERE thread_id IN ({_marks(len(ids))}) ORDER BY id"
        + _locks_for_update(),
        [*now_params, *ids],
    )
    approvals = StoredThread._meta.get_field("approval_policy")
    return {
        thread_id: _ThreadRow(
            pk, model, preview, running, channel, bool(held), sequence,
            (mode, bool(network), approvals.from_db_value(approval, None, connection)),
        )  # fmt: skip
        for pk, thread_id, model, preview, running, channel, held, sequence, mode, network, approval in found
    }


def _usage_by_principal(ends: list[FinishTurn]) -> dict[int, int]:
    spent: dict[int, int] = {}
    for end in ends:
        if end.turn.usage:
            principal_id = end.thread.principal_id
            spent[principal_id] = spent.get(principal_id, 0) + end.turn.usage.get("totalTokens", 0)
    return spent


def add_principal_usage(spent: dict[int, int]) -> None:
    """Count turns' tokens toward their principals' budgets."""
    run_here(_add_principal_usage(spent))


def _add_principal_usage(spent: dict[int, int]) -> Plan[None]:
    """Their rows are updated after the threads' and in key order, as every
    batch does: two batches never wait on each other in a circle."""
    rows = [[tokens, principal_id] for principal_id, tokens in sorted(spent.items()) if tokens]
    if rows:
        yield Statement(f"UPDATE {PRINCIPALS} SET tokens_used = tokens_used + %s WHERE id = %s", rows, many=True)


def finish(
    ends: list[FinishTurn], rows: dict[str, _ThreadRow], now: tuple[str, tuple[Any, ...]]
) -> Plan[Callable[[], list[dict[str, int] | TurnLost]]]:
    """Store each turn's end and free its thread; each thread's usage summed
    over its turns, to read once committed.

    Fenced by the lock: a turn that no longer holds its thread's lock (a
    takeover or the sweep ended it interrupted, in a batch that locked the
    same row) is not written over: its outcome is ``TurnLost``. Its end that
    this very write stored before (a retry after its batch's reply was lost)
    is not written twice."""
    now_sql, now_params = now
    turn_pks = {end.turn.id: end.turn.row_id for end in ends if end.turn.row_id is not None}
    if unknown := [end.turn.id for end in ends if end.turn.row_id is None]:  # a client left mid-start
        turn_pks |= yield from _turn_pks(unknown)
    for end in ends:
        if turn_pks.get(end.turn.id) is None or end.thread.id not in rows:
            raise NotStored(f"turn {end.turn.id} of thread {end.thread.id} is not stored")
    settled, lost_usage = yield from _settled_elsewhere(
        [end for end in ends if rows[end.thread.id].running_turn_id != end.turn.id]
    )
    writing = [end for end in ends if id(end) not in settled]
    turn_rows, item_rows, freed = [], [], []
    for end in writing:
        turn, pk = end.turn, turn_pks[end.turn.id]
        usage = turn.usage or {}
        ended = [
            turn.status,
            turn.error,
            turn.completed_at_ms,
            turn.model_input,
            turn.input_bytes,
            turn.usage is not None,
        ]
        turn_rows.append((pk, _prepared(StoredTurn, END_FIELDS, ended + [usage.get(name, 0) for name in USAGE_FIELDS])))
        item_rows += _item_rows(pk, turn.items[end.first_new_item :], end.first_new_item)
        row = rows[end.thread.id]
        if row.running_turn_id == turn.id:
            row.running_turn_id, row.held = None, False
            freed.append(row.pk)
    yield from update_each(TURNS, END_FIELDS, turn_rows)
    yield from insert_each(ITEMS, ITEM_COLUMNS, item_rows)
    # A lost turn's tokens were spent upstream all the same: they count toward
    # its principal's budget, and are kept on its row, which also says they
    # were counted (an end tried again after its batch committed is not).
    usage_columns = ["has_usage", *USAGE_FIELDS.values()]
    yield from update_each(
        TURNS,
        usage_columns,
        [(turn_pks[end.turn.id], [True, *(end.turn.usage[name] for name in USAGE_FIELDS)]) for end in lost_usage],
    )
    yield from _add_principal_usage(_usage_by_principal([*writing, *lost_usage]))
    if freed:
        yield from _run(
            f"UPDATE {THREADS} SET running_turn_id = NULL, running_channel = NULL, lock_expires_at = NULL, "
            f"updated_at = {now_sql} WHERE id IN ({_marks(len(freed))})",
            [*now_params, *freed],
        )
    kept = sorted({rows[end.thread.id].pk for end in writing} - set(freed))  # ended in progress, never locked again
    if kept:
        yield from _run(f"UPDATE {THREADS} SET updated_at = {now_sql} WHERE id IN ({_marks(len(kept))})", [*now_params, *kept])
    told = sorted({rows[end.thread.id].pk for end in ends if settled.get(id(end)) is None})
    sums = ", ".join(f"SUM({column})" for column in USAGE_FIELDS.values())
    summed = (
        (yield from _rows_later(
            f"SELECT thread_id, {sums} FROM {TURNS} WHERE has_usage AND thread_id IN ({_marks(len(told))}) "
            "GROUP BY thread_id",
            told,
        ))
        if told
        else list
    )

    def totals() -> list[dict[str, int] | TurnLost]:
        by_thread = {thread_pk: dict(zip(USAGE_FIELDS, sums, strict=True)) for thread_pk, *sums in summed()}
        return [
            settled.get(id(end))
            or {name: int(by_thread.get(rows[end.thread.id].pk, {}).get(name) or 0) for name in USAGE_FIELDS}
            for end in ends
        ]

    return totals


def _settled_elsewhere(ends: list[FinishTurn]) -> Plan[tuple[dict[int, TurnLost | None], list[FinishTurn]]]:
    """Of ends whose turn does not hold its thread's lock: those stored
    already, by id of the end: ``TurnLost`` where another ended the turn,
    None where this same end was (its earlier try committed). Those still in
    progress are not here: nobody told another story, so they are written.
    And the lost ones whose usage is not on their row yet."""
    if not ends:
        return {}, []
    stored = {
        turn_id: (status, completed, size, bool(counted))
        for turn_id, status, completed, size, counted in (yield from _rows(
            f"SELECT turn_id, status, completed_at_ms, input_bytes, has_usage FROM {TURNS} "
            f"WHERE turn_id IN ({_marks(len(ends))})",
            [end.turn.id for end in ends],
        ))
    }
    settled: dict[int, TurnLost | None] = {}
    lost_usage: list[FinishTurn] = []
    for end in ends:
        status, completed, size, counted = stored[end.turn.id]
        if status == IN_PROGRESS:
            continue
        # Another's mark stores no input (0 bytes); a turn that ran stores at least the user's message.
        if (status, completed, size) == (end.turn.status, end.turn.completed_at_ms, end.turn.input_bytes):
            settled[id(end)] = None
        else:
            settled[id(end)] = TurnLost(f"turn {end.turn.id} lost its thread's lock and was stored {status} by another")
            if end.turn.usage and not counted:
                lost_usage.append(end)
    return settled, lost_usage


def begin(
    starts: list[BeginTurn], rows: dict[str, _ThreadRow], now: tuple[str, tuple[Any, ...]]
) -> Plan[Callable[[], list[Begun | None]]]:
    """Take each thread's lock and store its turn, numbered next in its
    thread: (history to replay, or None where the start's cached one is
    current, the thread's model, the turn's row key, the
    turn whose lapsed lock it took over and its process's channel, the
    thread's policy), or None where another turn holds the lock; to read
    once committed."""
    now_sql, now_params = now
    taken: list[tuple[BeginTurn, _ThreadRow]] = []
    cache_current: set[int] = set()  # by start: no turn began since the history it has
    lapsed_turns: dict[int, tuple[str, str | None]] = {}  # by start: the turn whose lapsed lock it takes, its channel
    for start in starts:
        row = rows.get(start.thread.id)
        if row is None or row.held:
            continue
        if row.running_turn_id:
            lapsed_turns[id(start)] = (row.running_turn_id, row.running_channel)
        row.running_turn_id, row.running_channel, row.held = start.turn.id, start.channel, True
        if start.cached_sequence is not None and start.cached_sequence == row.sequence:
            cache_current.add(id(start))
        row.sequence += 1
        start.turn.sequence = row.sequence
        row.model = start.model or row.model
        row.preview = row.preview or start.thread.preview
        mode, network, approvals = row.policy
        if start.sandbox is not None:
            mode, network = start.sandbox
        row.policy = (mode, network, approvals if start.approvals is None else start.approvals)
        taken.append((start, row))
    if not taken:
        return lambda: [None] * len(starts)
    # One statement for every lock of the batch; the expiry on the database's
    # clock (its SQL is the same for any length, only the parameters differ).
    expiries = {seconds: _lock_until_sql(seconds) for seconds in {start.lock_seconds for start, _ in taken}}
    expiry_sql, _ = next(iter(expiries.values()))
    assignments = f"running_channel = %s, lock_expires_at = {expiry_sql}, updated_at = {now_sql}, " + ", ".join(
        f"{column} = %s" for column in ("running_turn_id", "turn_sequence", "model", "preview", *POLICY_COLUMNS)
    )
    yield Statement(
        f"UPDATE {THREADS} SET {assignments} WHERE id = %s",
        [
            [start.channel, *expiries[start.lock_seconds][1], *now_params]
            + [row.running_turn_id, row.sequence, row.model, row.preview]
            + _prepared(StoredThread, list(POLICY_COLUMNS), list(row.policy))
            + [row.pk]
            for start, row in taken
        ],
        many=True,
    )
    if lapsed_turns:
        yield from _mark_interrupted([turn_id for turn_id, _ in lapsed_turns.values()])
    turn_pks = yield from _insert_turns(taken)
    yield from _insert_first_items(taken)
    histories = yield from _histories_later([(start, row) for start, row in taken if id(start) not in cache_current])

    def begun() -> list[Begun | None]:
        pks, earlier = turn_pks(), histories()
        by_start = {
            id(start): (
                None if id(start) in cache_current else earlier[row.pk],
                row.model,
                pks[start.turn.id],
                lapsed_turns.get(id(start)),
                row.policy,
            )
            for start, row in taken
        }
        return [by_start.get(id(start)) for start in starts]

    return begun


def _insert_turns(taken: list[tuple[BeginTurn, _ThreadRow]]) -> Plan[Callable[[], dict[str, int]]]:
    """The new turns' rows; their primary keys by turn id, to read later."""
    values = [
        _prepared(
            StoredTurn,
            TURN_COLUMNS,
            [
                start.turn.id,
                row.pk,
                start.thread.principal_id,
                start.turn.originator,
                start.turn.client_name,
                start.turn.connection_id,
                start.turn.status,
                start.turn.sequence,
                None,
                start.turn.started_at_ms,
                None,
                "[]",
                0,
                False,
                *[0] * len(USAGE_FIELDS),
            ],
        )
        for start, row in taken
    ]
    # Several rows a statement, within the database's parameter limit;
    # their keys come back with them where it can return rows (SQLite 3.35+,
    # PostgreSQL), else from one query after.
    per_statement = _max_query_params() // len(TURN_COLUMNS)
    returning = _insert_returns_rows()
    chunks = []
    for first in range(0, len(values), per_statement):
        chunk = values[first : first + per_statement]
        row_marks = ", ".join([f"({_marks(len(TURN_COLUMNS))})"] * len(chunk))
        sql = f"INSERT INTO {TURNS} ({', '.join(TURN_COLUMNS)}) VALUES {row_marks}"
        params = [value for row in chunk for value in row]
        if returning:
            chunks.append((yield from _rows_later(sql + " RETURNING turn_id, id", params)))
        else:
            yield from _run(sql, params)
    if not returning:
        chunks.append((yield from _rows_later(*_turn_pks_query([start.turn.id for start, _ in taken]))))
    return lambda: {turn_id: pk for rows in chunks for turn_id, pk in rows()}


def _turn_pks_query(turn_ids: list[str]) -> tuple[str, list[Any]]:
    return f"SELECT turn_id, id FROM {TURNS} WHERE turn_id IN ({_marks(len(turn_ids))})", turn_ids


def _turn_pks(turn_ids: list[str]) -> Plan[dict[str, int]]:
    return dict((yield from _rows(*_turn_pks_query(turn_ids))))


def _insert_first_items(taken: list[tuple[BeginTurn, _ThreadRow]]) -> Plan[None]:
    """The new turns' first items (the user's message). Each names its turn
    by its id, as the row keys of the turns just inserted are not read yet."""
    columns = ", ".join(ITEM_COLUMNS)
    rows = [
        [*values, start.turn.id]
        for start, _ in taken
        for _, *values in _item_rows(0, start.turn.items, 0)  # 0: a stand-in for the key, left out
    ]
    if rows:
        yield Statement(
            f"INSERT INTO {ITEMS} ({columns}) SELECT id, {_marks(len(ITEM_COLUMNS) - 1)} FROM {TURNS} WHERE turn_id = %s",
            rows,
            many=True,
        )


def _histories_later(taken: list[tuple[BeginTurn, _ThreadRow]]) -> Plan[Callable[[], dict[int, History]]]:
    """Each thread's model input of its earlier turns (a JSON array's text,
    never decoded), newest kept first within its bound, to read later: one
    query for every thread of the batch, bounded in the database by a
    running total of their sizes. The batch's
    new turns have no input yet (``input_bytes`` 0): none is replayed."""
    if not taken:
        return lambda: {}
    most = max(start.max_history_bytes for start, _ in taken)
    thread_pks = [row.pk for _, row in taken]
    earlier = yield from _rows_later(
        f"SELECT thread_id, model_input, input_bytes FROM ("
        f"  SELECT thread_id, model_input, input_bytes, sequence, SUM(input_bytes) OVER ("
        f"    PARTITION BY thread_id ORDER BY sequence DESC) AS bytes_so_far"
        f"  FROM {TURNS} WHERE input_bytes > 0 AND thread_id IN ({_marks(len(thread_pks))})"
        f") AS earlier WHERE bytes_so_far <= %s ORDER BY thread_id, sequence DESC",
        [*thread_pks, most],
    )

    def histories() -> dict[int, History]:
        by_thread: dict[int, list[tuple[str, int]]] = {pk: [] for pk in thread_pks}
        for thread_pk, stored_input, size in earlier():
            # Text on both databases: Django's PostgreSQL backend reads jsonb
            # as text too (its JSONField decodes it). Anything else is encoded.
            text = stored_input if isinstance(stored_input, str) else json.dumps(stored_input)
            by_thread[thread_pk].append((text, size))
        return {row.pk: History.within(by_thread[row.pk], start.max_history_bytes) for start, row in taken}

    return histories


def _new_batches() -> GroupCommit:
    from .loop_writers import writer_for_this_loop  # it builds on this module

    write = writer_for_this_loop()
    if write is not None:
        return GroupCommit(write, None, max_batch=MAX_BATCH)
    return GroupCommit(write_turns, row_writers, max_batch=MAX_BATCH)


_batches: LoopLocal[GroupCommit] = LoopLocal(_new_batches)


def submit(write: Write) -> asyncio.Future:
    """The future of the write's outcome, once its batch is committed."""
    return _batches.get().submit(write)


async def flushed() -> None:
    """Once every turn write queued so far on this loop is settled."""
    batches = _batches.peek()
    if batches is not None:
        await batches.flushed()

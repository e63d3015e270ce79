"""Turn batches written by the event loop itself, on a database connection of its own.

In a row writer's thread, a batch's every wait for the database handed the
GIL to the event loop, and the thread then waited for the busy loop to give
it back: at one connection, a batch took two to three times what its
statements take alone (docs/PERFORMANCE.md, the fifth session of 2026-12-06).
On the loop, a wait is one more socket the loop watches (PostgreSQL), or
there is none worth a thread (SQLite: no fsync at a WAL commit but the one
that starts the WAL over after a checkpoint).

Both run the plan a row writer runs (``turn_writes.batch_plan``), and decide
which writes to retry alone the same way (``turn_writes.attempts``). One
batch at a time per loop (``GroupCommit``); the ORM keeps every other read
and write.

- PostgreSQL (``PostgresOnLoop``): psycopg's async connection in pipeline
  mode, the statements it runs often prepared.
- SQLite (``SqliteOnLoop``): the loop never waits for another writer's lock:
  a batch (or a write tried alone) that finds the database locked goes to a
  row writer, which waits (Django's busy timeout). The checkpoints run on a
  row writer too.
"""

from __future__ import annotations

import asyncio
import logging
import select
import sqlite3
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import OperationalError, close_old_connections, connection

from codexserver.loop_local import LoopLocal
from identity.actions import row_writers

from .turn_writes import (
    NOW,
    ONE_WRITES_FAULT,
    Plan,
    Statement,
    T,
    Write,
    attempts,
    batch_plan,
    execute_on,
    pipelines_supported,
    read_back,
    run_plan,
    write_turns,
)

logger = logging.getLogger(__name__)

# SQLite: a row writer checkpoints the WAL after this many of the loop's commits.
CHECKPOINT_EVERY = 200
# PostgreSQL: a statement is prepared once it ran this many times on the session (psycopg's default).
PREPARE_THRESHOLD = 5
# PostgreSQL: the loop's session's TCP settings (unless Django's options set
# them), for a peer gone silently (a dropped NAT entry, a dead host): idle,
# probed after 30 s and dropped after three unanswered; mid-batch, dropped
# once what it sent waits 60 s unacknowledged (TCP's own retries: 15 minutes).
TCP_SETTINGS = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 60_000,
}


# --- PostgreSQL ---------------------------------------------------------------


class PostgresOnLoop:
    """The loop's PostgreSQL session. It stays open between batches, and is
    replaced before a batch when PostgreSQL closed it (``_has_input``), and
    after a batch that failed in a way that may have left it unusable."""

    def __init__(self) -> None:
        self._session: Any = None  # psycopg.AsyncConnection
        self._shut = False
        self._writing = False  # a batch is on the session

    async def write(self, writes: list[Write]) -> list[Any]:
        """Each write's outcome, as ``turn_writes.write_turns`` gives it (once
        shut, as a row writer gives it: the process is stopping)."""
        tries, tried = attempts(writes), None
        while True:  # the twin of SqliteOnLoop.write
            try:
                batch = tries.send(tried)
            except StopIteration as done:
                return done.value
            try:
                tried = await on_a_row_writer(batch) if self._shut else await self._write(batch)
            except Exception as exc:
                tried = exc

    async def _write(self, writes: list[Write]) -> list[Any]:
        self._writing = True
        try:
            return await self._write_on_session(writes)
        finally:
            self._writing = False
            if self._shut:  # shut meanwhile: closed once the batch is done with the session
                self.close()

    async def _write_on_session(self, writes: list[Write]) -> list[Any]:
        with connection.wrap_database_errors:  # psycopg's errors as Django's (ONE_WRITES_FAULT)
            session = await self._session_for_batch()
        later: list[_Later] = []
        try:
            with connection.wrap_database_errors:
                async with session.pipeline():
                    await session.execute("BEGIN")
                    outcomes = await _run_on_session(session, batch_plan(writes), later)
                    await session.execute("COMMIT")
        except BaseException as failure:
            await self._after_failure(session, failure)
            raise
        for each in later:  # received with the commit: no round trip
            try:
                each.rows = await each.cursor.fetchall()
            except Exception as exc:
                each.error = exc
        return read_back(writes, outcomes)

    async def _session_for_batch(self) -> Any:
        import psycopg  # PostgreSQL's driver: not loaded where SQLite serves

        session = self._session
        if session is not None and (
            session.closed
            or session.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
            or _has_input(session.pgconn.socket)
        ):
            self.close()
        if self._session is None:
            params = connection.get_connection_params()  # Django's: its adapters read jsonb as text, as the ORM does
            params.update(autocommit=True, **_statement_binding())
            for name, value in TCP_SETTINGS.items():
                params.setdefault(name, value)
            self._session = await psycopg.AsyncConnection.connect(**params)
        return self._session

    async def _after_failure(self, session: Any, failure: BaseException) -> None:
        """A write at fault leaves the session sound: its transaction is rolled
        back. Anything else (the database, the network, a batch cancelled
        mid-pipeline) may not have: the next batch gets a new session."""
        if isinstance(failure, ONE_WRITES_FAULT) and not session.closed:
            try:
                await session.rollback()
                return
            except Exception:
                pass
        self.close()

    def close(self) -> None:
        """libpq's own close, which does not wait: callable from outside the
        loop, after it ended (psycopg's ``close`` does no more)."""
        session, self._session = self._session, None
        if session is not None:
            session.pgconn.finish()

    def shut(self) -> None:
        """Closed for good: what is still written goes to a row writer. A
        batch on the session keeps it until it is done (libpq's close under
        a socket the loop watches could leave that batch waiting for ever)."""
        self._shut = True
        if not self._writing:
            self.close()


def _statement_binding() -> dict[str, Any]:
    """Server-side binding, and a statement prepared once it ran five times
    (psycopg's default; it keeps the 100 last used): at one connection a
    batch's statements are the same few every time, and prepared they took a
    quarter less of a batch's time. (Their lists of keys grow with the batch,
    so under load there are more texts, and the least used are planned each
    time, as they were before.) Django binds in the client and prepares
    nothing, for poolers that cannot keep prepared statements;
    ``CODEX_DB_PREPARED_STATEMENTS=0`` does the same here."""
    import psycopg

    if settings.CODEX_DB_PREPARED_STATEMENTS:
        return {"cursor_factory": psycopg.AsyncCursor, "prepare_threshold": PREPARE_THRESHOLD}
    return {"cursor_factory": psycopg.AsyncClientCursor, "prepare_threshold": None}


def _has_input(socket: int) -> bool:
    """Whether anything waits to be read on the socket: between batches a
    sound session has nothing to say, and PostgreSQL closing it (a restart,
    a failover, ``pg_terminate_backend``) makes it readable."""
    poller = select.poll()  # not select.select: a busy server's descriptors pass 1023
    poller.register(socket, select.POLLIN)
    return bool(poller.poll(0))


@dataclass(eq=False, slots=True)
class _Later:
    """A read for after the commit (``turn_writes.LATER``): its rows once the batch committed."""

    cursor: Any
    rows: list[tuple] | None = None
    error: Exception | None = None

    def __call__(self) -> list[tuple]:
        if self.error is not None:
            raise self.error
        return self.rows


async def _run_on_session(session: Any, plan: Plan[T], later: list[_Later]) -> T:
    """Runs the plan's statements in the session's pipeline (the twin of ``turn_writes.run_plan``)."""
    result = None
    try:
        while True:
            try:
                statement = plan.send(result)
            except StopIteration as done:
                return done.value
            cursor = session.cursor()
            if statement.many:
                await cursor.executemany(statement.sql, statement.params)
            else:
                await cursor.execute(statement.sql, statement.params)
            if statement.read is None:
                result = None
            elif statement.read == NOW:
                result = await cursor.fetchall()
            else:
                result = _Later(cursor)
                later.append(result)
    finally:
        plan.close()


# --- SQLite -------------------------------------------------------------------


class SqliteOnLoop:
    """The loop's SQLite connection: Django's kind (its functions, pragmas and
    WAL), opened by a row writer, with no busy timeout and no automatic
    checkpoint."""

    def __init__(self) -> None:
        self._db: sqlite3.Connection | None = None
        self._commits = 0  # since the last checkpoint
        self._checkpointing = False
        self._shut = False

    async def write(self, writes: list[Write]) -> list[Any]:
        """Each write's outcome, as ``turn_writes.write_turns`` gives it (once
        shut, as a row writer gives it: the process is stopping)."""
        loop = asyncio.get_running_loop()
        tries, tried = attempts(writes), None
        while True:  # the twin of PostgresOnLoop.write
            try:
                batch = tries.send(tried)
            except StopIteration as done:
                outcomes = done.value
                break
            try:
                db = None if self._shut else await self._connection()
                tried = None if db is None else self._write(db, batch)
            except OperationalError as exc:
                # "database is locked", or a shared cache's "database table is
                # locked", opening the connection or writing (then rolled
                # back): another writer holds the file, and a row writer waits.
                tried = None if "locked" in str(exc) else exc
            except Exception as exc:
                tried = exc
            if tried is None:  # shut, or locked: nothing was written here
                try:
                    tried = await on_a_row_writer(batch)
                except Exception as exc:  # the row writers are shut down: the process is stopping
                    tried = exc
        if self._commits >= CHECKPOINT_EVERY and not self._checkpointing:
            self._start_checkpoint(loop)
        return outcomes

    def _start_checkpoint(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            checkpoint = loop.run_in_executor(row_writers(), _checkpoint)
        except RuntimeError:  # the row writers are shut down: the process is stopping
            return
        self._commits, self._checkpointing = 0, True
        checkpoint.add_done_callback(self._checkpointed)

    async def _connection(self) -> sqlite3.Connection | None:
        """None if the writer was shut while it was being opened."""
        if self._db is None:
            db = await asyncio.get_running_loop().run_in_executor(row_writers(), _new_sqlite_connection)
            if self._shut:
                db.close()
                return None
            self._db = db
        return self._db

    def _write(self, db: sqlite3.Connection, writes: list[Write]) -> list[Any]:
        """A failed batch is rolled back: nothing of it is written."""
        from django.db.backends.sqlite3.base import SQLiteCursorWrapper  # Django's: its "%s" become "?"

        def execute(statement: Statement) -> Any:
            return execute_on(db.cursor(factory=SQLiteCursorWrapper), statement)

        with connection.wrap_database_errors:  # sqlite3's errors as Django's (ONE_WRITES_FAULT)
            db.execute("BEGIN IMMEDIATE")  # the write lock now, or "database is locked" now
            try:
                outcomes = run_plan(batch_plan(writes), execute)
                db.execute("COMMIT")
            except BaseException:
                self._roll_back(db)
                raise
        self._commits += 1
        return read_back(writes, outcomes)

    def _roll_back(self, db: sqlite3.Connection) -> None:
        """After a failed statement; SQLite may have rolled back already (a
        full disk, an I/O error). A connection left in a transaction, which
        every later BEGIN would refuse, is closed: the next batch opens another."""
        try:
            db.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        if db.in_transaction:
            self.close()

    def _checkpointed(self, done: asyncio.Future) -> None:
        self._checkpointing = False
        if not done.cancelled() and done.exception() is not None:
            logger.warning("could not checkpoint the database: %s", done.exception())

    def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()

    def shut(self) -> None:
        """Closed for good: what is still written goes to a row writer."""
        self._shut = True
        self.close()


async def on_a_row_writer(writes: list[Write]) -> list[Any]:
    return await asyncio.get_running_loop().run_in_executor(row_writers(), write_turns, writes)


def _new_sqlite_connection() -> sqlite3.Connection:
    """On a row writer, as Django opens its own, but in autocommit, without a
    busy timeout (the loop must never wait for a lock) and without automatic
    checkpoints (the loop must never wait for an fsync)."""
    params = connection.get_connection_params()
    params["timeout"] = 0
    with connection.wrap_database_errors:  # its pragmas may find the file locked: Django's error, as a batch's
        db = connection.get_new_connection(params)
        try:
            db.isolation_level = None
            db.execute("PRAGMA wal_autocheckpoint = 0")
        except BaseException:
            db.close()
            raise
    return db


def _checkpoint() -> None:
    """Copy the WAL's pages into the database, on a row writer (PASSIVE: it
    waits for nobody, and leaves what readers still need)."""
    close_old_connections()
    try:
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA wal_checkpoint(PASSIVE)")
    finally:
        close_old_connections()


# --- which, for this loop -----------------------------------------------------

_postgres: LoopLocal[PostgresOnLoop] = LoopLocal(PostgresOnLoop)
_sqlite: LoopLocal[SqliteOnLoop] = LoopLocal(SqliteOnLoop)


def writer_for_this_loop():
    """The running loop's batch writer (a coroutine function), or None where
    a row writer writes them (another database, libpq before 14, or SQLite in memory)."""
    if connection.vendor == "postgresql" and pipelines_supported() and not _options_the_session_would_drop():
        return _postgres.get().write
    if connection.vendor == "sqlite" and not connection.is_in_memory_db():
        # (In memory, the test suite's database: its shared cache's table
        # locks wait for nobody, and a row writer would find them held.)
        return _sqlite.get().write
    return None


def _options_the_session_would_drop() -> bool:
    """Django's options its own connections apply after connecting, which the
    loop's session does not: there, a row writer writes the batches."""
    options = connection.settings_dict["OPTIONS"]
    return any(options.get(name) is not None for name in ("isolation_level", "assume_role"))


def close_this_loops_writer() -> None:
    """For good (the server's shutdown, the end of a test): what is still
    written goes to a row writer."""
    for writers in (_postgres, _sqlite):
        writer = writers.peek()
        if writer is not None:
            writer.shut()


def close_every_loops_writer() -> None:
    """Close the connections of every loop's writers, of loops that ended
    too, whatever they were doing (the tests: PostgreSQL refuses to drop a
    database in use)."""
    for writers in (_postgres, _sqlite):
        for writer in writers.values():
            writer.shut()
            writer.close()

"""This process in the database: its boot, its heartbeat, and the rows of
processes that died (PROTOCOL §7).

Each process (each event loop, in tests and benchmarks) has its own boot id.
It beats every ``CODEX_HEARTBEAT_INTERVAL`` seconds; a boot silent for
``CODEX_HEARTBEAT_TIMEOUT`` is dead, and whichever live process notices
first closes its open rows. Two live processes may share an instance name:
neither ever closes the other's rows.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import uuid
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from codexserver.loop_local import LoopLocal
from identity.actions import (
    close_rows_of_dead_processes,
    prune_closed_rows,
    read_principal_state,
    record_boot_started,
    record_boot_stopped,
    record_heartbeat,
)
from identity.http_clients import close_client_factory
from realtime.fanout.thread_hub import stop_thread_hub, thread_hub
from realtime.rpc.connection import live_connections
from realtime.services.telemetry import flush_at_shutdown
from realtime.store import turn_writes
from realtime.store.loop_writers import close_this_loops_writer
from realtime.store.thread_store import end_abandoned_turns
from realtime.tools.exec_sessions import command_sessions
from realtime.turns.runner import announce_dead_processes_turn, background_endings_finished

logger = logging.getLogger(__name__)

SHUTDOWN_SECONDS = 10.0
# Of those, for writing the ends of the turns the shutdown interrupted: the
# rest (the hub's stop, the boot row) must still fit when the database is slow.
ENDINGS_SECONDS = 3.0
# A row of ours older than this with no live connection behind it is closed
# (younger ones may belong to an upgrade still in progress).
ORPHAN_ROW_AGE = timedelta(seconds=60)
PRUNE_INTERVAL = timedelta(hours=1)
PRUNE_BATCH = 5_000


class ProcessLifecycle:
    def __init__(self) -> None:
        self.boot_id = uuid.uuid4()
        self.started_at = timezone.now()
        self._start: asyncio.Future | None = None  # one run, shared by whoever asks first
        self._heartbeat: asyncio.Task | None = None
        self._principal_watch: asyncio.Task | None = None
        self._session_sweep: asyncio.Task | None = None
        self._pruned_at = None  # when this process last pruned old connection rows
        self._more_to_prune = False

    async def ensure_started(self) -> None:
        """Record the boot, close dead processes' rows and start beating; once.

        Called at server start (``manage.py serve``) and before each
        connection's row is written (so plain ``daphne`` gets it too); a burst
        of connections waits for the one run. A run that failed (the database
        was down) is tried again by the next connection.
        """
        if self._start is None or (self._start.done() and (self._start.cancelled() or self._start.exception())):
            self._start = asyncio.ensure_future(self._begin())
        await asyncio.shield(self._start)

    async def _begin(self) -> None:
        instance = settings.CODEX_SERVER_INSTANCE
        await record_boot_started(self.boot_id, instance, self.started_at)
        await self._close_dead_rows()
        if self._heartbeat is None:
            # An empty context: the loop must never carry the scope of the
            # connection whose upgrade happened to start it.
            self._heartbeat = asyncio.create_task(self._beat(), name="heartbeat", context=contextvars.Context())
        if self._principal_watch is None:
            self._principal_watch = asyncio.create_task(
                self._watch_principals(), name="principal watch", context=contextvars.Context()
            )
        if self._session_sweep is None:
            self._session_sweep = asyncio.create_task(
                self._end_unwatched_sessions(), name="session sweep", context=contextvars.Context()
            )

    async def _close_dead_rows(self) -> None:
        closed = await close_rows_of_dead_processes(
            settings.CODEX_SERVER_INSTANCE,
            self.started_at,
            timedelta(seconds=settings.CODEX_HEARTBEAT_TIMEOUT),
        )
        if closed:
            logger.info("closed %d connection row(s) of processes that stopped beating", closed)

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(settings.CODEX_HEARTBEAT_INTERVAL)
            try:
                live = frozenset(connection.connection_id for connection in list(live_connections))
                changed = await record_heartbeat(self.boot_id, live, ORPHAN_ROW_AGE)
                if changed:
                    logger.info("set %d of this process's connection rows straight", changed)
                await self._close_dead_rows()
                await self._prune_old_rows()
                ended = await end_abandoned_turns()
                if ended:
                    logger.info("marked %d turn(s) of stopped processes interrupted", len(ended))
                    await self._announce(ended)
            except Exception as exc:  # the database is down: beat again later
                logger.warning("heartbeat failed: %s", exc)

    async def _prune_old_rows(self) -> None:
        """Hourly, a batch a beat until none is left: connection rows closed
        longer ago than CODEX_CONNECTION_ROW_RETENTION_DAYS go (0 keeps them)."""
        days = settings.CODEX_CONNECTION_ROW_RETENTION_DAYS
        now = timezone.now()
        if not days or (not self._more_to_prune and self._pruned_at is not None and now - self._pruned_at < PRUNE_INTERVAL):
            return
        self._pruned_at = now
        pruned = await prune_closed_rows(now - timedelta(days=days), PRUNE_BATCH)
        self._more_to_prune = pruned == PRUNE_BATCH
        if pruned:
            logger.info("deleted %d connection row(s) closed more than %g days ago", pruned, days)

    async def _end_unwatched_sessions(self) -> None:
        """Background terminals do not outlive their thread's audience: once
        nobody here has followed the thread for CODEX_SESSION_IDLE_SECONDS,
        they end (PROTOCOL §11). Checked a few times within that span."""
        idle = settings.CODEX_SESSION_IDLE_SECONDS
        hub = thread_hub()

        def watched(thread_id: str) -> bool:  # a subscriber here, or a turn running here (which may poll them)
            thread = hub.get(thread_id)
            return thread is not None and (len(thread.subscribers) > 0 or thread.active_turn is not None)

        while True:
            await asyncio.sleep(min(max(idle / 4, 0.05), 30.0))
            try:
                ended = command_sessions().end_unwatched(watched, idle)
            except Exception:  # the sweep goes on: a stuck terminal would outlive its audience for good
                logger.exception("could not end unwatched background terminals")
                continue
            if ended:
                logger.info("ended %d background terminal(s) of threads nobody followed for %gs", ended, idle)

    async def _watch_principals(self) -> None:
        """Every CODEX_PRINCIPAL_CHECK_SECONDS, for this process's live
        connections: close those whose token was revoked (1008), wherever it
        was revoked (the admin, ``revoke_token``, another process), and those
        let in with no token once one is configured; bring their principals'
        token budgets up to date. A few indexed reads, and none at all while
        nobody is connected."""
        while True:
            await asyncio.sleep(settings.CODEX_PRINCIPAL_CHECK_SECONDS)
            connections = list(live_connections)
            if not connections:
                continue
            try:
                await self._apply_principal_state(connections)
            except Exception as exc:  # the database is down: read again at the next check
                logger.warning("could not check the connections' tokens and budgets: %s", exc)

    @staticmethod
    async def _apply_principal_state(connections) -> None:
        state = await read_principal_state(
            {connection.principal.token_id for connection in connections} - {None},
            {connection.principal.id for connection in connections},
            anonymous_open=any(connection.principal.anonymous for connection in connections),
        )
        for connection in connections:
            principal = connection.principal
            if principal.token_id in state.revoked_tokens or (principal.anonymous and state.tokens_configured):
                connection.revoke()
            connection.token_budget = state.budgets.get(principal.id)

    @staticmethod
    async def _announce(ended) -> None:
        """Each stored end told at once, before a new turn of its thread can
        start here; a failure never stops the heartbeat."""
        try:
            await thread_hub().ensure_started()  # this process may have followed no thread yet
        except Exception as exc:  # the layer is down: subscribers elsewhere find the ends on reading
            logger.warning("could not announce %d turn(s) of stopped processes: %s", len(ended), exc)
        for thread, turn in ended:
            try:
                announce_dead_processes_turn(thread, turn, idle=True)
            except Exception:
                logger.exception("could not announce the end of turn %s", turn.id)

    async def shut_down(self) -> None:
        """At server shutdown, within SHUTDOWN_SECONDS: stop every connection's
        tasks (closing their upstream streams), close their rows and the boot,
        send buffered telemetry and release the upstream pool."""
        try:
            await asyncio.wait_for(self._shut_down(), SHUTDOWN_SECONDS)
        except TimeoutError:
            logger.error("shutdown steps did not finish within %ss", SHUTDOWN_SECONDS)

    async def _shut_down(self) -> None:
        for loop_task in (self._heartbeat, self._principal_watch, self._session_sweep):
            if loop_task is not None:
                loop_task.cancel()
        await command_sessions().stop_all()  # no command outlives its server (PROTOCOL §11)
        try:
            await asyncio.gather(*(connection.close() for connection in list(live_connections)))
            try:  # every turn's end is stored before the row writers stop, if the database lets us
                await asyncio.wait_for(_turn_ends_written(), ENDINGS_SECONDS)
            except TimeoutError:
                logger.error("turn ends still unwritten after %ss; their locks will lapse", ENDINGS_SECONDS)
            # Not flushed again: what the wait above gave up on is given up.
            close_this_loops_writer()
            await stop_thread_hub()
            closed = await record_boot_stopped(self.boot_id)
            logger.info("shutting down: closed %d open connection row(s)", closed)
        finally:
            await flush_at_shutdown()
            await close_client_factory()


async def _turn_ends_written() -> None:
    await background_endings_finished()
    await turn_writes.flushed()


_lifecycles: LoopLocal[ProcessLifecycle] = LoopLocal(ProcessLifecycle)


def process_lifecycle() -> ProcessLifecycle:
    """This process's (this event loop's) lifecycle."""
    return _lifecycles.get()


# The steps daphne's start and shutdown hooks run (codexserver/daphne_server.py).
async def start() -> None:
    await process_lifecycle().ensure_started()


async def shut_down() -> None:
    await process_lifecycle().shut_down()

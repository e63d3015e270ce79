"""Group commit: writes that arrive while a batch is being written go out
together in the next one.

Fifty turns starting at once used to queue fifty transactions on the row
writers, one after another; a batch costs the same handful of statements and
one commit however many writes it carries. Nothing waits for a batch to
fill: a lone write goes out at once, and a batch is simply whatever queued up
while the previous one was in flight.

A batch goes straight to the executor and its callers' futures are settled
from its done-callback: no writer task and no asgiref wrapper in between.
On a busy loop every hop through the ready queue costs milliseconds, and a
turn waits for two batches. Without an executor, a batch is written by a
coroutine, as a task on the loop (a database driver that is asynchronous).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any, Generic, TypeVar

W = TypeVar("W")

# Writes a batch, on an executor thread or (a coroutine function) on the loop;
# returns, in order, each write's result or the exception it alone raised
# (one bad write never fails the others).
WriteBatch = Callable[[list[W]], list[Any]] | Callable[[list[W]], Awaitable[list[Any]]]


class GroupCommit(Generic[W]):
    """One event loop's queue of writes of one kind; one batch in flight at a time."""

    def __init__(self, write_batch: WriteBatch, executor: Callable[[], Executor] | None, max_batch: int):
        """``write_batch`` runs on ``executor``'s threads, or, with None, is a
        coroutine function whose batches run as tasks on the loop."""
        self._write_batch = write_batch
        self._executor = executor
        self._max_batch = max_batch
        self._waiting: list[tuple[W, asyncio.Future]] = []
        self._in_flight: asyncio.Future | None = None
        # The batches' tasks' context: no connection's identity scope (a
        # batch serves many connections).
        self._context = contextvars.Context()

    def submit(self, write: W) -> asyncio.Future:
        """Queue ``write``; the future of its result once its batch is committed.
        Cancelling the future only stops waiting: the write still happens."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((write, future))
        if self._in_flight is None:
            self._write_next()
        return future

    async def flushed(self) -> None:
        """Once every write queued so far is settled (the server's shutdown
        waits for this: a turn's end must not be lost)."""
        while self._in_flight is not None:  # one is in flight whenever writes wait
            await asyncio.wait([self._in_flight])  # its settling (added first) runs first

    def _write_next(self) -> None:
        batch, self._waiting = self._waiting[: self._max_batch], self._waiting[self._max_batch :]
        writes, loop = [write for write, _ in batch], asyncio.get_running_loop()
        try:
            if self._executor is None:
                written = loop.create_task(self._write_batch(writes), name="group commit", context=self._context)
            else:  # no context is copied to the executor: the batch serves many connections
                written = loop.run_in_executor(self._executor(), self._write_batch, writes)
        except Exception as exc:  # the executor is shut down: the process is stopping
            batch, self._waiting = batch + self._waiting, []
            _settle_each(batch, [exc] * len(batch))
            self._in_flight = None
            return
        self._in_flight = written
        written.add_done_callback(lambda done: self._settle(batch, done))

    def _settle(self, batch: list[tuple[W, asyncio.Future]], written: asyncio.Future) -> None:
        try:
            _settle_each(batch, _outcomes(written, len(batch)))
        finally:
            self._in_flight = None
            if self._waiting:
                self._write_next()


def _outcomes(written: asyncio.Future, count: int) -> list[Any]:
    if written.cancelled():
        return [RuntimeError("the write was abandoned")] * count
    if written.exception() is not None:
        return [written.exception()] * count
    outcomes = written.result()
    if not isinstance(outcomes, list) or len(outcomes) != count:
        return [RuntimeError(f"a batch of {count} writes gave {outcomes!r:.80}")] * count
    return outcomes


def _settle_each(batch: list[tuple[Any, asyncio.Future]], outcomes: list[Any]) -> None:
    for (_, future), outcome in zip(batch, outcomes, strict=True):
        if future.done():  # its caller stopped waiting
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

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
turn waits for two batches.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, Generic, TypeVar

W = TypeVar("W")

# Writes a batch, on an executor thread; returns, in order, each write's
# result or the exception it alone raised (one bad write never fails the others).
WriteBatch = Callable[[list[W]], list[Any]]


class GroupCommit(Generic[W]):
    """One event loop's queue of writes of one kind; one batch in flight at a time."""

    def __init__(self, write_batch: WriteBatch, executor: Callable[[], Executor], max_batch: int):
        self._write_batch = write_batch
        self._executor = executor
        self._max_batch = max_batch
        self._waiting: list[tuple[W, asyncio.Future]] = []
        self._in_flight = False

    def submit(self, write: W) -> asyncio.Future:
        """Queue ``write``; the future of its result once its batch is committed.
        Cancelling the future only stops waiting: the write still happens."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((write, future))
        if not self._in_flight:
            self._write_next()
        return future

    def _write_next(self) -> None:
        batch, self._waiting = self._waiting[: self._max_batch], self._waiting[self._max_batch :]
        self._in_flight = True
        loop = asyncio.get_running_loop()
        written = loop.run_in_executor(self._executor(), self._write_batch, [write for write, _ in batch])
        written.add_done_callback(lambda done: self._settle(batch, done))

    def _settle(self, batch: list[tuple[W, asyncio.Future]], written: asyncio.Future) -> None:
        self._in_flight = False
        if written.cancelled():
            outcomes: list[Any] = [RuntimeError("the write was abandoned")] * len(batch)
        elif written.exception() is not None:
            outcomes = [written.exception()] * len(batch)
        else:
            outcomes = written.result()
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():  # its caller stopped waiting
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
        if self._waiting:
            self._write_next()

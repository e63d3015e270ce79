"""Group commit: writes that arrive while a batch is being written go out
together in the next one.

Fifty turns starting at once used to queue fifty transactions on the row
writers, one after another; a batch costs the same handful of statements and
one commit however many writes it carries. Nothing waits for a batch to
fill: a lone write goes out at once, and a batch is simply whatever queued up
while the previous one was in flight.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

W = TypeVar("W")

# Writes a batch; returns, in order, each write's result or the exception it
# alone raised (so one bad write never fails the others).
WriteBatch = Callable[[list[W]], Awaitable[list[Any]]]


class GroupCommit(Generic[W]):
    """One event loop's queue of writes of one kind, and its writer task."""

    def __init__(self, write_batch: WriteBatch, name: str, max_batch: int):
        self._write_batch = write_batch
        self._name = name
        self._max_batch = max_batch
        self._waiting: list[tuple[W, asyncio.Future]] = []
        self._writer: asyncio.Task | None = None

    async def submit(self, write: W) -> Any:
        """Queue ``write``; its result once its batch is committed."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((write, future))
        if self._writer is None or self._writer.done():
            # An empty context: the writer serves every connection, so it
            # must not carry the scope of the one whose write started it.
            self._writer = asyncio.create_task(self._write_all(), name=self._name, context=contextvars.Context())
        return await future

    async def _write_all(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting[: self._max_batch], self._waiting[self._max_batch :]
            try:
                outcomes = await self._write_batch([write for write, _ in batch])
            except BaseException as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("write abandoned"))
                raise
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():  # its caller stopped waiting
                    continue
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)

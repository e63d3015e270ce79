"""codexserver/group_commit.py: writes join whatever queued while the batch
before them was written, and every caller hears back, whatever happens."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from codexserver.group_commit import GroupCommit

pytestmark = pytest.mark.asyncio

_executor = ThreadPoolExecutor(max_workers=1)


def commit(write_batch, max_batch: int = 100) -> GroupCommit:
    return GroupCommit(write_batch, lambda: _executor, max_batch=max_batch)


async def test_writes_queued_while_a_batch_is_written_go_out_together_in_the_next():
    batches: list[list[int]] = []
    release = threading.Event()

    def write(writes: list[int]) -> list[int]:
        if not batches:
            release.wait(5)  # the first batch is slow: the others queue behind it
        batches.append(writes)
        return [write * 10 for write in writes]

    group = commit(write)
    first = group.submit(1)
    rest = [group.submit(n) for n in (2, 3, 4)]
    release.set()
    assert await first == 10 and await asyncio.gather(*rest) == [20, 30, 40]
    assert batches == [[1], [2, 3, 4]]


async def test_a_batch_holds_at_most_max_batch_writes():
    batches: list[list[int]] = []
    group = commit(lambda writes: batches.append(writes) or writes, max_batch=2)
    results = await asyncio.gather(*(group.submit(n) for n in range(5)))
    assert results == list(range(5))
    assert batches == [[0], [1, 2], [3, 4]]


async def test_each_write_gets_its_own_outcome_or_exception():
    group = commit(lambda writes: [ValueError(w) if w == "bad" else w for w in writes])
    good, bad = group.submit("good"), group.submit("bad")
    assert await good == "good"
    with pytest.raises(ValueError):
        await bad


async def test_a_batch_that_raises_fails_its_writes_and_the_next_batch_still_goes():
    calls = []

    def write(writes):
        calls.append(writes)
        if len(calls) == 1:
            raise RuntimeError("database down")
        return writes

    group = commit(write)
    failing, after = group.submit("a"), group.submit("b")
    with pytest.raises(RuntimeError, match="database down"):
        await failing
    assert await after == "b"


async def test_a_batch_answering_for_the_wrong_number_of_writes_fails_them_all_and_does_not_stall():
    group = commit(lambda writes: writes[:1])
    first = group.submit(1)
    pair = [group.submit(2), group.submit(3)]
    assert await first == 1
    for future in pair:
        with pytest.raises(RuntimeError, match="a batch of 2 writes"):
            await future
    assert await group.submit(4) == 4  # the queue goes on


async def test_an_executor_that_refuses_work_fails_the_writes_instead_of_hanging():
    stopped = ThreadPoolExecutor(max_workers=1)
    stopped.shutdown()
    group = GroupCommit(lambda writes: writes, lambda: stopped, max_batch=10)
    with pytest.raises(RuntimeError):
        await asyncio.wait_for(group.submit(1), 2)
    await asyncio.wait_for(group.flushed(), 2)


async def test_a_caller_that_stops_waiting_does_not_stop_the_write_and_flushed_waits_for_it():
    written: list[int] = []
    release = threading.Event()

    def write(writes):
        release.wait(5)
        written.extend(writes)
        return writes

    group = commit(write)
    group.submit(1).cancel()
    release.set()
    await asyncio.wait_for(group.flushed(), 5)
    assert written == [1]


CALLER = contextvars.ContextVar("caller", default=None)


async def test_without_an_executor_a_coroutine_writes_the_batches_on_the_loop_in_a_context_of_no_caller():
    """As the event loop writes turns (realtime/store/loop_writers.py): writes that queue while a
    batch is written go out together in the next, and the batch, which
    serves many connections, runs in none's context."""
    batches: list[list[int]] = []
    callers: list[object] = []
    release = asyncio.Event()

    async def write(writes: list[int]) -> list[int]:
        callers.append(CALLER.get())
        if not batches:
            await release.wait()
        batches.append(writes)
        return [write * 10 for write in writes]

    group = GroupCommit(write, None, max_batch=100)
    CALLER.set("a connection")
    first = group.submit(1)
    rest = [group.submit(n) for n in (2, 3, 4)]
    await asyncio.sleep(0.01)
    release.set()
    assert await first == 10 and await asyncio.gather(*rest) == [20, 30, 40]
    assert batches == [[1], [2, 3, 4]]
    assert callers == [None, None]


async def test_a_batch_task_cancelled_fails_its_writes_and_the_next_batch_still_goes():
    started = asyncio.Event()

    async def write(writes):
        if writes == ["stuck"]:
            started.set()
            await asyncio.sleep(60)
        return writes

    group = GroupCommit(write, None, max_batch=100)
    stuck = group.submit("stuck")
    await started.wait()
    after = group.submit("after")
    group._in_flight.cancel()  # as a stopping loop cancels its tasks
    with pytest.raises(RuntimeError, match="abandoned"):
        await stuck
    assert await asyncio.wait_for(after, 2) == "after"

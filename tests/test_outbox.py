"""The outbox: a slow reader holds the producer back, a stopped one overflows."""

import asyncio

from realtime.transport.outbox import OUTBOX_CAPACITY, OVERLOAD_THRESHOLD, Outbox


async def test_a_slow_reader_is_waited_for_and_loses_nothing():
    sent = []

    async def slow_send(text):
        await asyncio.sleep(0.0005)
        sent.append(text)

    overflowed = []
    outbox = Outbox(slow_send, on_overflow=lambda: overflowed.append(True), stall_seconds=1)
    writer = asyncio.create_task(outbox.run())
    for index in range(3000):
        await outbox.wait_for_room()
        assert len(outbox) <= OVERLOAD_THRESHOLD
        outbox.put({"index": index})
    while len(sent) < 3000:
        await asyncio.sleep(0.01)
    writer.cancel()
    assert not overflowed and sent[-1] == '{"index":2999}'


async def test_a_stopped_reader_stops_being_waited_for_and_overflows():
    never = asyncio.Event()

    async def stuck_send(text):
        await never.wait()

    overflowed = []
    outbox = Outbox(stuck_send, on_overflow=lambda: overflowed.append(True), stall_seconds=0.2)
    writer = asyncio.create_task(outbox.run())
    loop = asyncio.get_running_loop()
    started = loop.time()
    for index in range(OUTBOX_CAPACITY + 10):
        await outbox.wait_for_room()
        outbox.put({"index": index})
    assert overflowed == [True]
    assert loop.time() - started < 2  # waited for one stall, not one per message
    writer.cancel()


async def test_a_reader_that_never_reads_large_replies_is_dropped_at_the_byte_bound():
    never = asyncio.Event()

    async def stuck_send(text):
        await never.wait()

    overflowed = []
    outbox = Outbox(stuck_send, on_overflow=lambda: overflowed.append(True), max_bytes=1_000_000)
    writer = asyncio.create_task(outbox.run())
    await asyncio.sleep(0)
    big = {"data": "x" * 300_000}
    outbox.put(big)  # taken by the writer, stuck sending
    await asyncio.sleep(0)
    for _ in range(3):
        outbox.put(big)
    assert overflowed == [] and outbox.queued_bytes > 900_000 and outbox.overloaded
    outbox.put(big)  # past a million bytes queued: far fewer than the message bound
    assert overflowed == [True] and outbox.queued_bytes == 0 and len(outbox) == 0
    outbox.put(big)  # nothing more is queued for a dropped client
    assert len(outbox) == 0
    writer.cancel()

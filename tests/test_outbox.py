"""The outbox: a slow reader holds the producer back, a stopped one overflows."""

import asyncio
import json

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


async def test_frames_are_written_through_while_the_socket_takes_them_and_never_overtake_queued_ones():
    wire: list[str] = []
    socket_has_room = True
    release_send = asyncio.Event()

    def write_now(text):
        if socket_has_room:
            wire.append(text)
        return socket_has_room

    async def send_text(text):  # the ASGI way: waits for room, like our daphne's send
        await release_send.wait()
        wire.append(text)

    outbox = Outbox(send_text, on_overflow=lambda: None, write_now=write_now)
    writer = asyncio.create_task(outbox.run())
    outbox.put({"index": 0})
    assert wire == ['{"index":0}']  # written at once, no turn of the loop
    socket_has_room = False
    outbox.put({"index": 1})  # queued: the writer takes it and waits in send
    await asyncio.sleep(0)
    socket_has_room = True
    outbox.put({"index": 2})  # the socket has room again, but 1 is still in the writer's hands
    outbox.put({"index": 3})
    assert wire == ['{"index":0}']
    release_send.set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert [json.loads(text)["index"] for text in wire] == [0, 1, 2, 3]
    outbox.put({"index": 4})  # the queue drained: written through again
    assert json.loads(wire[-1])["index"] == 4 and len(outbox) == 0
    writer.cancel()


async def test_a_frame_that_fails_to_be_written_drops_the_connection_and_nothing_follows_it():
    # Part of it may be on the wire: a retry, or any frame after it, would
    # corrupt the stream.
    sent, dropped = [], []

    def broken_write(text):
        raise RuntimeError("a protocol in a state we did not expect")

    async def send_text(text):
        sent.append(text)

    outbox = Outbox(send_text, on_overflow=lambda: dropped.append(True), write_now=broken_write)
    writer = asyncio.create_task(outbox.run())
    outbox.put({"index": 0})
    outbox.put({"index": 1})
    await asyncio.sleep(0)
    assert dropped == [True] and sent == [] and len(outbox) == 0
    writer.cancel()


async def test_what_is_written_through_counts_toward_the_memory_a_connection_held():
    outbox = Outbox(_never_sent, on_overflow=lambda: None, write_now=lambda text: True)
    outbox.put({"data": "x" * 100_000})
    assert outbox.peak_bytes > 100_000 and len(outbox) == 0


async def _never_sent(text):
    raise AssertionError("written through, never queued")

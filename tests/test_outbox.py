"""The outbox: a slow reader holds the producer back, a stopped one overflows."""

import asyncio
import json

import pytest

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
    await asyncio.sleep(0)
    outbox.put({"index": 0})
    assert wire == ['{"index":0}']  # written at once, no turn of the loop
    socket_has_room = False
    outbox.put({"index": 1})  # queued; the writer has not run yet
    socket_has_room = True
    outbox.put({"index": 2})  # the socket has room again, but 1 waits in the queue
    assert wire == ['{"index":0}'] and len(outbox) == 2
    await asyncio.sleep(0)  # the writer takes 1 and waits in send
    outbox.put({"index": 3})  # 2 is still queued, and the writer holds 1
    outbox.put({"index": 4})
    assert wire == ['{"index":0}']
    release_send.set()
    for _ in range(10):
        await asyncio.sleep(0)
    assert [json.loads(text)["index"] for text in wire] == [0, 1, 2, 3, 4]
    outbox.put({"index": 5})  # the queue drained: written through again
    assert json.loads(wire[-1])["index"] == 5 and len(outbox) == 0
    writer.cancel()


async def test_nothing_is_written_through_once_the_writer_has_stopped():
    wire: list[str] = []
    socket_has_room = False

    def write_now(text):
        if socket_has_room:
            wire.append(text)
        return socket_has_room

    async def failing_send(text):
        raise ConnectionError("the writer's send failed")

    outbox = Outbox(failing_send, on_overflow=lambda: None, write_now=write_now)
    writer = asyncio.create_task(outbox.run())
    outbox.put({"index": 0})  # the socket is full: queued
    socket_has_room = True
    with pytest.raises(ConnectionError):
        await writer  # the writer fails on 0 ...
    outbox.put({"index": 1})  # ... and 1 must not reach the wire after a frame that never did
    assert wire == []

    closed = Outbox(failing_send, on_overflow=lambda: None, write_now=write_now)
    closed.stop()  # the connection closed
    closed.put({"index": 0})
    assert wire == []


async def test_a_frame_that_fails_to_be_written_drops_the_connection_and_nothing_follows_it():
    # Part of it may be on the wire: a retry, or any frame after it, would
    # corrupt the stream.
    sent, overflowed, failed = [], [], []

    def broken_write(text):
        raise RuntimeError("a protocol in a state we did not expect")

    async def send_text(text):
        sent.append(text)

    outbox = Outbox(
        send_text,
        on_overflow=lambda: overflowed.append(True),
        write_now=broken_write,
        on_write_failure=lambda: failed.append(True),
    )
    writer = asyncio.create_task(outbox.run())
    outbox.put({"index": 0})
    outbox.put({"index": 1})
    await asyncio.sleep(0)
    assert failed == [True] and overflowed == [] and sent == [] and len(outbox) == 0
    writer.cancel()


async def test_what_is_written_through_counts_toward_the_memory_a_connection_held():
    outbox = Outbox(_never_sent, on_overflow=lambda: None, write_now=lambda text: True)
    outbox.put({"data": "x" * 100_000})
    assert outbox.peak_bytes > 100_000 and len(outbox) == 0


async def _never_sent(text):
    raise AssertionError("written through, never queued")

"""The hub's publisher on this machine's real Redis (realtime/thread_hub.py):
each thread's events reach the other processes in order, and the threads'
group sends go out side by side, not one thread after another."""

from __future__ import annotations

import asyncio
import os

from channels_redis.core import RedisChannelLayer

from realtime.thread_hub import ThreadHub, group_name
from realtime.threads import Thread, new_id

REDIS_URL = os.environ.get("CODEX_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def stored_thread() -> Thread:
    return Thread(id=new_id(), model="gpt-test", model_provider="openai", cwd="/tmp", originator="codex_ios")


async def test_a_hub_sends_its_threads_events_side_by_side_and_each_threads_in_order():
    hub = ThreadHub()
    hub.cross_process, hub.layer = True, RedisChannelLayer(hosts=[REDIS_URL])  # whatever this run's layer is
    elsewhere = RedisChannelLayer(hosts=[REDIS_URL])  # another process, following every thread
    far = await elsewhere.new_channel("threads")
    threads = [stored_thread() for _ in range(3)]
    for thread in threads:
        await elsewhere.group_add(group_name(thread.id), far)

    in_flight = most_in_flight = 0
    group_send = hub.layer.group_send

    async def counted_group_send(group, message):
        nonlocal in_flight, most_in_flight
        in_flight += 1
        most_in_flight = max(most_in_flight, in_flight)
        try:
            await group_send(group, message)
        finally:
            in_flight -= 1

    hub.layer.group_send = counted_group_send
    await hub.ensure_started()
    try:
        for delta in "abcde":  # the threads' events interleaved, as fifty streaming turns make them
            for thread in threads:
                hub.publish(thread, "item/agentMessage/delta", {"threadId": thread.id, "delta": delta}, pace_setter=None)
        received: dict[str, list[str]] = {thread.id: [] for thread in threads}
        while sum(map(len, received.values())) < 5 * len(threads):
            message = await asyncio.wait_for(elsewhere.receive(far), 10)
            received[message["thread"]] += [params["delta"] for _, params in message["events"]]
        assert received == {thread.id: list("abcde") for thread in threads}
        assert most_in_flight == len(threads)  # one thread after another, a busy loop sent ten a second
    finally:
        for thread in threads:
            await elsewhere.group_discard(group_name(thread.id), far)
        await hub.stop()
        await elsewhere.close_pools()

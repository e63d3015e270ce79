"""The hub's publisher on this machine's real Redis (realtime/fanout/thread_hub.py):
each thread's events reach the other processes in order, the threads' group
sends go out side by side, not one thread after another, and a thread no
other process follows costs no group send."""

from __future__ import annotations

import asyncio
import os

from codexserver.channel_layers import ResilientRedisChannelLayer, redis_host
from realtime.fanout.thread_hub import ThreadHub, group_name
from realtime.store.threads import Thread, new_id

REDIS_URL = os.environ.get("CODEX_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def stored_thread() -> Thread:
    return Thread(
        id=new_id(), model="gpt-test", model_provider="openai", cwd="/tmp", originator="codex_ios", principal_id=0
    )


def redis_layer() -> ResilientRedisChannelLayer:
    return ResilientRedisChannelLayer(hosts=[redis_host(REDIS_URL)])


def hub_on_redis() -> ThreadHub:
    hub = ThreadHub()
    hub.cross_process, hub.layer = True, redis_layer()  # whatever this run's layer is
    return hub


def count_group_sends(layer) -> dict[str, int]:
    """Wraps the layer's group_send: how many calls, and the most at once."""
    counts = {"calls": 0, "in_flight": 0, "most_in_flight": 0}
    group_send = layer.group_send

    async def counted(group, message):
        counts["calls"] += 1
        counts["in_flight"] += 1
        counts["most_in_flight"] = max(counts["most_in_flight"], counts["in_flight"])
        try:
            await group_send(group, message)
        finally:
            counts["in_flight"] -= 1

    layer.group_send = counted
    return counts


async def test_a_hub_sends_its_threads_events_side_by_side_and_each_threads_in_order():
    hub = hub_on_redis()
    elsewhere = redis_layer()  # another process, following every thread
    far = await elsewhere.new_channel("threads")
    threads = [stored_thread() for _ in range(3)]
    for thread in threads:
        await elsewhere.group_add(group_name(thread.id), far)
    sends = count_group_sends(hub.layer)
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
        assert sends["most_in_flight"] > 1  # one thread after another, a busy loop sent ten a second
    finally:
        for thread in threads:
            await elsewhere.group_discard(group_name(thread.id), far)
        await hub.stop()
        await elsewhere.close_pools()


async def test_a_thread_no_other_process_follows_costs_no_group_send_until_one_joins():
    hub = hub_on_redis()
    await hub.ensure_started()
    elsewhere = redis_layer()
    far = await elsewhere.new_channel("threads")
    thread = stored_thread()
    group = group_name(thread.id)
    await hub.layer.group_add(group, hub.channel)  # a subscriber here
    sends = count_group_sends(hub.layer)
    try:
        hub.publish(thread, "turn/started", {"threadId": thread.id}, pace_setter=None)
        await _published(hub)
        assert sends["calls"] == 0

        await elsewhere.group_add(group, far)  # a subscriber on another process
        hub.publish(thread, "item/agentMessage/delta", {"threadId": thread.id, "delta": "hi"}, pace_setter=None)
        message = await asyncio.wait_for(elsewhere.receive(far), 10)
        assert message["events"] == [["item/agentMessage/delta", {"threadId": thread.id, "delta": "hi"}]]
        assert sends["calls"] == 1
    finally:
        await elsewhere.group_discard(group, far)
        await hub.layer.group_discard(group, hub.channel)
        await hub.stop()
        await elsewhere.close_pools()


async def test_a_drain_reads_the_members_of_all_its_threads_at_once_and_sends_only_to_those_followed():
    hub = hub_on_redis()
    await hub.ensure_started()
    elsewhere = redis_layer()
    far = await elsewhere.new_channel("threads")
    threads = [stored_thread() for _ in range(6)]
    followed = threads[::2]
    for thread in threads:
        await hub.layer.group_add(group_name(thread.id), hub.channel)  # a subscriber here on each
    for thread in followed:
        await elsewhere.group_add(group_name(thread.id), far)  # and one elsewhere on half of them
    sends = count_group_sends(hub.layer)
    reads = []
    groups_with_others = hub.layer.groups_with_others

    async def counted(groups, sender):
        reads.append(sorted(groups))
        return await groups_with_others(groups, sender)

    hub.layer.groups_with_others = counted
    try:
        for thread in threads:  # queued in one go: one drain
            hub.publish(thread, "turn/started", {"threadId": thread.id}, pace_setter=None)
        await _published(hub)
        assert reads == [sorted(group_name(thread.id) for thread in threads)]
        heard = set()
        while len(heard) < len(followed):
            heard.add((await asyncio.wait_for(elsewhere.receive(far), 10))["thread"])
        assert heard == {thread.id for thread in followed}
        assert sends["calls"] == len(followed)
    finally:
        for thread in threads:
            await hub.layer.group_discard(group_name(thread.id), hub.channel)
        for thread in followed:
            await elsewhere.group_discard(group_name(thread.id), far)
        await hub.stop()
        await elsewhere.close_pools()


async def test_members_are_read_per_host_and_a_host_that_is_down_loses_only_its_own_groups():
    sharded = ResilientRedisChannelLayer(hosts=[redis_host(REDIS_URL), redis_host("redis://127.0.0.1:1/0")])  # nothing on :1
    elsewhere = redis_layer()  # another process, on the first host
    far = await elsewhere.new_channel("threads")
    groups: dict[int, list[str]] = {0: [], 1: []}
    while min(map(len, groups.values())) < 2:
        group = group_name(new_id())
        groups[sharded.consistent_hash(group)].append(group)
    followed, alone = groups[0][:2]
    await elsewhere.group_add(followed, far)
    try:
        for _ in range(2):
            membership = await sharded.groups_with_others([*groups[0], *groups[1]], sender="threads.here!1")
            assert membership.followed == {followed} and alone not in membership.followed
            assert set(membership.unread) == set(groups[1])
            # A script cache flushed (a Redis restart, SCRIPT FLUSH): loaded again.
            await sharded.connection(0).script_flush()
    finally:
        await elsewhere.group_discard(followed, far)
        await elsewhere.close_pools()
        await sharded.close_pools()


async def _published(hub: ThreadHub) -> None:
    """Once the publisher has taken and settled everything queued."""
    for _ in range(200):
        await asyncio.sleep(0.01)
        if not hub._outgoing and not hub._publishing:
            return
    raise AssertionError("the publisher never caught up")

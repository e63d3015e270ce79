"""A thread's subscribers (realtime/store/subscriber_set.py): a notification
reaches each member once, a leaver hears nothing more, and a connection that
was collected without leaving is neither kept alive nor sent to."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest

from realtime.fanout.thread_hub import deliver
from realtime.store.subscriber_set import SubscriberSet
from realtime.store.threads import Thread, new_id


class Outbox:
    overloaded = False


class Listener:
    def __init__(self) -> None:
        self.outbox = Outbox()
        self.heard: list[str] = []

    def notify(self, method: str, params: dict) -> None:
        self.heard.append(method)


def a_thread() -> Thread:
    return Thread(id=new_id(), model="m", model_provider="openai", cwd="/tmp", originator="codex_ios", principal_id=0)


def test_a_notification_reaches_each_member_once_and_a_leaver_no_more():
    thread = a_thread()
    first, second = Listener(), Listener()
    thread.subscribers.add(first)
    thread.subscribers.add(second)
    thread.subscribers.add(first)  # twice: still one member
    deliver(thread, "turn/started", {}, pace_setter=first)
    thread.subscribers.discard(second)
    deliver(thread, "turn/completed", {}, pace_setter=first)
    assert first.heard == ["turn/started", "turn/completed"]
    assert second.heard == ["turn/started"]
    assert len(thread.subscribers) == 1 and first in thread.subscribers and second not in thread.subscribers
    assert [subscriber() for subscriber in thread.subscribers.refs] == [first]


def test_a_member_collected_without_leaving_is_not_kept_alive_nor_sent_to():
    thread = a_thread()
    kept, dropped = Listener(), Listener()
    thread.subscribers.add(kept)
    thread.subscribers.add(dropped)
    gone = weakref.ref(dropped)
    del dropped
    gc.collect()
    assert gone() is None  # the set and its walk list hold it weakly
    deliver(thread, "turn/started", {}, pace_setter=kept)
    assert kept.heard == ["turn/started"]
    assert len(thread.subscribers) == 1


def test_a_walk_is_a_snapshot_whoever_joins_or_leaves_during_it():
    thread = a_thread()
    late = Listener()

    class Changer(Listener):
        def notify(self, method: str, params: dict) -> None:
            super().notify(method, params)
            thread.subscribers.add(late)  # joins during the walk: hears the next one
            thread.subscribers.discard(leaver)  # leaves during it: was in the snapshot, heard it

    changer, leaver = Changer(), Listener()
    thread.subscribers.add(changer)
    thread.subscribers.add(leaver)
    deliver(thread, "turn/started", {}, pace_setter=changer)
    deliver(thread, "turn/completed", {}, pace_setter=changer)
    assert changer.heard == ["turn/started", "turn/completed"]
    assert leaver.heard == ["turn/started"]
    assert late.heard == ["turn/completed"]


def test_an_empty_set_is_false_and_a_copy_is_refused():
    subscribers = SubscriberSet()
    assert not subscribers and subscribers.refs == ()
    for copied in (copy.copy, copy.deepcopy):
        with pytest.raises(TypeError, match="not copied"):
            copied(subscribers)

"""A thread's history kept by the process that ran its last turn
(realtime/store/history_cache.py): its next turn here reads none back, and
a turn of it anywhere else in between makes that turn read it again."""

from __future__ import annotations

import json

import pytest
from channels.db import database_sync_to_async

from identity.principals import local_principal
from realtime.fanout.thread_hub import EVENTS, thread_hub
from realtime.models import StoredTurn
from realtime.store import turn_writes
from realtime.store.history_cache import HistoryCache, history_cache
from realtime.store.thread_store import DatabaseThreads
from realtime.store.threads import COMPLETED, History, ItemRecord, Turn, new_id, now_ms
from tests.test_early_stream import until

pytestmark = pytest.mark.django_db(transaction=True)
BOUND_OF_TESTS = 4 * 1024 * 1024  # CODEX_MAX_HISTORY_BYTES, as the tests run


def requests_of(upstream, thread: str) -> list[list]:
    return [r.body["input"] for r in upstream.model_requests() if r.headers.get("session-id") == thread]


def texts(model_input: list) -> list[str]:
    return [part["text"] for item in model_input if item.get("role") == "user" for part in item["content"]]


@pytest.fixture
def history_reads(monkeypatch) -> list[int]:
    """How many threads each batch read the history of."""
    reads = []
    real = turn_writes._histories_later

    def counted(taken):
        if taken:
            reads.append(len(taken))
        return real(taken)

    monkeypatch.setattr(turn_writes, "_histories_later", counted)
    return reads


async def test_a_threads_next_turn_here_replays_its_history_without_reading_it(connect, upstream, history_reads):
    client = await connect()
    await client.initialize("codex_ios", "1.4.0")
    thread = await client.start_thread()
    for text in ("one", "two", "three"):
        await client.run_turn(thread, text)
    first, second, third = requests_of(upstream, thread)
    assert history_reads == [1]  # the first turn's: nothing was kept for the thread yet
    # Each replays every earlier turn, the model's replies included, as a read would have.
    assert second[: len(first)] == first and third[: len(second)] == second
    assert texts(third) == ["one", "two", "three"]
    kept = history_cache().get(thread, BOUND_OF_TESTS).history
    stored = await database_sync_to_async(
        lambda: [
            item
            for model_input in StoredTurn.objects.filter(thread__thread_id=thread, input_bytes__gt=0)
            .order_by("sequence")
            .values_list("model_input", flat=True)
            for item in model_input
        ]
    )()
    assert json.loads(kept.text) == stored and len(stored) == 6  # three messages, three replies


async def test_a_turn_of_the_thread_on_another_process_makes_the_next_start_here_read_it(
    connect, upstream, history_reads
):
    client = await connect()
    await client.initialize("codex_ios", "1.4.0")
    thread_id = await client.start_thread()
    await client.run_turn(thread_id, "here")
    # Another process (its own Thread object, its own writes) runs a turn of the thread.
    elsewhere, _ = await DatabaseThreads.load(thread_id, await database_sync_to_async(lambda: local_principal().pk)())
    turn = Turn(new_id(), originator="codex_vscode", connection_id=str(new_id()))
    turn.items.append(ItemRecord({"id": new_id(), "type": "userMessage", "content": []}, now_ms(), now_ms()))
    assert await DatabaseThreads.begin_turn(elsewhere, turn, "elsewhere", 30, 1 << 20, None) is not None
    turn.remember_input([{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "there"}]}])
    turn.finish(COMPLETED, None)
    await DatabaseThreads.finish_turn(elsewhere, turn, 1)
    history_reads.clear()

    await client.run_turn(thread_id, "here again")
    assert history_reads == [1]
    sent = [texts(body) for body in requests_of(upstream, thread_id)]
    assert ["here", "there", "here again"] in sent  # the turn's own, with what the start read
    # (and perhaps an early one, with what was kept, cut: see test_early_stream)
    await client.run_turn(thread_id, "and once more")  # kept again, with the other process's turn
    assert history_reads == [1]
    assert texts(requests_of(upstream, thread_id)[-1]) == ["here", "there", "here again", "and once more"]


async def test_a_turn_whose_end_was_lost_leaves_nothing_kept(connect, upstream, monkeypatch, caplog):
    client = await connect()
    await client.initialize("codex_ios", "1.4.0")
    thread = await client.start_thread()
    await client.run_turn(thread, "kept")
    assert history_cache().get(thread, BOUND_OF_TESTS) is not None

    def lost(thread_, turn, first_new_item):
        raise turn_writes.TurnLost(f"turn {turn.id} lost its thread's lock")

    monkeypatch.setattr(DatabaseThreads, "finish_turn", staticmethod(lost))
    await client.request("turn/start", {"threadId": thread, "input": [{"type": "text", "text": "lost"}]})
    await until(lambda: "its end is the one already told" in caplog.text)  # the lost end, handled
    assert history_cache().get(thread, BOUND_OF_TESTS) is None


def history(*texts_and_sizes: tuple[str, int]) -> History:
    return History.within(texts_and_sizes, 1 << 20)


BOUND = 1 << 20


def test_the_cache_is_bounded_in_bytes_least_recently_used_first_out():
    entry = history(("[" + "1" * 700 + "]", 702))
    one = HistoryCache(max_bytes=1 << 20)
    one.remember("x", 1, entry, BOUND)
    cache = HistoryCache(max_bytes=3 * one.size + 10)  # three of these entries fit, not four
    for thread in ("a", "b", "c"):
        cache.remember(thread, 1, entry, BOUND)
    assert cache.get("a", BOUND) is not None  # a is now the most recently used
    cache.remember("d", 1, entry, BOUND)
    assert [thread for thread in "abcd" if cache.get(thread, BOUND) is not None] == ["a", "c", "d"]
    assert cache.size <= cache.max_bytes
    cache.remember("huge", 1, history(("[" + "1" * 5_000 + "]", 5_002)), BOUND)  # larger than all of it: not kept
    assert cache.get("huge", BOUND) is None and cache.get("a", BOUND) is not None


def test_text_past_latin_1_is_counted_as_the_memory_it_takes():
    cache = HistoryCache(max_bytes=1 << 20)
    cache.remember("ascii", 1, history(('["' + "a" * 10_000 + '"]', 10_004)), BOUND)
    ascii_cost = cache.size
    cache.forget("ascii")
    cache.remember("emoji", 1, history(('["' + "😀" * 10_000 + '"]', 10_004)), BOUND)  # as PostgreSQL's jsonb gives it
    assert cache.size > 3.5 * ascii_cost


def test_an_older_turns_history_never_replaces_a_newer_ones_nor_another_bounds():
    cache = HistoryCache(max_bytes=1 << 20)
    cache.remember("t", 5, history(("[5]", 3)), BOUND)
    cache.remember("t", 4, history(("[4]", 3)), BOUND)
    assert cache.get("t", BOUND).sequence == 5
    assert cache.get("t", BOUND // 2) is None  # kept within another CODEX_MAX_HISTORY_BYTES
    cache.forget("t")
    assert cache.get("t", BOUND) is None and cache.size == 0


def test_a_turn_added_keeps_the_newest_whole_turns_within_the_bound_as_the_database_does():
    earlier = history(("[2]", 3), ("[]", 2), ("[1, 1.5]", 8))
    assert earlier.text == "[1, 1.5, 2]"
    assert earlier.then("[]", 0, BOUND) is earlier  # a turn with no input adds nothing
    assert earlier.then('[3, "x"]', 8, 13).text == '[2, 3, "x"]'  # 8 + 3 + 2 fit; the next 8 do not
    assert earlier.then('[3, "x"]', 8, 13).then("[4]", 3, 13).text == '[3, "x", 4]'
    assert earlier.then("[3]", 3, 2).text == "[]"  # the newest alone is past the bound
    for bound in range(0, 30):  # whatever the bound, the same as bounding every turn from scratch
        grown = History.within([("[0]", 3)], bound)
        for items, size in (("[1]", 3), ("[]", 2), ("[22]", 4), ("[]", 0), ("[3, 4]", 6)):
            grown = grown.then(items, size, bound)
        fresh = History.within([("[3, 4]", 6), ("[22]", 4), ("[]", 2), ("[1]", 3), ("[0]", 3)], bound)
        assert grown == fresh, bound
        assert [grown.text[start:end] for start, end, _ in grown.turns] == ["3, 4", "22", "", "1", "0"][: len(grown.turns)]


async def test_hearing_another_process_start_a_turn_of_the_thread_drops_what_was_kept(connect, upstream):
    client = await connect()
    await client.initialize("codex_ios", "1.4.0")
    thread = await client.start_thread()
    await client.run_turn(thread, "kept")
    assert history_cache().get(thread, BOUND_OF_TESTS) is not None
    hub = thread_hub()
    # As the channel layer delivers another process's events of the thread.
    started = {"threadId": thread, "turn": Turn(new_id(), originator="codex_vscode", connection_id=str(new_id())).to_json()}
    hub._dispatch({"type": EVENTS, "origin": "elsewhere", "thread": thread, "events": [["turn/started", started]]})
    assert history_cache().get(thread, BOUND_OF_TESTS) is None
    assert (await client.run_turn(thread, "read again"))["turn"]["status"] == "completed"

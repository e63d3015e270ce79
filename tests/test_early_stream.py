"""A stored thread's turn sends its first model request while its start is
still being written (realtime/turns/early_stream.py), and nothing of it
reaches anyone before the start took the thread's lock."""

from __future__ import annotations

import asyncio
import threading

import pytest
from channels.db import database_sync_to_async

from identity.principals import local_principal
from realtime.store import loop_writers, turn_writes
from realtime.store.thread_store import DatabaseThreads
from realtime.store.threads import ItemRecord, Turn, new_id, now_ms
from realtime.turns import early_stream
from realtime.turns.runner import background_endings_finished

pytestmark = pytest.mark.django_db(transaction=True)


def requests_of(upstream, thread: str, kind: str = "http") -> list:
    return [r for r in upstream.requests("/responses") if r.kind == kind and r.headers.get("session-id") == thread]


def user_texts(record) -> list[str]:
    return [part["text"] for item in record.body["input"] if item.get("role") == "user" for part in item["content"]]


async def until(predicate, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


@pytest.fixture
def held_starts(monkeypatch) -> threading.Event:
    """While cleared, a batch with a turn's start waits (a slow database)."""
    go = threading.Event()
    go.set()
    write = turn_writes.write_turns

    def slow_starts(writes):
        if any(isinstance(each, turn_writes.BeginTurn) for each in writes):
            go.wait(10)
        return write(writes)

    monkeypatch.setattr(turn_writes, "write_turns", slow_starts)
    for writer in (loop_writers.PostgresOnLoop, loop_writers.SqliteOnLoop):  # the batches written on the loop
        monkeypatch.setattr(writer, "write", slow_starts_on_loop(writer.write, go))
    return go


def slow_starts_on_loop(write, go: threading.Event):
    async def slow_starts(self, writes):
        if any(isinstance(each, turn_writes.BeginTurn) for each in writes):
            await asyncio.to_thread(go.wait, 10)
        return await write(self, writes)

    return slow_starts


@pytest.fixture
async def kept(connect, held_starts) -> tuple:
    """A client and a thread whose history this process keeps: the thread's
    next turn sends its first request early. What its first turn said is put
    aside. (After ``held_starts``: the turn writes' queue takes its writer
    function when first used.)"""
    client = await connect()
    await client.initialize("codex_ios", "1.4.0")
    thread = await client.start_thread()
    await client.run_turn(thread, "one")
    await client.notification("thread/status/changed", status={"type": "idle"})
    client.inbox.clear()
    return client, thread


async def send_start(client, thread: str, text: str, request_id: int) -> None:
    """``turn/start``, its reply left to read in order with the rest."""
    await client.send(
        {
            "id": request_id,
            "method": "turn/start",
            "params": {"threadId": thread, "input": [{"type": "text", "text": text}]},
        }
    )


async def test_the_first_request_goes_out_while_the_start_is_written_and_is_told_only_after(
    kept, upstream, held_starts
):
    client, thread = kept
    held_starts.clear()
    await send_start(client, thread, "two", 99)
    await until(lambda: len(requests_of(upstream, thread)) == 2)  # sent while the start waits on the database
    assert user_texts(requests_of(upstream, thread)[1]) == ["one", "two"]
    await asyncio.sleep(0.2)  # its whole reply has come back by now
    assert client.inbox == []  # and nobody heard a word of it, nor the reply
    held_starts.set()

    heard = []
    while not heard or heard[-1] != "turn/completed":
        message = await client.receive()
        heard.append(message.get("method") or f"reply {message['id']}")
    assert heard[:2] == ["reply 99", "turn/started"]
    assert heard.count("item/agentMessage/delta") == 2  # "Hello", " world": once
    assert len(requests_of(upstream, thread)) == 2


async def another_process_holds_the_lock(thread_id: str) -> None:
    principal = await database_sync_to_async(lambda: local_principal().pk)()
    elsewhere, _ = await DatabaseThreads.load(thread_id, principal)
    turn = Turn(new_id(), originator="codex_vscode", connection_id=str(new_id()))
    turn.items.append(ItemRecord({"id": new_id(), "type": "userMessage", "content": []}, now_ms(), now_ms()))
    assert await DatabaseThreads.begin_turn(elsewhere, turn, "elsewhere", 30, 1 << 20, None) is not None


async def test_a_start_refused_by_another_processs_turn_cuts_its_request_at_once(kept, upstream, held_starts):
    client, thread = kept
    await another_process_holds_the_lock(thread)
    held_starts.clear()
    start = asyncio.ensure_future(
        client.request("turn/start", {"threadId": thread, "input": [{"type": "text", "text": "slow:50"}]})
    )
    await until(lambda: len(requests_of(upstream, thread)) == 2)
    held_starts.set()
    assert (await start)["error"] == {"code": -32600, "message": "Turn already in progress"}
    await until(lambda: len(requests_of(upstream, thread, "closed")) == 1, timeout=2)  # not its 5 s of deltas
    await asyncio.sleep(0.2)
    assert client.inbox == []  # not one delta of it reached the client


async def test_a_request_the_start_does_not_confirm_is_cut_and_sent_again(kept, upstream, held_starts):
    client, thread = kept
    # Another process changes the thread's model: this one learns it from the start's batch.
    principal = await database_sync_to_async(lambda: local_principal().pk)()
    elsewhere, _ = await DatabaseThreads.load(thread, principal)
    await DatabaseThreads.set_model(elsewhere, "gpt-other")
    held_starts.clear()
    await send_start(client, thread, "slow:10", 5)
    await until(lambda: len(requests_of(upstream, thread)) == 2)
    held_starts.set()
    completed = await client.notification("turn/completed")
    assert completed["turn"]["status"] == "completed"
    early, sent = requests_of(upstream, thread)[1:]
    assert (early.body["model"], sent.body["model"]) == ("gpt-5-codex", "gpt-other")
    await until(lambda: len(requests_of(upstream, thread, "closed")) == 1)  # the early one, cut
    deltas = [m for m in client.inbox if m.get("method") == "item/agentMessage/delta"]
    assert [m["params"]["delta"] for m in deltas] == [f"d{i} " for i in range(10)]  # the second request's, once


async def test_interrupting_a_turn_whose_request_went_out_early_closes_its_stream(kept, upstream, held_starts):
    client, thread = kept
    held_starts.clear()
    start = asyncio.ensure_future(
        client.call("turn/start", {"threadId": thread, "input": [{"type": "text", "text": "slow:50"}]})
    )
    await until(lambda: len(requests_of(upstream, thread)) == 2)  # early: while the start waits
    held_starts.set()
    started = await start
    await client.notification("item/agentMessage/delta")
    await client.call("turn/interrupt", {"threadId": thread, "turnId": started["turn"]["id"]})
    completed = await client.notification("turn/completed")
    assert completed["turn"]["status"] == "interrupted"
    await until(lambda: len(requests_of(upstream, thread, "closed")) == 1, timeout=2)
    assert len(requests_of(upstream, thread)) == 2  # the early one, taken over by the turn: not sent twice


async def test_a_client_leaving_while_its_start_is_written_cuts_the_request(kept, connect, upstream, held_starts):
    client, thread = kept
    held_starts.clear()
    await send_start(client, thread, "slow:50", 7)
    await until(lambda: len(requests_of(upstream, thread)) == 2)
    threading.Timer(0.3, held_starts.set).start()  # (the server's disconnect waits for the batch in flight)
    await client.communicator.disconnect()
    await until(lambda: len(requests_of(upstream, thread, "closed")) == 1, timeout=2)
    # The lock the start took once its batch committed is freed: the thread is not left busy.
    await turn_writes.flushed()  # the start's batch, then the end it leaves behind
    await background_endings_finished()
    other = await connect()
    await other.initialize("codex_vscode", "1.0.0")
    await other.call("thread/resume", {"threadId": thread})
    assert (await other.run_turn(thread, "after"))["turn"]["status"] == "completed"


async def test_a_retry_and_a_failure_of_the_early_request_are_told_as_the_turns_own(
    kept, upstream, caplog, held_starts
):
    client, thread = kept
    held_starts.clear()
    completing = asyncio.ensure_future(client.run_turn(thread, "fail:500x1"))  # fails once, then streams
    await until(lambda: len(requests_of(upstream, thread)) == 3)  # both tries, while the start waits
    held_starts.set()
    completed = await completing
    assert completed["turn"]["status"] == "completed"
    heard = [m.get("method") for m in client.inbox]
    assert heard.index("turn/started") < heard.index("error")  # its willRetry error, after the turn was told
    assert [m["params"]["willRetry"] for m in client.inbox if m.get("method") == "error"] == [True]
    client.inbox.clear()
    failed = await client.run_turn(thread, "fail:401")
    assert failed["turn"]["status"] == "failed"
    assert failed["turn"]["error"]["codexErrorInfo"] == "unauthorized"
    assert "failed" not in " ".join(r.getMessage() for r in caplog.records if r.levelname == "ERROR")


async def test_a_reply_longer_than_what_is_held_arrives_whole_and_in_order_after_the_start(
    kept, upstream, held_starts, monkeypatch
):
    """The early request holds at most HELD_EVENTS events while the start is
    written; its reader then waits until the turn takes some, and every
    event comes in order, none lost or doubled, after the turn's start."""
    monkeypatch.setattr(early_stream, "HELD_EVENTS", 4)  # the reader waits, and is woken, many times
    client, thread = kept
    held_starts.clear()
    deltas = 50
    await send_start(client, thread, f"numbered:{deltas}", 98)
    await until(lambda: len(requests_of(upstream, thread)) == 2)
    await asyncio.sleep(0.2)  # the reader holds what it may, and waits
    assert client.inbox == []
    held_starts.set()
    completed = await client.notification("turn/completed", timeout=10)
    assert completed["turn"]["status"] == "completed"
    heard = [m.get("method") or f"reply {m['id']}" for m in client.inbox]
    assert heard[:2] == ["reply 98", "turn/started"]
    said = [m["params"]["delta"] for m in client.inbox if m.get("method") == "item/agentMessage/delta"]
    assert said == [f"{i} " for i in range(deltas)]

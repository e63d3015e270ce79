"""Turn writes in batches (realtime/store/turn_writes.py): what one batch decides
must be what the writes one at a time would have decided."""

from __future__ import annotations

import asyncio
import json

import pytest
from channels.db import database_sync_to_async
from django.db import IntegrityError as DjangoIntegrityError
from django.db import connection

from identity.principals import local_principal
from realtime.models import StoredThread, StoredTurn
from realtime.store import loop_writers, turn_writes
from realtime.store.thread_store import DatabaseThreads
from realtime.store.threads import COMPLETED, INTERRUPTED, ItemRecord, Thread, Turn, new_id, now_ms

pytestmark = pytest.mark.django_db(transaction=True)

TEXT = [{"type": "text", "text": "hi"}]


OWNER: dict[str, int] = {}  # the principal every thread here belongs to, made for each test

# Every test here runs its batches as the server writes them, by the event
# loop on one connection (on PostgreSQL with the statements prepared from
# their first run, and bound in the client), and as a row writer does (the
# loop's SQLite writer, when it finds the database locked; any database,
# where libpq is older than 14). The loop's writer must not hand them on.
ON_POSTGRESQL = connection.vendor == "postgresql"
on_postgresql = pytest.mark.skipif(not ON_POSTGRESQL, reason="PostgreSQL's session")
WRITERS = ["loop, prepared", "loop, bound", "row writer"] if ON_POSTGRESQL else ["loop", "row writer"]
WRITER: dict[str, str] = {}


@pytest.fixture(autouse=True, params=WRITERS)
def batch_writer(request, settings, monkeypatch):
    WRITER["kind"] = request.param
    settings.CODEX_DB_PREPARED_STATEMENTS = request.param != "loop, bound"
    monkeypatch.setattr(loop_writers, "PREPARE_THRESHOLD", 0)
    handed: list = []

    async def handed_on(writes):
        handed.append(writes)
        raise AssertionError("the loop's writer handed a batch to a row writer")

    monkeypatch.setattr(loop_writers, "on_a_row_writer", handed_on)
    writer = loop_writers.PostgresOnLoop() if ON_POSTGRESQL else loop_writers.SqliteOnLoop()
    WRITER["writer"] = writer
    yield
    writer.close()
    assert not handed, "the loop's writer handed batches to a row writer"


@pytest.fixture(autouse=True)
def owner(transactional_db):
    OWNER["id"] = local_principal().pk


def new_thread() -> Thread:
    return Thread(
        id=new_id(), model="gpt-test", model_provider="openai", cwd="/tmp", originator="codex_ios", principal_id=OWNER["id"]
    )


def new_turn(text: str = "hi") -> Turn:
    turn = Turn(new_id(), originator="codex_ios", connection_id="00000000-0000-0000-0000-000000000001")
    started = now_ms()
    turn.items.append(ItemRecord({"id": new_id(), "type": "userMessage", "content": TEXT}, started, started))
    return turn


def ended(turn: Turn, words: str) -> Turn:
    turn.remember_input([{"type": "message", "role": "user", "content": [{"type": "input_text", "text": words}]}])
    turn.usage = {"inputTokens": 10, "cachedInputTokens": 0, "outputTokens": 5, "reasoningOutputTokens": 0, "totalTokens": 15}
    turn.finish(COMPLETED, None)
    return turn


async def write_in_one_batch(writes: list) -> list:
    if WRITER["kind"] == "row writer":
        return await database_sync_to_async(turn_writes.write_turns)(writes)
    return await WRITER["writer"].write(writes)


def begin(thread: Thread, turn: Turn) -> turn_writes.BeginTurn:
    return turn_writes.BeginTurn(thread, turn, "channel", 30, 1 << 20, None)


async def test_two_starts_of_one_thread_in_one_batch_take_the_lock_once():
    thread = new_thread()
    await DatabaseThreads.create(thread)
    first, second = new_turn(), new_turn()
    outcomes = await write_in_one_batch([begin(thread, first), begin(thread, second)])
    assert (outcomes[0][0].text, outcomes[0][1]) == ("[]", "gpt-test") and outcomes[1] is None
    assert await DatabaseThreads.running_turn(thread) == (first.id, "channel")


async def test_an_end_and_the_next_start_in_one_batch_find_the_thread_free_and_the_history_written():
    thread = new_thread()
    await DatabaseThreads.create(thread)
    first = new_turn()
    await DatabaseThreads.begin_turn(thread, first, "channel", 30, 1 << 20, None)
    second = new_turn()
    begun, totals = await write_in_one_batch(
        [begin(thread, second), turn_writes.FinishTurn(thread, ended(first, "earlier words"), 1)]
    )
    assert totals["totalTokens"] == 15
    history, *_ = begun
    assert json.loads(history.text) == json.loads(first.model_input)  # the end, written first in the batch, is replayed
    # Stored from its text as JSON, not as a JSON string: the ORM reads the items.
    stored = await database_sync_to_async(lambda: StoredTurn.objects.get(turn_id=first.id).model_input)()
    assert stored == json.loads(first.model_input)


async def test_a_write_that_fails_fails_alone_and_its_batch_is_written():
    good_thread, thread_gone = new_thread(), new_thread()  # the second was never stored
    await DatabaseThreads.create(good_thread)
    turn = new_turn()
    never_begun = ended(new_turn(), "lost")
    outcomes = await write_in_one_batch(
        [begin(good_thread, turn), turn_writes.FinishTurn(thread_gone, never_begun, 1), begin(thread_gone, new_turn())]
    )
    assert (outcomes[0][0].text, outcomes[0][1]) == ("[]", "gpt-test")
    assert isinstance(outcomes[1], turn_writes.NotStored)
    assert outcomes[2] is None  # no such thread: nothing to lock
    assert await DatabaseThreads.running_turn(good_thread) == (turn.id, "channel")


async def test_a_lapsed_lock_is_taken_over_in_a_batch_and_its_turn_ends_interrupted():
    thread = new_thread()
    await DatabaseThreads.create(thread)
    dead = new_turn()
    await write_in_one_batch([turn_writes.BeginTurn(thread, dead, "gone", -1, 1 << 20, None)])  # lapsed at once
    taker = new_turn()
    (begun,) = await write_in_one_batch([begin(thread, taker)])
    assert begun[3] == (dead.id, "gone")  # whose end the taker's subscribers are to hear, and where it ran
    statuses = dict(
        await database_sync_to_async(
            lambda: list(StoredTurn.objects.filter(thread__thread_id=thread.id).values_list("turn_id", "status"))
        )()
    )
    assert statuses == {dead.id: INTERRUPTED, taker.id: "inProgress"}


async def test_a_turn_stored_by_the_earlier_code_is_replayed():
    # Before history stayed text, Django's JSONField encoded the list itself.
    thread = new_thread()
    await DatabaseThreads.create(thread)
    earlier = new_turn()
    await DatabaseThreads.begin_turn(thread, earlier, "channel", 30, 1 << 20, None)
    await DatabaseThreads.finish_turn(thread, ended(earlier, "placeholder"), 1)
    items = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "héllo ☃ 😀"}]}]
    await database_sync_to_async(
        lambda: StoredTurn.objects.filter(turn_id=earlier.id).update(model_input=items, input_bytes=70)
    )()
    history, *_ = await DatabaseThreads.begin_turn(thread, new_turn(), "channel", 30, 1 << 20, None)
    assert json.loads(history.text) == items


async def test_history_is_bounded_newest_first_across_threads_of_one_batch():
    short, long = new_thread(), new_thread()
    for thread in (short, long):
        await DatabaseThreads.create(thread)
    for thread, words in ((short, ["a"]), (long, ["one", "two", "three"])):
        for word in words:
            turn = new_turn()
            await DatabaseThreads.begin_turn(thread, turn, "channel", 30, 1 << 20, None)
            await DatabaseThreads.finish_turn(thread, ended(turn, word), 1)
    bound = 2 * len(ended(new_turn(), "three").model_input)  # the two newest of the long thread fit, not the third
    outcomes = await write_in_one_batch(
        [turn_writes.BeginTurn(thread, new_turn(), "channel", 30, bound, None) for thread in (short, long)]
    )
    texts = [[item["content"][0]["text"] for item in json.loads(history.text)] for history, *_ in outcomes]
    assert texts == [["a"], ["two", "three"]]
    assert await database_sync_to_async(lambda: StoredThread.objects.filter(running_turn_id__isnull=False).count())() == 2


async def test_two_clients_starting_a_turn_of_one_thread_at_once_run_one(connect):
    first, second = await connect(), await connect()
    await first.initialize("codex_ios", "1.4.0")
    await second.initialize("codex_vscode", "1.0.0")
    thread = await first.start_thread()
    await second.call("thread/resume", {"threadId": thread})
    start = {"threadId": thread, "input": [{"type": "text", "text": "slow:20"}]}
    answers = await asyncio.gather(first.request("turn/start", start), second.request("turn/start", start))
    refused = [answer["error"] for answer in answers if "error" in answer]
    assert refused == [{"code": -32600, "message": "Turn already in progress"}]


async def test_when_a_batch_is_retried_write_by_write_ends_still_go_before_starts():
    thread = new_thread()
    await DatabaseThreads.create(thread)
    first = new_turn()
    await DatabaseThreads.begin_turn(thread, first, "channel", 30, 1 << 20, None)
    second, stray = new_turn(), ended(new_turn(), "never begun")
    begun, totals, refused = await write_in_one_batch(
        [begin(thread, second), turn_writes.FinishTurn(thread, ended(first, "words"), 1), turn_writes.FinishTurn(thread, stray, 1)]
    )
    assert begun is not None and totals["totalTokens"] == 15
    assert isinstance(refused, turn_writes.NotStored)


def test_a_database_fault_fails_the_batch_once_instead_of_retrying_each_write(monkeypatch):
    from django.db import OperationalError

    calls = []

    def database_locked(writes):
        calls.append(len(writes))
        raise OperationalError("database is locked")

    monkeypatch.setattr(turn_writes, "_write", database_locked)
    outcomes = turn_writes.write_turns([begin(new_thread(), new_turn()) for _ in range(3)])
    assert calls == [3]  # each alone would wait for the same lock again, and the process behind them
    assert all(isinstance(outcome, OperationalError) for outcome in outcomes)


async def test_new_threads_are_created_in_a_batch_and_a_duplicate_fails_alone():
    from django.db import IntegrityError

    existing, fresh = new_thread(), new_thread()
    await DatabaseThreads.create(existing)
    outcomes = await write_in_one_batch([turn_writes.CreateThread(existing), turn_writes.CreateThread(fresh)])
    assert isinstance(outcomes[0], IntegrityError) and outcomes[1] is None
    stored, running = await DatabaseThreads.load(fresh.id, fresh.principal_id)
    assert not running and stored.model == "gpt-test" and stored.preview == ""
    assert abs(stored.created_at - fresh.created_at) < 0.001 and stored.updated_at == stored.created_at


async def test_a_write_refused_late_in_its_batch_takes_back_all_it_wrote_and_nothing_of_the_others():
    """On PostgreSQL a batch is one pipeline: a refused row is reported only
    at its end, after every statement went out. Nothing of the failed attempt
    stays."""
    from django.db import IntegrityError

    good, other = new_thread(), new_thread()
    for thread in (good, other):
        await DatabaseThreads.create(thread)
    earlier = new_turn()
    await DatabaseThreads.begin_turn(other, earlier, "channel", 30, 1 << 20, None)
    await DatabaseThreads.finish_turn(other, ended(earlier, "done"), 1)
    reused = Turn(earlier.id, originator="codex_ios", connection_id=earlier.connection_id)  # its row exists
    turn = new_turn()
    outcomes = await write_in_one_batch([begin(good, turn), begin(other, reused)])
    assert outcomes[0] is not None and isinstance(outcomes[1], IntegrityError)
    assert await DatabaseThreads.running_turn(good) == (turn.id, "channel")
    assert await DatabaseThreads.running_turn(other) is None  # the lock went back with the refused row
    turns = await database_sync_to_async(
        lambda: sorted(StoredTurn.objects.filter(thread__thread_id__in=[good.id, other.id]).values_list("turn_id", flat=True))
    )()
    assert turns == sorted([turn.id, earlier.id])


async def test_a_batch_committed_but_not_read_back_fails_once_and_is_not_written_again(monkeypatch):
    """Its writes are stored: written again one by one they would be refused
    or find their own locks held."""
    threads = [new_thread(), new_thread()]
    await write_in_one_batch([turn_writes.CreateThread(thread) for thread in threads])
    calls = []
    histories = turn_writes._histories_later

    def unreadable(taken):
        yield from histories(taken)
        calls.append(len(taken))
        return lambda: {}  # as if no history came back

    monkeypatch.setattr(turn_writes, "_histories_later", unreadable)
    turns = [new_turn(), new_turn()]
    outcomes = await write_in_one_batch([begin(thread, turn) for thread, turn in zip(threads, turns)])
    assert all(isinstance(outcome, turn_writes.WrittenButUnread) for outcome in outcomes)
    assert calls == [2]  # the batch, not each write again
    stored = database_sync_to_async(lambda: StoredTurn.objects.filter(turn_id__in=[turn.id for turn in turns]).count())
    assert await stored() == 2


async def test_the_sweep_frees_a_lapsed_lock_whose_turn_had_already_ended_and_announces_nothing():
    """A thread row can still name a turn whose end was stored (the turn lost
    its lock, say): the sweep frees the thread and has no end to tell."""
    from realtime.store.thread_store import end_abandoned_turns

    thread = new_thread()
    await DatabaseThreads.create(thread)
    turn = new_turn()
    await write_in_one_batch([turn_writes.BeginTurn(thread, turn, "gone", -1, 1 << 20, None)])  # lapsed at once
    await database_sync_to_async(lambda: StoredTurn.objects.filter(turn_id=turn.id).update(status=COMPLETED))()
    assert await end_abandoned_turns() == []
    assert await DatabaseThreads.running_turn(thread) is None


async def statuses_of(thread: Thread) -> dict[str, str]:
    return dict(
        await database_sync_to_async(
            lambda: list(StoredTurn.objects.filter(thread__thread_id=thread.id).values_list("turn_id", "status"))
        )()
    )


async def tokens_used() -> int:
    return (await DatabaseThreads.usage_and_budget(OWNER["id"]))[0]


async def test_a_turn_that_lost_its_lock_to_a_takeover_cannot_write_its_end_over_the_interrupted_one():
    """Issue 24, 2 and 6: its process was stopped past its lease; another took
    the thread over and stored it interrupted. Waking, it finishes: refused,
    so nobody is told a second outcome; its tokens still count toward its
    principal's budget."""
    thread = new_thread()
    await DatabaseThreads.create(thread)
    sleeper = new_turn()
    (begun,) = await write_in_one_batch([turn_writes.BeginTurn(thread, sleeper, "stopped", -1, 1 << 20, None)])
    sleeper.row_id = begun[2]
    taker = new_turn()
    await write_in_one_batch([begin(thread, taker)])
    used = await tokens_used()

    (outcome,) = await write_in_one_batch([turn_writes.FinishTurn(thread, ended(sleeper, "woke up"), 1)])

    assert isinstance(outcome, turn_writes.TurnLost)
    assert await statuses_of(thread) == {sleeper.id: INTERRUPTED, taker.id: "inProgress"}
    assert await DatabaseThreads.running_turn(thread) == (taker.id, "channel")  # the taker keeps its lock
    assert await tokens_used() == used + 15  # spent upstream all the same: counted toward the budget, once
    stored = await DatabaseThreads.turn(sleeper.id)
    assert [record.item["type"] for record in stored.items] == ["userMessage"]  # none of its output


async def test_an_end_written_again_after_its_reply_was_lost_is_not_written_twice():
    thread = new_thread()
    await DatabaseThreads.create(thread)
    turn = new_turn()
    (begun,) = await write_in_one_batch([begin(thread, turn)])
    turn.row_id = begun[2]
    end = turn_writes.FinishTurn(thread, ended(turn, "once"), 1)
    (first,) = await write_in_one_batch([end])
    (again,) = await write_in_one_batch([end])  # the first batch's reply never came back
    assert first == again and first["totalTokens"] == 15
    assert await tokens_used() == 15  # counted once
    assert await statuses_of(thread) == {turn.id: COMPLETED}


async def test_turns_are_numbered_by_the_database_and_replayed_in_that_order_whatever_the_hosts_clocks_say():
    """Issue 24, 4: the second turn ran on a host whose clock is an hour
    behind; the model still gets the conversation in the order it happened,
    and turns/list gives it in that order."""
    thread = new_thread()
    await DatabaseThreads.create(thread)
    skew = -3_600_000
    for number, words in enumerate(["first", "second", "third"]):
        turn = new_turn(words)
        turn.started_at_ms += skew if number == 1 else 0
        (begun,) = await write_in_one_batch([begin(thread, turn)])
        assert turn.sequence == number + 1
        turn.row_id = begun[2]
        await write_in_one_batch([turn_writes.FinishTurn(thread, ended(turn, words), 1)])
    (begun,) = await write_in_one_batch([begin(thread, new_turn())])
    assert [part["content"][0]["text"] for part in json.loads(begun[0].text)] == ["first", "second", "third"]
    page, more = await DatabaseThreads.turn_page(thread, True, None, 10, with_items=False)
    assert [turn.sequence for turn in page] == [1, 2, 3, 4] and not more


async def test_a_turn_swept_by_a_host_whose_clock_is_behind_never_ends_before_it_started():
    thread = new_thread()
    await DatabaseThreads.create(thread)
    ahead = new_turn()
    ahead.started_at_ms += 3_600_000  # its host's clock is an hour ahead of this one's
    await write_in_one_batch([turn_writes.BeginTurn(thread, ahead, "gone", -1, 1 << 20, None)])
    await write_in_one_batch([begin(thread, new_turn())])  # takes over, storing it interrupted
    stored = await DatabaseThreads.turn(ahead.id)
    assert stored.status == INTERRUPTED and stored.to_json()["durationMs"] == 0


async def test_turns_and_items_are_paged_in_the_database_and_a_new_turn_never_shifts_a_page():
    thread = new_thread()
    await DatabaseThreads.create(thread)

    async def one_turn(words: str) -> Turn:
        turn = new_turn(words)
        (begun,) = await write_in_one_batch([begin(thread, turn)])
        turn.row_id = begun[2]
        turn.items.append(ItemRecord({"id": new_id(), "type": "agentMessage", "text": words}, now_ms(), now_ms()))
        await write_in_one_batch([turn_writes.FinishTurn(thread, ended(turn, words), 1)])
        return turn

    turns = [await one_turn(f"turn {number}") for number in range(5)]
    first, more = await DatabaseThreads.turn_page(thread, False, None, 2, with_items=True)
    assert [turn.id for turn in first] == [turns[4].id, turns[3].id] and more
    assert [record.item["type"] for record in first[0].items] == ["userMessage", "agentMessage"]
    await one_turn("started between two pages")
    second, more = await DatabaseThreads.turn_page(thread, False, first[-1].sequence, 2, with_items=False)
    assert [turn.id for turn in second] == [turns[2].id, turns[1].id] and more and second[0].items == []
    items, more = await DatabaseThreads.item_page(thread, None, True, 2, 3)
    assert [(turn, record.item["type"]) for turn, record in items] == [
        (turns[1].id, "userMessage"), (turns[1].id, "agentMessage"), (turns[2].id, "userMessage"),
    ] and more  # fmt: skip
    items, more = await DatabaseThreads.item_page(thread, turns[0].id, False, 0, 10)
    assert [record.item["type"] for _, record in items] == ["agentMessage", "userMessage"] and not more
    newest = await DatabaseThreads.turns(thread, 2)
    assert [turn.id for turn in newest][0] == turns[4].id and len(newest) == 2  # oldest first


async def test_a_turn_starts_keeps_its_lock_and_ends_while_every_store_reader_is_busy():
    """Issue 24, 3: clients paging long threads occupy the store's readers;
    the turn writes and lock extensions, on the row writers, never queue
    behind them."""
    import threading

    from identity.actions import store_readers

    thread = new_thread()
    await DatabaseThreads.create(thread)
    release = threading.Event()
    busy = [asyncio.wrap_future(store_readers().submit(release.wait, 30)) for _ in range(store_readers()._max_workers * 4)]
    try:
        turn = new_turn()
        begun = await asyncio.wait_for(DatabaseThreads.begin_turn(thread, turn, "channel", 30, 1 << 20, None), 5)
        turn.row_id = begun[2]
        assert await asyncio.wait_for(DatabaseThreads.keep_lock(thread, turn, 30), 5)
        total = await asyncio.wait_for(DatabaseThreads.finish_turn(thread, ended(turn, "done"), 1), 5)
        assert total["totalTokens"] == 15
        reading = asyncio.ensure_future(DatabaseThreads.turn(turn.id))
        await asyncio.sleep(0.1)
        assert not reading.done()  # reads do wait for a reader
    finally:
        release.set()
        await asyncio.gather(*busy)
    assert (await reading).status == COMPLETED


def test_turns_stored_before_sequences_are_numbered_in_their_old_order_by_the_migration(transactional_db):
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    before, after = [("realtime", "0003_thread_sandbox")], [("realtime", "0004_turn_sequence")]
    executor = MigrationExecutor(connection)
    executor.migrate(before)
    try:
        apps = executor.loader.project_state(before).apps
        principal = apps.get_model("identity", "Principal").objects.get(pk=OWNER["id"])
        thread_model, turn_model = apps.get_model("realtime", "StoredThread"), apps.get_model("realtime", "StoredTurn")
        from django.utils import timezone

        thread = thread_model.objects.create(
            thread_id=new_id(), principal=principal, model="m", model_provider="openai", cwd="/", originator="o",
            created_at=timezone.now(), updated_at=timezone.now(),
        )  # fmt: skip
        for started in (300, 100, 200):
            turn_model.objects.create(
                turn_id=f"t{started}", thread=thread, principal=principal, originator="o",
                connection_id="00000000-0000-0000-0000-000000000001", status="completed", started_at_ms=started,
            )  # fmt: skip
    finally:
        executor = MigrationExecutor(connection)
        executor.loader.build_graph()
        executor.migrate(after)
        executor = MigrationExecutor(connection)
        executor.loader.build_graph()
        executor.migrate(executor.loader.graph.leaf_nodes())
    assert list(StoredTurn.objects.filter(thread_id=thread.pk).order_by("sequence").values_list("turn_id", "sequence")) == [
        ("t100", 1), ("t200", 2), ("t300", 3),
    ]  # fmt: skip
    assert StoredThread.objects.get(pk=thread.pk).turn_sequence == 3


async def test_a_lost_turns_end_tried_again_counts_its_tokens_once_and_keeps_them_on_its_row():
    thread = new_thread()
    await DatabaseThreads.create(thread)
    sleeper = new_turn()
    (begun,) = await write_in_one_batch([turn_writes.BeginTurn(thread, sleeper, "stopped", -1, 1 << 20, None)])
    sleeper.row_id = begun[2]
    await write_in_one_batch([begin(thread, new_turn())])  # the takeover
    used = await tokens_used()
    end = turn_writes.FinishTurn(thread, ended(sleeper, "woke up"), 1)
    for _ in range(2):  # the first batch committed, and its reply was lost
        (outcome,) = await write_in_one_batch([end])
        assert isinstance(outcome, turn_writes.TurnLost)
    assert await tokens_used() == used + 15
    stored = await DatabaseThreads.turn(sleeper.id)
    assert stored.status == INTERRUPTED and stored.usage["totalTokens"] == 15


def backend_of(session: loop_writers.PostgresOnLoop) -> int:
    return session._session.info.backend_pid


@database_sync_to_async
def run_sql(sql: str, params: list) -> list:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


@on_postgresql
async def test_the_loops_session_that_postgresql_closed_between_batches_is_replaced_before_the_next():
    """A restart, a failover or pg_terminate_backend between two turns: the
    next batch runs on a new session and fails nothing."""
    session = loop_writers.PostgresOnLoop()
    try:
        thread = new_thread()
        assert await session.write([turn_writes.CreateThread(thread)]) == [None]
        dropped = backend_of(session)
        assert await run_sql("select pg_terminate_backend(%s)", [dropped]) == [(True,)]
        async with asyncio.timeout(5):  # PostgreSQL closes it once the backend has exited
            while not loop_writers._has_input(session._session.pgconn.socket):
                await asyncio.sleep(0.01)
        (begun,) = await session.write([begin(thread, new_turn())])
        assert begun is not None and not isinstance(begun, Exception), begun
        assert backend_of(session) != dropped
    finally:
        session.close()


@on_postgresql
async def test_a_write_at_fault_keeps_the_loops_session():
    session = loop_writers.PostgresOnLoop()
    try:
        thread = new_thread()
        await session.write([turn_writes.CreateThread(thread)])
        kept = backend_of(session)
        (refused,) = await session.write([turn_writes.CreateThread(thread)])  # stored already
        assert isinstance(refused, DjangoIntegrityError)
        (begun,) = await session.write([begin(thread, new_turn())])
        assert begun is not None and not isinstance(begun, Exception), begun
        assert backend_of(session) == kept
    finally:
        session.close()


@on_postgresql
async def test_a_batch_cancelled_while_it_waits_on_the_database_leaves_nothing_held_and_the_next_batch_writes():
    """The server stopping mid-batch: its transaction ends with its session,
    and the thread's row lock with it."""
    import psycopg
    from django.db import connection

    session = loop_writers.PostgresOnLoop()
    try:
        thread = new_thread()
        await session.write([turn_writes.CreateThread(thread)])
        params = {k: v for k, v in connection.get_connection_params().items() if k not in ("cursor_factory", "context")}
        with psycopg.connect(**params) as holder:  # another transaction holds the thread's row
            holder.execute("select 1 from realtime_storedthread where thread_id = %s for update", [thread.id])
            batch = asyncio.create_task(session.write([begin(thread, new_turn())]))
            async with asyncio.timeout(5):
                while not await run_sql(
                    "select 1 from pg_stat_activity where wait_event_type = 'Lock' and datname = current_database()", []
                ):
                    await asyncio.sleep(0.01)
            batch.cancel()
            with pytest.raises(asyncio.CancelledError):
                await batch
        turn = new_turn()
        (begun,) = await session.write([begin(thread, turn)])
        assert begun is not None and not isinstance(begun, Exception), begun
        assert await statuses_of(thread) == {turn.id: "inProgress"}  # the cancelled one's turn was never stored
    finally:
        session.close()


@on_postgresql
async def test_where_django_sets_an_isolation_level_or_a_role_a_row_writer_writes_the_batches(monkeypatch):
    """Django applies those after connecting; the loop's session would not."""
    assert loop_writers.writer_for_this_loop() is not None
    for option, value in (("isolation_level", 3), ("assume_role", "writer")):
        with monkeypatch.context() as patched:
            patched.setitem(connection.settings_dict["OPTIONS"], option, value)
            assert loop_writers.writer_for_this_loop() is None

"""Threads that outlive a connection (PROTOCOL §9), across real ``manage.py
serve`` processes sharing this machine's PostgreSQL and Redis."""

import asyncio
import contextlib
import signal
import subprocess
import time

import psycopg
import pytest
import redis
from websockets.asyncio.client import connect as ws_connect

from codexserver.devtools.server_process import free_port
from tests.rpc_client import SocketClient
from tests.test_scale_out import REDIS_URL, postgres_database  # noqa: F401 (a fixture)

pytestmark = pytest.mark.e2e


@contextlib.asynccontextmanager
async def client_of(server, name: str):
    async with ws_connect(server.ws_url) as websocket:
        client = SocketClient(websocket)
        await client.initialize(name, "1.0.0")
        yield client
        await client.close()


def stored_turns(database_url: str) -> list[tuple[str, str]]:
    with psycopg.connect(database_url) as db:
        return db.execute("select originator, status from realtime_storedturn order by started_at_ms").fetchall()


async def turn_ended(client, turn_id: str, timeout: float = 5.0) -> dict:
    """The turn/completed of one turn (earlier turns' may still be queued)."""
    message = await client.wait_for(
        lambda m: m.get("method") == "turn/completed" and m["params"]["turn"]["id"] == turn_id, timeout
    )
    return message["params"]["turn"]


def inputs_of(request) -> str:
    return str(request.body["input"])


async def test_a_conversation_moves_between_processes_and_clients_under_each_ones_identity(
    postgres_database, daphne_server, upstream  # noqa: F811
):
    one = daphne_server(postgres_database, REDIS_URL=REDIS_URL, CODEX_SERVER_INSTANCE="one")
    two = daphne_server(postgres_database, REDIS_URL=REDIS_URL, CODEX_SERVER_INSTANCE="two")

    # A starts a conversation on process one, then leaves.
    async with client_of(one, "codex_vscode") as desktop:
        thread = await desktop.start_thread()
        assert (await desktop.run_turn(thread, "desktop says hello"))["turn"]["status"] == "completed"

    # B, another client on process two, finds it, resumes it and goes on.
    async with client_of(two, "codex_ios") as phone:
        listed = await phone.call("thread/list", {})
        assert [t["id"] for t in listed["data"]] == [thread]
        resumed = await phone.call("thread/resume", {"threadId": thread})
        assert [t["status"] for t in resumed["thread"]["turns"]] == ["completed"]
        assert (await phone.run_turn(thread, "phone follows up"))["turn"]["status"] == "completed"
        follow_up = upstream.model_requests()[-1]
        assert follow_up.originator == "codex_ios" and "(codex_ios; 1.0.0)" in follow_up.user_agent
        assert "desktop says hello" in inputs_of(follow_up)  # A's earlier messages, replayed from the store

        # A comes back to process one and watches B's next turn live, delta by delta.
        async with client_of(one, "codex_vscode") as desktop:
            await desktop.call("thread/resume", {"threadId": thread})
            turn = (await phone.call("turn/start", {"threadId": thread, "input": [{"type": "text", "text": "slow:5"}]}))["turn"]
            deltas = [(await desktop.notification("item/agentMessage/delta", threadId=thread))["delta"] for _ in range(5)]
            assert deltas == [f"d{i} " for i in range(5)]
            assert (await turn_ended(desktop, turn["id"]))["status"] == "completed"

            # turn/interrupt from process one stops a turn running on process two.
            turn = (await phone.call("turn/start", {"threadId": thread, "input": [{"type": "text", "text": "slow:100"}]}))["turn"]
            await desktop.notification("item/agentMessage/delta", threadId=thread)
            assert await desktop.call("turn/interrupt", {"threadId": thread, "turnId": turn["id"]}) == {}
            for client in (desktop, phone):
                assert (await turn_ended(client, turn["id"]))["status"] == "interrupted"

    assert stored_turns(postgres_database) == [
        ("codex_vscode", "completed"),
        ("codex_ios", "completed"),
        ("codex_ios", "completed"),
        ("codex_ios", "interrupted"),
    ]

    # Both processes restart: every thread and turn is still there.
    one.stop()
    two.stop()
    three = daphne_server(postgres_database, REDIS_URL=REDIS_URL, CODEX_SERVER_INSTANCE="three")
    async with client_of(three, "codex_cli_rs") as later:
        read = await later.call("thread/read", {"threadId": thread, "includeTurns": True})
        assert [t["status"] for t in read["thread"]["turns"]] == ["completed", "completed", "completed", "interrupted"]
        assert read["thread"]["preview"] == "desktop says hello"
        items = await later.call("thread/items/list", {"threadId": thread, "limit": 100})
        assert [entry["item"]["type"] for entry in items["data"][:2]] == ["userMessage", "agentMessage"]


async def test_two_turns_started_at_once_on_two_processes_run_one(postgres_database, daphne_server):  # noqa: F811
    one = daphne_server(postgres_database, REDIS_URL=REDIS_URL)
    two = daphne_server(postgres_database, REDIS_URL=REDIS_URL)
    async with client_of(one, "codex_vscode") as left, client_of(two, "codex_ios") as right:
        thread = await left.start_thread()
        await right.call("thread/resume", {"threadId": thread})
        start = {"threadId": thread, "input": [{"type": "text", "text": "slow:10"}]}
        answers = await asyncio.gather(left.request("turn/start", start), right.request("turn/start", start))
        refused = [answer["error"] for answer in answers if "error" in answer]
        assert len(refused) == 1 and refused[0] == {"code": -32600, "message": "Turn already in progress"}
        [started] = [answer["result"]["turn"] for answer in answers if "result" in answer]
        for client in (left, right):
            assert (await turn_ended(client, started["id"]))["status"] == "completed"
    assert [status for _, status in stored_turns(postgres_database)] == ["completed"]


LOCK_SECONDS = 3  # for the two tests below: a dead process's lock lapses soon


@contextlib.asynccontextmanager
async def a_turn_whose_process_dies(postgres_database, daphne_server, swept_elsewhere: bool = False):  # noqa: F811
    """A thread followed by a phone on one process, its turn running on
    another process, killed (-9) mid-turn: yields (phone, thread, dead turn id).
    ``swept_elsewhere``: the phone's process never sweeps (a slow heartbeat);
    a third process, followed by nobody, does."""
    fast = {
        "REDIS_URL": REDIS_URL,
        "CODEX_TURN_LOCK_SECONDS": str(LOCK_SECONDS),
        "CODEX_HEARTBEAT_INTERVAL": "1",
        "CODEX_HEARTBEAT_TIMEOUT": "3",
    }
    doomed = daphne_server(postgres_database, **fast)
    if swept_elsewhere:
        daphne_server(postgres_database, **fast)
        survivor = daphne_server(postgres_database, **fast | {"CODEX_HEARTBEAT_INTERVAL": "600", "CODEX_HEARTBEAT_TIMEOUT": "1800"})
    else:
        survivor = daphne_server(postgres_database, **fast)
    async with client_of(survivor, "codex_ios") as phone:
        async with client_of(doomed, "codex_vscode") as desktop:
            thread = await desktop.start_thread()
            await phone.call("thread/resume", {"threadId": thread})
            dead = await desktop.call("turn/start", {"threadId": thread, "input": [{"type": "text", "text": "slow:100"}]})
            await phone.notification("item/agentMessage/delta", threadId=thread)
            doomed.process.send_signal(signal.SIGKILL)
            doomed.process.wait()
        yield phone, thread, dead["turn"]["id"]


async def test_a_process_killed_mid_turn_frees_its_thread_when_the_lock_lapses(postgres_database, daphne_server):  # noqa: F811
    async with a_turn_whose_process_dies(postgres_database, daphne_server) as (phone, thread, dead_turn):
        start = {"threadId": thread, "input": [{"type": "text", "text": "after the crash"}]}
        assert (await phone.request("turn/start", start))["error"]["message"] == "Turn already in progress"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LOCK_SECONDS + 2  # the lock's expiry, and a margin
        while "error" in (answer := await phone.request("turn/start", start)):
            assert loop.time() < deadline, "the dead process's lock never lapsed"
            await asyncio.sleep(0.2)
        # The dead turn's end is heard (whoever stored it), before the next turn starts.
        ended_or_started = await phone.wait_for(
            lambda m: (m.get("method") == "turn/completed" and m["params"]["turn"]["id"] == dead_turn)
            or (m.get("method") == "turn/started" and m["params"]["turn"]["id"] == answer["result"]["turn"]["id"])
        )
        assert ended_or_started["method"] == "turn/completed"
        assert ended_or_started["params"]["turn"]["status"] == "interrupted"
        assert (await turn_ended(phone, answer["result"]["turn"]["id"]))["status"] == "completed"
        read = await phone.call("thread/read", {"threadId": thread, "includeTurns": True})
        assert [t["status"] for t in read["thread"]["turns"]] == ["interrupted", "completed"]
        assert answer["result"]["turn"]["id"] == read["thread"]["turns"][1]["id"]


async def test_subscribers_elsewhere_hear_a_dead_processs_turn_end_once_its_lock_lapses(postgres_database, daphne_server):  # noqa: F811
    """Nobody starts a turn: another live process's heartbeat stores the dead
    turn interrupted and tells every subscriber, on every process, as the
    dead process would have."""
    dying = a_turn_whose_process_dies(postgres_database, daphne_server, swept_elsewhere=True)
    async with dying as (phone, thread, dead_turn):
        ended = await turn_ended(phone, dead_turn, timeout=LOCK_SECONDS + 1 + 3)  # the lock, a heartbeat, a margin
        assert ended["status"] == "interrupted" and ended["items"][0]["type"] == "userMessage"
        await phone.notification("thread/status/changed", threadId=thread, status={"type": "idle"})


def of_turn(messages: list[dict], turn_id: str, method: str) -> list[dict]:
    return [
        m for m in messages
        if m.get("method") == method and (m["params"].get("turnId") or m["params"].get("turn", {}).get("id")) == turn_id
    ]  # fmt: skip


async def test_a_process_stopped_past_its_lease_and_resumed_tells_no_second_story(postgres_database, daphne_server):  # noqa: F811
    """Issue 24, 2 and 6: the turn's process is stopped (SIGSTOP) past its
    lock's lease, another process takes the thread over and its subscribers
    hear the turn end interrupted; resumed (SIGCONT), the stopped process
    neither streams into the thread again nor announces a second end, and
    the taker's turn runs to its end."""
    fast = {
        "REDIS_URL": REDIS_URL,
        "CODEX_TURN_LOCK_SECONDS": str(LOCK_SECONDS),
        "CODEX_HEARTBEAT_INTERVAL": "1",
        "CODEX_HEARTBEAT_TIMEOUT": "3",
    }
    sleeper, survivor = daphne_server(postgres_database, **fast), daphne_server(postgres_database, **fast)
    async with client_of(survivor, "codex_ios") as phone, client_of(sleeper, "codex_vscode") as desktop:
        thread = await desktop.start_thread()
        await phone.call("thread/resume", {"threadId": thread})
        old = (await desktop.call("turn/start", {"threadId": thread, "input": [{"type": "text", "text": "slow:100"}]}))["turn"]
        await phone.notification("item/agentMessage/delta", threadId=thread)
        sleeper.process.send_signal(signal.SIGSTOP)
        try:
            # The lock lapses; the survivor's sweep or the phone's next turn/start ends the old turn.
            ended = await turn_ended(phone, old["id"], timeout=LOCK_SECONDS + 1 + 3)
            assert ended["status"] == "interrupted"
            start = {"threadId": thread, "input": [{"type": "text", "text": "slow:30"}]}
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            while "error" in (answer := await phone.request("turn/start", start)):
                assert loop.time() < deadline, answer
                await asyncio.sleep(0.2)
            new = answer["result"]["turn"]
        finally:
            sleeper.process.send_signal(signal.SIGCONT)
        phone.inbox.clear()
        assert (await turn_ended(phone, new["id"], timeout=10))["status"] == "completed"
        await asyncio.sleep(1)  # anything the woken process still says arrives meanwhile
        heard = list(phone.inbox)
        assert of_turn(heard, old["id"], "item/agentMessage/delta") == []
        assert of_turn(heard, old["id"], "turn/completed") == []  # its end was told once, before it woke
        # The desktop, on the woken process, is told the old turn ended once too (by the takeover).
        await turn_ended(desktop, old["id"])
        await asyncio.sleep(0.5)
        assert of_turn(desktop.inbox, old["id"], "turn/completed") == []

    with psycopg.connect(postgres_database) as db:
        stored = db.execute("select turn_id, status from realtime_storedturn order by sequence").fetchall()
    assert stored == [(old["id"], "interrupted"), (new["id"], "completed")]


async def test_a_process_whose_database_connections_were_dropped_answers_its_next_reads(postgres_database, daphne_server):  # noqa: F811
    """Issue 24, 6: PostgreSQL restarted, failed over, or an operator ran
    pg_terminate_backend: the pooled connections are dead, and the next
    reads and turns get fresh ones instead of -32603."""
    server = daphne_server(postgres_database, REDIS_URL=REDIS_URL)
    async with client_of(server, "codex_vscode") as client:
        thread = await client.start_thread()
        assert (await client.run_turn(thread, "before"))["turn"]["status"] == "completed"
        name = postgres_database.rsplit("/", 1)[1]
        with psycopg.connect(postgres_database, autocommit=True) as admin:
            dropped = admin.execute(
                "select pg_terminate_backend(pid) from pg_stat_activity where datname = %s and pid <> pg_backend_pid()",
                [name],
            ).fetchall()
        assert dropped, "the server held no connection to drop"
        for _ in range(3):  # more than one pooled connection may be dead
            read = await client.request("thread/read", {"threadId": thread, "includeTurns": True})
            assert "result" in read, read
        listed = await client.call("thread/list", {})
        assert [t["id"] for t in listed["data"]] == [thread]
        assert (await client.run_turn(thread, "after"))["turn"]["status"] == "completed"


class PrivateRedis:
    """A redis-server of the test's own, on its own port, that it may restart:
    never the machine's, which other tests and processes share."""

    def __init__(self, directory):
        self.port, self.directory, self.process = free_port(), directory, None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(redis.exceptions.ConnectionError), self.client() as client:
                if client.ping():
                    return
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)


@pytest.fixture
def private_redis(tmp_path):
    redis = PrivateRedis(tmp_path)
    redis.start()
    yield redis
    redis.stop()


GROUP_EXPIRY = 8  # for the tests below: processes rejoin every 2 s, a dead one's channel leaves within 8


async def test_after_redis_restarts_every_process_hears_the_others_again(postgres_database, daphne_server, private_redis):  # noqa: F811
    """Issue 24, 7: a restart empties every group; each process joins its
    groups again soon after it sees Redis fail, instead of believing for an
    hour that it is still in them."""
    env = {"REDIS_URL": private_redis.url, "CODEX_CHANNEL_GROUP_EXPIRY_SECONDS": str(3600)}  # only the fault may rejoin
    one, two = daphne_server(postgres_database, **env), daphne_server(postgres_database, **env)
    async with client_of(one, "codex_vscode") as desktop, client_of(two, "codex_ios") as phone:
        thread = await desktop.start_thread()
        await phone.call("thread/resume", {"threadId": thread})
        turn = (await desktop.run_turn(thread, "before the restart"))["turn"]
        await turn_ended(phone, turn["id"])

        private_redis.stop()
        await asyncio.sleep(1)
        private_redis.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while True:  # a turn that ends before the processes have rejoined is not heard by the phone
            turn = (await desktop.run_turn(thread, "after the restart"))["turn"]
            with contextlib.suppress(TimeoutError):
                await turn_ended(phone, turn["id"], timeout=1)
                break
            assert loop.time() < deadline, "the phone's process never heard the desktop's again"


async def test_a_dead_processs_channel_leaves_its_groups_within_the_expiry(postgres_database, daphne_server, private_redis):  # noqa: F811
    """Issue 24, 7: a process killed -9 never leaves its groups; its channel
    stops counting once it has not rejoined for the group expiry, so the
    other processes stop sending it every event of those threads."""
    env = {"REDIS_URL": private_redis.url, "CODEX_CHANNEL_GROUP_EXPIRY_SECONDS": str(GROUP_EXPIRY)}
    doomed, survivor = daphne_server(postgres_database, **env), daphne_server(postgres_database, **env)
    async with client_of(survivor, "codex_ios") as phone:
        thread = await phone.start_thread()
        async with client_of(doomed, "codex_vscode") as desktop:
            await desktop.call("thread/resume", {"threadId": thread})
            turn = (await phone.run_turn(thread, "both hear this"))["turn"]
            await turn_ended(desktop, turn["id"])
            doomed.process.send_signal(signal.SIGKILL)
            doomed.process.wait()

        def queued_for_the_dead() -> int:
            # A process's channel holds what was sent to it and not read (channels_redis: a sorted set per process,
            # "asgithreads.…!", gone once empty).
            with private_redis.client() as client:
                return sum(client.zcard(key) for key in client.keys("asgithreads.*"))

        # Kept streaming: once the dead channel has lapsed, nothing more is queued for it.
        await asyncio.sleep(GROUP_EXPIRY + 1)
        before = queued_for_the_dead()
        for words in ("nobody else", "still nobody"):
            assert (await phone.run_turn(thread, words))["turn"]["status"] == "completed"
        assert queued_for_the_dead() == before


async def test_a_thread_start_whose_group_join_fails_leaves_no_thread_behind(postgres_database, daphne_server, private_redis):  # noqa: F811
    """Issue 24, 9: Redis is down when a client starts a thread: it gets an
    error, and no thread it was never told of appears in its list later."""
    server = daphne_server(postgres_database, REDIS_URL=private_redis.url)
    async with client_of(server, "codex_vscode") as client:
        await client.start_thread()  # the process's channel is open
        private_redis.stop()
        refused = await client.request("thread/start", {}, timeout=30)
        assert refused["error"]["code"] == -32603, refused
        private_redis.start()
        listed = await client.call("thread/list", {})
        assert len(listed["data"]) == 1

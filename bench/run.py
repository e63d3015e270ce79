"""Benchmarks: what identity scoping costs and how far one process scales.

    python bench/run.py [--quick] [--json PATH] [--plot PATH] [--skip-peer]

It installs its own extras (bench/requirements.txt) and, for the peer, the
npm package into bench/.peer on first use.

Everything runs on loopback in this one run, side by side, and every answer
is a ratio of two things measured together (these machines are noisy):

1. scoping overhead: turn latency and turns/s of the real server vs a
   baseline relay with one global httpx client and no identity;
2. identity client cost: the project's factory vs a new httpx.AsyncClient();
3. connection scale on one daphne process: RSS per connection, turn
   latency and misattributed upstream requests at 250 ... 2,000 connections;
4. relay throughput: deltas/s relayed vs a bare echo consumer's messages/s
   (daphne; uvicorn for reference);
5. the peer: the real Codex app-server (npm @openai/codex 0.169.0) on the
   same upstream: latency ratio of a chat turn and of a turn that runs one
   command (`true`, each in its own sandbox; goal <= 0.5), and misattributed
   model requests;
6. isolation: a healthy client's turn latency while other clients stop
   reading in the middle of a flood (goal: within 1.5x);
7. the thread store: turn latency at 50 connections on stored threads vs
   ephemeral (memory-only) threads on the same server (goal: <= 1.10), on
   the embedded default and on PostgreSQL + Redis;
8. fan-out: when a subscriber on a second process receives each delta,
   after the subscriber on the turn's own process (goal: <= 5 ms p50);
9. the sandbox: what starting a command (`true`) under bubblewrap costs,
   p50 and p99, against the same command started without it, interleaved;
10. abuse: one hostile client (never reading, flooding the store, nesting,
   trickling request heads) beside 50 well-behaved ones: their p50 and p99
   turn latency with it vs without (goal <= 1.2), the server's RSS after.

1, 3, 6 and 7 run on the embedded default and again on PostgreSQL + Redis
(the deployment's configuration; CODEX_BENCH_EMBEDDED_ONLY=1 skips it).
`--only scale` runs 3 alone, `--only store` 7 and 8, `--only sandbox` 9,
`--only peer` 5, `--only abuse` 10.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "codexserver.settings")

import django  # noqa: E402

django.setup()

import httpx  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402

from bench import abuse, peer  # noqa: E402
from codexserver.devtools.attribution_load import (  # noqa: E402
    LoadReport,
    close_clients,
    count_misattributed,
    open_clients,
    run_turns,
)
from codexserver.devtools.local_upstream import UpstreamServer  # noqa: E402
from codexserver.devtools.rpc_client import SocketClient  # noqa: E402
from codexserver.devtools.server_process import ServerProcess, cpu_seconds_of, migrate  # noqa: E402
from identity.client_identity import ClientIdentity  # noqa: E402
from identity.http_clients import IdentityClientFactory  # noqa: E402

TURN_TEXT = "flood:20:16"  # 20 deltas per turn, streamed as fast as the upstream can
# Benchmark 1 measures identity, not the abuse limits (benchmark 10 does):
# its one-connection client runs up to about 590 turns a second, past the
# per-connection frame rate (CODEX_MAX_FRAMES_PER_SECOND, 200) that paces
# such a flood, and the baseline relay has no such limit. Under it, once the
# first burst was spent, ours measured the pacing: 5 ms a turn.
UNPACED = {"CODEX_MAX_FRAMES_PER_SECOND": "1000000"}


class Bench:
    def __init__(self, quick: bool, workdir: Path):
        self.quick = quick
        self.workdir = workdir
        self.upstream = UpstreamServer().start()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("CODEX_", "DATABASE_URL", "REDIS_URL"))},
            "CODEX_API_BASE_URL": self.upstream.api_base_url,
            "CODEX_CHATGPT_BASE_URL": self.upstream.chatgpt_base_url,
            "OPENAI_API_KEY": "sk-bench",
            "CODEX_LOG_LEVEL": "WARNING",
            "PYTHONPATH": str(ROOT),
        }
        self.servers: list[ServerProcess] = []

    def start(
        self, name: str, command: list[str] | None = None, project_dir: Path = ROOT, **env: str
    ) -> ServerProcess:
        """``command`` (default: ``project_dir``'s ``manage.py serve``, migrated first) with ``env`` added."""
        server_env = {**self.env, "DATABASE_URL": f"sqlite:///{self.workdir / name}.sqlite3", **env}
        if command is None:
            migrate(server_env, project_dir=project_dir)
        server = ServerProcess(
            server_env, self.workdir / f"{name}.log", command=command, ready_path="/", project_dir=project_dir
        )
        self.servers.append(server.start())
        return server

    def stop(self, server: ServerProcess) -> None:
        server.stop()
        self.servers.remove(server)

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        self.upstream.stop()


def daphne_command(app: str) -> list[str]:
    return ["-m", "daphne", "-b", "127.0.0.1", "-p", "{port}", app]


# --- 1. scoping overhead -----------------------------------------------------


async def turn_round(ws_url: str, concurrency: int, turns_each: int, ephemeral: bool = False) -> tuple[float, float]:
    """(median turn latency in ms, turns per second) with ``concurrency`` clients."""
    clients = await open_clients(ws_url, concurrency)
    latencies: list[float] = []

    async def worker(client) -> None:
        # as long as a turn may take: 500 clients streaming slow every other request too
        thread = await client.start_thread(timeout=300, **({"ephemeral": True} if ephemeral else {}))
        for _ in range(turns_each):
            started = time.perf_counter()
            completed = await client.run_turn(thread, TURN_TEXT, timeout=300)
            assert completed["turn"]["status"] == "completed", completed
            latencies.append(time.perf_counter() - started)
            client.inbox.clear()

    started = time.perf_counter()
    await asyncio.gather(*(worker(client) for _, client, _ in clients))
    wall = time.perf_counter() - started
    await close_clients(clients)
    return statistics.median(latencies) * 1000, len(latencies) / wall


def scoping_overhead(bench: Bench, setup: str = "embedded") -> dict:
    ours = bench.start(f"ours_overhead_{slug(setup)}", **UNPACED, **setup_env(setup))
    baseline = bench.start("baseline", daphne_command("bench.reference_apps:baseline_relay"))
    levels = {1: 20 if bench.quick else 60, 50: 3 if bench.quick else 8, 500: 1 if bench.quick else 2}
    rounds = 2 if bench.quick else 5
    results = {}
    for concurrency, turns_each in levels.items():
        # ours on ephemeral threads too: the same turn without the store's
        # writes (bench 7 measures the store alone), to tell the two apart
        samples = {"ours": [], "ours_ephemeral": [], "baseline": []}
        for _ in range(rounds):  # alternate, so drift hits all alike
            for name, server, ephemeral in (("ours", ours, False), ("ours_ephemeral", ours, True), ("baseline", baseline, False)):
                samples[name].append(asyncio.run(turn_round(server.ws_url, concurrency, turns_each, ephemeral=ephemeral)))
        ours_ms = statistics.median(s[0] for s in samples["ours"])
        ephemeral_ms = statistics.median(s[0] for s in samples["ours_ephemeral"])
        base_ms = statistics.median(s[0] for s in samples["baseline"])
        ours_tps = statistics.median(s[1] for s in samples["ours"])
        base_tps = statistics.median(s[1] for s in samples["baseline"])
        results[concurrency] = {
            "ours_median_ms": ours_ms,
            "baseline_median_ms": base_ms,
            "latency_ratio": ours_ms / base_ms,
            "ephemeral_median_ms": ephemeral_ms,
            "ephemeral_latency_ratio": ephemeral_ms / base_ms,
            "ours_turns_per_s": ours_tps,
            "baseline_turns_per_s": base_tps,
            "throughput_ratio": base_tps / ours_tps,
        }
    bench.stop(ours)
    bench.stop(baseline)
    return results


# --- 2. identity client cost ---------------------------------------------------


def client_construction() -> dict:
    async def measure() -> dict:
        factory = IdentityClientFactory()
        identities = [ClientIdentity.from_client_info(f"client_{i}", "1.0") for i in range(2000)]
        started = time.perf_counter()
        for identity in identities:  # every one new: no cache hit
            factory.client_for(identity, "https://api.example/v1", bearer_token="k")
        per_factory = (time.perf_counter() - started) / len(identities)
        fresh = []
        started = time.perf_counter()
        for _ in range(100):
            fresh.append(httpx.AsyncClient())
        per_fresh = (time.perf_counter() - started) / 100
        for client in fresh:
            await client.aclose()
        await factory.aclose()
        return {"factory_us": per_factory * 1e6, "new_async_client_us": per_fresh * 1e6, "speedup": per_fresh / per_factory}

    return asyncio.run(measure())


# --- 9. the sandbox -------------------------------------------------------------


def sandbox_start_cost(quick: bool) -> dict:
    """Start-to-exit of `true` as a command session, with and without the
    sandbox, one after the other so both see the same machine."""
    from realtime.tools.exec_sessions import SessionRegistry
    from realtime.tools.sandbox import WORKSPACE_WRITE, SandboxPolicy, bwrap_binary, sandbox_environment, sandboxed_argv

    rounds = 30 if quick else 200
    workspace = tempfile.mkdtemp(prefix="codexserver-bench-sandbox-")
    policy = SandboxPolicy(WORKSPACE_WRITE, (workspace,))
    sandboxed = sandboxed_argv(["/bin/true"], workspace, workspace, policy, (), bwrap_binary())

    async def measure() -> dict:
        registry = SessionRegistry()
        times: dict[str, list[float]] = {"sandboxed": [], "bare": []}
        for index in range(rounds * 2):
            kind = "sandboxed" if index % 2 == 0 else "bare"
            argv, env = (sandboxed, {}) if kind == "sandboxed" else (["/bin/true"], sandbox_environment(policy))
            started = time.perf_counter()
            session = await registry.start(argv, thread_id="bench", turn_id="t", item_id="i", command="true", cwd=workspace, env=env)
            await session.wait(10)
            times[kind].append((time.perf_counter() - started) * 1000)
            registry.forget(session)
        return {
            kind: {"p50_ms": statistics.median(values), "p99_ms": sorted(values)[int(len(values) * 0.99) - 1]}
            for kind, values in times.items()
        }

    try:
        result = asyncio.run(measure())
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    result["ratio_p50"] = result["sandboxed"]["p50_ms"] / result["bare"]["p50_ms"]
    return result


def print_peer_report(results: dict) -> None:
    p = results["peer"]
    if p.get("skipped"):
        print(f"\n5. peer: skipped ({p['skipped']})")
    else:
        print(
            f"\n5. peer (codex app-server {p['version']}): median turn {p['ours_median_ms']:.1f} ms ours vs"
            f" {p['peer_median_ms']:.1f} ms peer = {p['latency_ratio']:.2f}; misattributed with 20 clients:"
            f" ours {p['ours_misattributed']}, peer {p['peer_misattributed']} of {p['peer_requests']}"
            f" (peer originators seen: {p['peer_originators_seen']})"
        )
        print(
            f"   a turn running one command (`true`): {p['ours_tool_turn_median_ms']:.1f} ms ours vs"
            f" {p['peer_tool_turn_median_ms']:.1f} ms peer = {p['tool_turn_latency_ratio']:.2f}"
        )
        print(
            f"   a turn of ten tool steps (`true` each): {p['ours_tool_steps_median_ms']:.1f} ms ours vs"
            f" {p['peer_tool_steps_median_ms']:.1f} ms peer = {p['tool_steps_latency_ratio']:.2f}"
        )


def print_sandbox_report(results: dict) -> None:
    cost = results["sandbox"]
    print("\n9. sandbox start cost (start to exit of `true`, interleaved)")
    print(f"   sandboxed: p50 {cost['sandboxed']['p50_ms']:.2f} ms, p99 {cost['sandboxed']['p99_ms']:.2f} ms")
    print(f"   bare:      p50 {cost['bare']['p50_ms']:.2f} ms, p99 {cost['bare']['p99_ms']:.2f} ms")
    print(f"   ratio (p50): {cost['ratio_p50']:.2f}")


# --- 3. connection scale -------------------------------------------------------


def connection_scale(bench: Bench, setup: str = "embedded") -> list[dict]:
    levels = [250, 500] if bench.quick else [250, 500, 1000, 2000]
    # Every connection here is the one local principal, 2,000 turns at once:
    # the per-principal cap (half the upstream pool) would refuse half of them.
    server = bench.start(f"ours_scale_{slug(setup)}", CODEX_MAX_UPSTREAM_STREAMS_PER_PRINCIPAL="0", **setup_env(setup))
    rows = []

    async def run() -> None:
        await asyncio.sleep(1)
        idle_rss = server.rss_bytes()
        clients = []
        for level in levels:
            bench.upstream.reset()
            # Every connection a distinct identity: later levels continue the numbering.
            clients += await open_clients(server.ws_url, level - len(clients), batch=100, first_index=len(clients))
            await asyncio.sleep(1)
            rss = server.rss_bytes()
            report = LoadReport(connections=level)
            used = server.cpu_seconds()
            owners = await run_turns(clients, "flood:5:16", report, timeout=600)
            cpu_ms_per_turn = (server.cpu_seconds() - used) * 1000 / level
            for _, client, _ in clients:
                client.inbox.clear()
            assert len({name for name, _, _ in clients}) == level
            rows.append(
                {
                    "connections": level,
                    "rss_mib": rss / 2**20,
                    "rss_per_connection_kib": (rss - idle_rss) / level / 1024,
                    "p50_ms": report.percentile(0.5) * 1000,
                    "p99_ms": report.percentile(0.99) * 1000,
                    # the server's CPU (all its threads) per turn of the burst
                    "server_cpu_ms_per_turn": cpu_ms_per_turn,
                    "completed": report.completed,
                    "misattributed": count_misattributed(bench.upstream, owners),
                    "server_errors": report.server_errors,
                }
            )
        await close_clients(clients)

    asyncio.run(run())
    bench.stop(server)
    return rows


# --- 4. relay throughput ---------------------------------------------------------


async def relay_rate(ws_url: str, clients_count: int, deltas: int) -> float:
    clients = await open_clients(ws_url, clients_count)
    threads = [await client.start_thread() for _, client, _ in clients]
    started = time.perf_counter()
    await asyncio.gather(
        *(client.run_turn(thread, f"flood:{deltas}:16", timeout=600) for (_, client, _), thread in zip(clients, threads))
    )
    wall = time.perf_counter() - started
    await close_clients(clients)
    return clients_count * deltas / wall


async def echo_rate(ws_url: str, clients_count: int, messages: int) -> float:
    frame = json.dumps({"method": "item/agentMessage/delta", "params": {"threadId": "t" * 36, "turnId": "u" * 36, "itemId": "msg_00000000", "delta": "x" * 16}})

    async def one() -> None:
        async with connect(ws_url, max_size=None) as socket:
            async def send_all():
                for _ in range(messages):
                    await socket.send(frame)

            sender = asyncio.create_task(send_all())
            for _ in range(messages):
                await socket.recv()
            await sender

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(clients_count)))
    return clients_count * messages / (time.perf_counter() - started)


def relay_throughput(bench: Bench) -> dict:
    deltas = 2000 if bench.quick else 5000
    ours = bench.start("ours_relay")
    echo = bench.start("echo", daphne_command("bench.reference_apps:echo"))
    uvicorn_echo = bench.start(
        "uvicorn_echo", ["-m", "uvicorn", "--host", "127.0.0.1", "--port", "{port}", "--log-level", "warning", "bench.reference_apps:echo"]
    )
    samples = {"relay": [], "echo": [], "uvicorn_echo": []}
    for _ in range(2 if bench.quick else 3):
        samples["relay"].append(asyncio.run(relay_rate(ours.ws_url, 4, deltas)))
        samples["echo"].append(asyncio.run(echo_rate(echo.ws_url, 4, deltas)))
        samples["uvicorn_echo"].append(asyncio.run(echo_rate(uvicorn_echo.ws_url, 4, deltas)))
    for server in (ours, echo, uvicorn_echo):
        bench.stop(server)
    relay, daphne_echo, uv = (statistics.median(samples[k]) for k in ("relay", "echo", "uvicorn_echo"))
    return {"relay_deltas_per_s": relay, "daphne_echo_per_s": daphne_echo, "uvicorn_echo_per_s": uv, "relay_vs_echo_ratio": relay / daphne_echo}


# --- 6. a stalled client does not slow the others ------------------------------------


async def healthy_latency(ws_url: str, turns: int, min_seconds: float = 0.0) -> tuple[float, float]:
    """The healthy client's (median, slowest) turn latency in ms. The slowest:
    a pause of the whole loop slows the one turn it falls in, which a median,
    or a p99 of a thousand turns, does not show."""
    async with connect(ws_url, max_size=None) as socket:
        client = SocketClient(socket)
        await client.initialize("healthy_client", "1.0.0")
        latencies = []
        started_all = time.perf_counter()
        while len(latencies) < turns or time.perf_counter() - started_all < min_seconds:
            if len(latencies) % turns == 0:
                # A new thread every `turns` turns: each turn replays its thread's
                # history, so a thread that ran for seconds would make later turns
                # slower than the `turns` measured alone, stalled clients or not.
                thread = await client.start_thread()
            client.inbox.clear()
            started = time.perf_counter()
            await client.run_turn(thread, TURN_TEXT, timeout=60)
            latencies.append(time.perf_counter() - started)
        await client.close()
        return statistics.median(latencies) * 1000, max(latencies) * 1000


async def with_stalled_clients(ws_url: str, turns: int, stalled: int) -> tuple[tuple[float, float], int]:
    """The healthy client's (median, slowest) latency while ``stalled`` clients stop reading mid-flood."""
    sockets = []
    for index in range(stalled):
        socket = await connect(ws_url, max_queue=1, max_size=None)
        await socket.send(json.dumps({"id": 1, "method": "initialize", "params": {"clientInfo": {"name": f"stalled_{index}", "version": "1"}}}))
        await socket.recv()
        await socket.send(json.dumps({"id": 2, "method": "thread/start", "params": {}}))
        thread = json.loads(await socket.recv())["result"]["thread"]["id"]
        await socket.send(json.dumps({"id": 3, "method": "turn/start", "params": {"threadId": thread, "input": [{"type": "text", "text": "flood:6000:4096"}]}}))
        sockets.append(socket)  # ...and never read again
    # Long enough for the stall timeout to pass and the stalled clients to be dropped.
    latency = await healthy_latency(ws_url, turns, min_seconds=6)
    for socket in sockets:
        socket.transport.abort()
    return latency, len(sockets)


def stalled_client_isolation(bench: Bench, setup: str = "embedded") -> dict:
    server = bench.start(f"ours_stalled_{slug(setup)}", CODEX_CLIENT_STALL_TIMEOUT="2", **setup_env(setup))
    turns = 20 if bench.quick else 40
    alone, alone_slowest = asyncio.run(healthy_latency(server.ws_url, turns))
    (stalled_latency, stalled_slowest), _ = asyncio.run(with_stalled_clients(server.ws_url, turns, stalled=4))
    alone_again, alone_again_slowest = asyncio.run(healthy_latency(server.ws_url, turns))
    dropped = server.log().count("outbound queue full")
    bench.stop(server)
    baseline = statistics.median([alone, alone_again])
    return {
        "healthy_alone_ms": baseline,
        "healthy_with_stalled_ms": stalled_latency,
        "healthy_alone_slowest_ms": max(alone_slowest, alone_again_slowest),
        "healthy_with_stalled_slowest_ms": stalled_slowest,
        "ratio": stalled_latency / baseline,
        "stalled_clients": 4,
        "stalled_dropped": dropped,
    }


# --- 7. the thread store -----------------------------------------------------------


def fresh_postgres_database() -> str:
    import uuid

    import psycopg

    admin_url = os.environ.get("CODEX_BENCH_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/test")
    name = f"codexserver_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return admin_url.rsplit("/", 1)[0] + "/" + name


def deployment_env() -> dict[str, str]:
    return {
        "DATABASE_URL": fresh_postgres_database(),
        "REDIS_URL": os.environ.get("CODEX_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"),
    }


# The configurations every figure is measured on: the embedded default
# (SQLite, in-memory layer) and the deployment's (PostgreSQL + Redis, each
# server on a database of its own).
DEPLOYMENT = "postgres+redis"


def setups() -> list[str]:
    return ["embedded"] if os.environ.get("CODEX_BENCH_EMBEDDED_ONLY") else ["embedded", DEPLOYMENT]


def setup_env(setup: str) -> dict[str, str]:
    return deployment_env() if setup == DEPLOYMENT else {}


def slug(setup: str) -> str:
    return setup.replace("+", "_")


def database_servers_cpu_seconds() -> dict[int, float]:
    """CPU seconds so far of each of this machine's PostgreSQL and Redis
    server processes, by pid: they share the cores with the server."""
    used = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm") as comm:
                if comm.read().startswith(("postgres", "redis-server")):
                    used[int(pid)] = cpu_seconds_of(f"/proc/{pid}/stat")
        except OSError:  # gone meanwhile
            continue
    return used


class CpuSplit:
    """CPU ms per turn over a stretch: the server's event loop, its other
    threads (the row writers), and the database servers (processes that
    exit meanwhile are not counted)."""

    def __init__(self, server: ServerProcess):
        self.server = server
        self.main, self.total = server.main_thread_cpu_seconds(), server.cpu_seconds()
        self.databases = database_servers_cpu_seconds()

    def per_turn(self, turns: int) -> dict[str, float]:
        main, total = self.server.main_thread_cpu_seconds(), self.server.cpu_seconds()
        databases = database_servers_cpu_seconds()
        used = sum(seconds - self.databases.get(pid, 0.0) for pid, seconds in databases.items())
        return {
            "server": (total - self.total) * 1000 / turns,
            "event_loop": (main - self.main) * 1000 / turns,
            "other_threads": (total - main - self.total + self.main) * 1000 / turns,
            "database_servers": used * 1000 / turns,
        }


def thread_store_cost(bench: Bench) -> dict:
    """Stored threads (a lock, the turn and its items written, history read)
    vs ephemeral ones (memory only), alternating on one server."""
    turns_each, rounds = (3, 3) if bench.quick else (8, 5)
    results = {}
    for setup in setups():
        server = bench.start(f"ours_store_{slug(setup)}", **setup_env(setup))
        samples = {"stored": [], "memory": []}
        cpu = {"stored": [], "memory": []}  # CPU ms per turn: steadier than latency here
        for _ in range(rounds):
            for name, ephemeral in (("stored", False), ("memory", True)):
                split = CpuSplit(server)
                samples[name].append(asyncio.run(turn_round(server.ws_url, 50, turns_each, ephemeral=ephemeral))[0])
                cpu[name].append(split.per_turn(50 * turns_each))
        bench.stop(server)
        stored_ms, memory_ms = statistics.median(samples["stored"]), statistics.median(samples["memory"])
        cpu_ms = {name: {part: statistics.median(s[part] for s in split) for part in split[0]} for name, split in cpu.items()}
        results[setup] = {
            "stored_median_ms": stored_ms,
            "memory_median_ms": memory_ms,
            "ratio": stored_ms / memory_ms,
            "stored_cpu_ms_per_turn": cpu_ms["stored"]["server"],
            "memory_cpu_ms_per_turn": cpu_ms["memory"]["server"],
            "cpu_ratio": cpu_ms["stored"]["server"] / cpu_ms["memory"]["server"],
            "cpu_ms_per_turn": cpu_ms,
        }
    return results


# --- 8. fan-out between processes ------------------------------------------------------


async def _delta_times(socket, thread: str, arrivals: list[float], until_turns: int) -> None:
    ended = 0
    while ended < until_turns:
        message = json.loads(await socket.recv())
        method = message.get("method")
        if method == "item/agentMessage/delta" and message["params"]["threadId"] == thread:
            arrivals.append(time.perf_counter())
        elif method == "turn/completed":
            ended += 1


async def _keep_busy(ws_url: str, clients: int, done: asyncio.Event) -> None:
    """``clients`` other connections streaming turns until ``done``."""
    while not done.is_set():
        await turn_round(ws_url, clients, 2)


async def fan_out_round(near_url: str, far_url: str, turns: int, deltas: int, busy_clients: int = 0) -> list[float]:
    """Per delta: when the far subscriber got it minus when the near one did
    (ms); with ``busy_clients`` other connections streaming turns on the near
    process meanwhile."""
    done = asyncio.Event()
    load = asyncio.create_task(_keep_busy(near_url, busy_clients, done)) if busy_clients else None
    try:
        return await _fan_out_lags(near_url, far_url, turns, deltas)
    finally:
        done.set()
        if load is not None:
            await load


async def _fan_out_lags(near_url: str, far_url: str, turns: int, deltas: int) -> list[float]:
    async with connect(near_url) as starter_socket, connect(near_url) as near_socket, connect(far_url) as far_socket:
        starter, near, far = SocketClient(starter_socket), SocketClient(near_socket), SocketClient(far_socket)
        await starter.initialize("codex_vscode", "1.0.0")
        await near.initialize("codex_ios", "1.0.0")
        await far.initialize("codex_android", "1.0.0")
        thread = await starter.start_thread()
        await near.call("thread/resume", {"threadId": thread, "excludeTurns": True})
        await far.call("thread/resume", {"threadId": thread, "excludeTurns": True})
        # From here on the two subscribers' sockets are read raw, for the arrival times.
        await near.close()
        await far.close()
        near_times: list[float] = []
        far_times: list[float] = []
        readers = [
            asyncio.create_task(_delta_times(near_socket, thread, near_times, turns)),
            asyncio.create_task(_delta_times(far_socket, thread, far_times, turns)),
        ]
        for _ in range(turns):
            await starter.run_turn(thread, f"slow:{deltas}", timeout=60)
        await asyncio.wait_for(asyncio.gather(*readers), 30)
    assert len(near_times) == len(far_times) == turns * deltas, (len(near_times), len(far_times))
    return [(far - near) * 1000 for near, far in zip(near_times, far_times)]


def fan_out(bench: Bench) -> dict:
    env = deployment_env()
    near = bench.start("ours_fanout_near", **env)
    far = bench.start("ours_fanout_far", **env)
    turns = 2 if bench.quick else 5
    results = {}
    for busy in (0, FAN_OUT_BUSY_CLIENTS):
        lags = sorted(asyncio.run(fan_out_round(near.ws_url, far.ws_url, turns, deltas=30, busy_clients=busy)))
        results[busy] = {
            "deltas": len(lags),
            "p50_ms": statistics.median(lags),
            "p90_ms": lags[int(len(lags) * 0.9)],
            "max_ms": lags[-1],
        }
    bench.stop(near)
    bench.stop(far)
    return {**results[0], "busy": {"clients": FAN_OUT_BUSY_CLIENTS, **results[FAN_OUT_BUSY_CLIENTS]}}


# Other connections streaming on the turn's process while fan-out is timed a second time.
FAN_OUT_BUSY_CLIENTS = 50


# --- report -------------------------------------------------------------------------


def print_report(results: dict) -> None:
    print(f"\ncodexserver benchmarks  ({results['date']}, {results['machine']})\n")
    print_overhead_report(results)
    c = results["client_construction"]
    print(f"\n2. identity client: factory {c['factory_us']:.1f} µs vs new AsyncClient {c['new_async_client_us']:.0f} µs = {c['speedup']:.0f}x cheaper")
    print_scale_report(results)
    r = results["relay"]
    print(
        f"\n4. relay {r['relay_deltas_per_s']:.0f} deltas/s vs daphne echo {r['daphne_echo_per_s']:.0f} msg/s"
        f" = {r['relay_vs_echo_ratio']:.2f} (uvicorn echo {r['uvicorn_echo_per_s']:.0f} msg/s)"
    )
    print_peer_report(results)
    for setup, iso in results["stalled_isolation"].items():
        print(
            f"\n6. a healthy client's turn ({setup}): {iso['healthy_alone_ms']:.1f} ms alone,"
            f" {iso['healthy_with_stalled_ms']:.1f} ms while {iso['stalled_clients']} clients stop reading mid-flood"
            f" = {iso['ratio']:.2f} ({iso['stalled_dropped']} stalled clients dropped);"
            f" slowest turn {iso['healthy_alone_slowest_ms']:.1f} ms alone, {iso['healthy_with_stalled_slowest_ms']:.1f} ms with them"
        )
    print_store_report(results)
    print_sandbox_report(results)
    abuse.print_abuse_report(results)
    print()
    print(json.dumps(summary(results), indent=2))


def print_overhead_report(results: dict) -> None:
    for setup, levels in results["scope_overhead"].items():
        print(f"1. scoping overhead (ours vs baseline relay with a global client, same upstream), ours on {setup}")
        print(
            f"   {'conns':>5} {'ours ms':>9} {'base ms':>9} {'ratio':>6} {'ours t/s':>9} {'base t/s':>9} {'ratio':>6}"
            f" {'ephemeral ms':>13} {'ratio':>6}"
        )
        for level, row in levels.items():
            print(
                f"   {level:>5} {row['ours_median_ms']:9.1f} {row['baseline_median_ms']:9.1f} {row['latency_ratio']:6.2f}"
                f" {row['ours_turns_per_s']:9.1f} {row['baseline_turns_per_s']:9.1f} {row['throughput_ratio']:6.2f}"
                f" {row['ephemeral_median_ms']:13.1f} {row['ephemeral_latency_ratio']:6.2f}"
            )


def print_scale_report(results: dict) -> None:
    for setup, rows in results["scale"].items():
        print(f"\n3. connection scale on one daphne process ({setup})")
        print(
            f"   {'conns':>5} {'RSS MiB':>8} {'KiB/conn':>9} {'p50 ms':>8} {'p99 ms':>8} {'done':>6} {'misattr':>8}"
            f" {'CPU ms/turn':>12}"
        )
        for row in rows:
            print(
                f"   {row['connections']:>5} {row['rss_mib']:8.1f} {row['rss_per_connection_kib']:9.1f} {row['p50_ms']:8.1f}"
                f" {row['p99_ms']:8.1f} {row['completed']:>6} {row['misattributed']:>8} {row['server_cpu_ms_per_turn']:12.2f}"
            )


def print_store_report(results: dict) -> None:
    print("\n7. thread store: turn latency at 50 connections, stored threads vs memory-only (ephemeral) threads")
    for setup, row in results["thread_store"].items():
        print(
            f"   {setup:>15}: {row['stored_median_ms']:.1f} ms vs {row['memory_median_ms']:.1f} ms = {row['ratio']:.2f};"
            f" server CPU per turn {row['stored_cpu_ms_per_turn']:.2f} ms vs {row['memory_cpu_ms_per_turn']:.2f} ms"
            f" = {row['cpu_ratio']:.2f}"
        )
        parts = row["cpu_ms_per_turn"]
        print(
            "   "
            + " " * 15
            + "  CPU ms per turn, stored vs memory: "
            + "; ".join(
                f"{label} {parts['stored'][part]:.2f} vs {parts['memory'][part]:.2f}"
                for part, label in (
                    ("event_loop", "event loop"),
                    ("other_threads", "other threads"),
                    ("database_servers", "PostgreSQL and Redis, machine-wide"),
                )
            )
        )
    f = results["fan_out"]
    print(
        f"\n8. fan-out: a subscriber on another process gets each delta {f['p50_ms']:.2f} ms p50"
        f" ({f['p90_ms']:.2f} ms p90, {f['max_ms']:.2f} ms max) after the subscriber on the turn's own process"
        f" ({f['deltas']} deltas, PostgreSQL + Redis)"
    )
    busy = f["busy"]
    print(
        f"   with {busy['clients']} other connections streaming on the turn's process: {busy['p50_ms']:.2f} ms p50"
        f" ({busy['p90_ms']:.2f} ms p90, {busy['max_ms']:.2f} ms max)"
    )


def summary(results: dict) -> dict:
    figures = {"client_construction_speedup": results["client_construction"]["speedup"]}
    for setup in results["scale"]:
        suffix = "" if setup == "embedded" else f"_{slug(setup)}"
        scale = results["scale"][setup]
        held = [row for row in scale if row["misattributed"] == 0 and row["completed"] == row["connections"]]
        best = max(held, key=lambda row: row["connections"]) if held else None
        figures |= {
            f"scope_overhead_ratio_1{suffix}": results["scope_overhead"][setup][1]["latency_ratio"],
            f"scope_overhead_ratio_50{suffix}": results["scope_overhead"][setup][50]["latency_ratio"],
            f"scope_overhead_ephemeral_ratio_1{suffix}": results["scope_overhead"][setup][1]["ephemeral_latency_ratio"],
            f"scope_overhead_ephemeral_ratio_50{suffix}": results["scope_overhead"][setup][50]["ephemeral_latency_ratio"],
            f"scope_throughput_ratio_50{suffix}": results["scope_overhead"][setup][50]["throughput_ratio"],
            f"max_connections{suffix}": best["connections"] if best else 0,
            f"burst_p99_ms{suffix}": best["p99_ms"] if best else None,
            f"rss_per_connection_kib{suffix}": best["rss_per_connection_kib"] if best else None,
            f"misattributed{suffix}": sum(row["misattributed"] for row in scale),
            f"stalled_client_latency_ratio{suffix}": results["stalled_isolation"][setup]["ratio"],
            f"thread_store_ratio{suffix}": results["thread_store"][setup]["ratio"],
            f"thread_store_cpu_ratio{suffix}": results["thread_store"][setup]["cpu_ratio"],
        }
    peer_result = results["peer"]
    return figures | {
        "relay_vs_echo_ratio": results["relay"]["relay_vs_echo_ratio"],
        "peer_latency_ratio": peer_result.get("latency_ratio"),
        "tool_turn_peer_latency_ratio": peer_result.get("tool_turn_latency_ratio"),
        "tool_steps_peer_latency_ratio": peer_result.get("tool_steps_latency_ratio"),
        "peer_misattributed": peer_result.get("peer_misattributed"),
        "fan_out_p50_ms": results["fan_out"]["p50_ms"],
        "fan_out_busy_p50_ms": results["fan_out"]["busy"]["p50_ms"],
        "sandbox_start_p50_ms": results["sandbox"]["sandboxed"]["p50_ms"],
        "sandbox_start_p99_ms": results["sandbox"]["sandboxed"]["p99_ms"],
        "sandbox_start_ratio": results["sandbox"]["ratio_p50"],
        **{f"abuse_{attack}_p50_ratio": results["abuse"][attack]["p50_ratio"] for attack in abuse.ATTACKS},
        **{f"abuse_{attack}_p99_ratio": results["abuse"][attack]["p99_ratio"] for attack in abuse.ATTACKS},
        **{f"abuse_{attack}_rss_after_ratio": results["abuse"][attack]["rss_after_ratio"] for attack in abuse.ATTACKS},
    }


def plot(results: dict, path: Path, before: dict | None = None) -> None:
    """The scale run; ``before``, an earlier run's JSON (``--json``), in grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for setup, rows in (before or {}).get("details", {}).get("scale", {}).items():
        counts = [row["connections"] for row in rows]
        marker = "x:" if setup == "embedded" else "+:"
        label = f"p99, {setup}, before ({before['details'].get('date', '?')})"
        left.plot(counts, [row["p99_ms"] for row in rows], marker, color="grey", label=label)
        right.plot(counts, [row["rss_per_connection_kib"] for row in rows], marker, color="grey", label=f"{setup}, before")
    for setup, rows in results["scale"].items():
        counts = [row["connections"] for row in rows]
        left.plot(counts, [row["p50_ms"] for row in rows], "o-", label=f"p50, {setup}")
        left.plot(counts, [row["p99_ms"] for row in rows], "s--", label=f"p99, {setup}")
        right.plot(counts, [row["rss_per_connection_kib"] for row in rows], "o-", label=setup)
    left.axhline(4000, color="grey", linestyle=":", label="goal: p99 4 s")
    left.set(xlabel="concurrent connections (each runs one turn)", ylabel="turn latency (ms)", title="Turn latency")
    left.legend()
    right.axhline(100, color="grey", linestyle=":", label="goal: 100 KiB")
    right.set_ylim(0, 120)
    left.set_ylim(bottom=0)
    right.set(xlabel="connections", ylabel="KiB per connection", title="Server memory per connection")
    right.legend()
    fig.suptitle(f"codexserver on one daphne process ({results['machine']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def ensure_bench_requirements() -> None:
    """The benchmark's own set-up: uvicorn and matplotlib, on top of the project's."""
    import importlib.util
    import subprocess

    if all(importlib.util.find_spec(name) for name in ("uvicorn", "matplotlib")):
        return
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "-r", str(ROOT / "bench" / "requirements.txt")], check=True
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller runs, under 5 minutes")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--plot", type=Path, help="write a PNG plot of the scale run here")
    parser.add_argument("--before", type=Path, help="an earlier run's --json, drawn in grey on the plot")
    parser.add_argument("--skip-peer", action="store_true", help="do not install or run the Codex app-server")
    parser.add_argument(
        "--only",
        choices=("store", "scale", "overhead", "sandbox", "peer", "abuse"),
        help="run only the thread-store and fan-out benchmarks (7, 8), the scale run (3), the scoping overhead (1),"
        " the sandbox (9), the peer (5) or abuse (10)",
    )
    args = parser.parse_args()  # --help prints and exits before anything is installed
    ensure_bench_requirements()

    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}",
        "quick": args.quick,
    }
    with tempfile.TemporaryDirectory(prefix="codexserver-bench-") as workdir:
        bench = Bench(args.quick, Path(workdir))
        try:
            if args.only == "store":
                results["thread_store"] = thread_store_cost(bench)
                results["fan_out"] = fan_out(bench)
                print_store_report(results)
                return 0
            if args.only == "overhead":
                results["scope_overhead"] = {setup: scoping_overhead(bench, setup) for setup in setups()}
                print_overhead_report(results)
                return 0
            if args.only == "sandbox":
                results["sandbox"] = sandbox_start_cost(args.quick)
                print_sandbox_report(results)
                return 0
            if args.only == "abuse":
                results["abuse"] = abuse.abuse_isolation(bench)
                abuse.print_abuse_report(results)
                if args.json:
                    args.json.write_text(json.dumps(results, indent=2, default=str))
                return 0
            if args.only == "peer":
                results["peer"] = peer.compare(bench, Path(workdir))
                print_peer_report(results)
                return 0
            if args.only == "scale":
                results["scale"] = {setup: connection_scale(bench, setup) for setup in setups()}
                print_scale_report(results)
                return 0
            results["client_construction"] = client_construction()
            results["scope_overhead"] = {setup: scoping_overhead(bench, setup) for setup in setups()}
            results["relay"] = relay_throughput(bench)
            results["scale"] = {setup: connection_scale(bench, setup) for setup in setups()}
            results["stalled_isolation"] = {setup: stalled_client_isolation(bench, setup) for setup in setups()}
            results["thread_store"] = thread_store_cost(bench)
            results["fan_out"] = fan_out(bench)
            results["sandbox"] = sandbox_start_cost(args.quick)
            results["abuse"] = abuse.abuse_isolation(bench)
            results["peer"] = {"skipped": "--skip-peer"} if args.skip_peer else peer.compare(bench, Path(workdir))
        finally:
            bench.close()
    print_report(results)
    if args.json:
        args.json.write_text(json.dumps({**summary(results), "details": results}, indent=2, default=str))
    if args.plot:
        plot(results, args.plot, json.loads(args.before.read_text()) if args.before else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())

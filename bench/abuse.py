"""10. One hostile client beside 50 well-behaved ones (issue 26).

For each attack, the well-behaved clients' median and p99 turn latency with
the attacker against without it (goal: within 1.2x), over rounds with and
without it taken in turn, and the server's RSS before, during and after
(goal: back within 10% once the attacker leaves). A control row, with an
"attacker" that does nothing, shows how far the ratios move on noise alone:
- memory: a client that never reads asks for the largest replies it can get
  (thread/list of 100 threads with 4,096-character working directories);
- database: a client pipelines store reads with the largest filter allowed,
  and thousands of interrupts;
- nesting: a client sends initialize frames nested 60 levels deep and
  deeper, reconnecting whenever it is closed;
- slowloris: 200 sockets trickle their request heads a byte at a time.
The attacks run one after another on one server, each with a baseline of its
own just before it (these machines are noisy), and each attacker in a process
of its own.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import statistics
import time

from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

from codexserver.devtools.attribution_load import close_clients, open_clients

WELL_BEHAVED = 50
TURN_TEXT = "flood:20:16"
# "control" attacks nothing: its ratios are the noise of the measurement itself.
ATTACKS = ("control", "memory", "database", "nesting", "slowloris")
ROUNDS = 3  # baseline and attacked rounds alternate, so drift of the machine falls on both


async def _well_behaved_latencies(ws_url: str, turns_each: int) -> list[float]:
    clients = await open_clients(ws_url, WELL_BEHAVED)
    latencies: list[float] = []

    async def worker(client) -> None:
        thread = await client.start_thread(timeout=120)
        for _ in range(turns_each):
            started = time.perf_counter()
            completed = await client.run_turn(thread, TURN_TEXT, timeout=120)
            assert completed["turn"]["status"] == "completed", completed
            latencies.append((time.perf_counter() - started) * 1000)
            client.inbox.clear()

    await asyncio.gather(*(worker(client) for _, client, _ in clients))
    await close_clients(clients)
    return latencies


def _p99(values: list[float]) -> float:
    return sorted(values)[max(0, int(len(values) * 0.99) - 1)]


async def _initialized(ws_url: str, name: str, **options):
    socket = await connect(ws_url, max_size=None, **options)
    await socket.send(json.dumps({"id": 0, "method": "initialize", "params": {"clientInfo": {"name": name, "version": "1"}}}))
    await socket.recv()
    return socket


async def _memory(ws_url: str, stop: asyncio.Event) -> None:
    socket = await _initialized(ws_url, "abuser_memory", max_queue=1)
    for index in range(100):
        await socket.send(json.dumps({"id": f"t{index}", "method": "thread/start", "params": {"cwd": "/" + "d" * 4095, "ephemeral": False}}))
    socket.transport.pause_reading()  # and never reads again
    index = 0
    try:
        while not stop.is_set():
            await socket.send(json.dumps({"id": f"l{index}", "method": "thread/list", "params": {"limit": 100}}))
            index += 1
            await asyncio.sleep(0.02)
    except WebSocketException:
        pass  # dropped for not reading, as it should be
    finally:
        socket.transport.abort()


async def _database(ws_url: str, stop: asyncio.Event) -> None:
    socket = await _initialized(ws_url, "abuser_database")
    originators = [f"originator_{index}" * 10 for index in range(100)]
    reader = asyncio.ensure_future(_drain(socket))
    index = 0
    try:
        while not stop.is_set():
            await socket.send(json.dumps({"id": f"l{index}", "method": "thread/list", "params": {"originators": originators}}))
            for _ in range(20):
                await socket.send(json.dumps({"id": f"i{index}", "method": "turn/interrupt", "params": {"threadId": "x", "turnId": "y"}}))
                index += 1
            await asyncio.sleep(0.005)
    except WebSocketException:
        pass
    finally:
        reader.cancel()
        socket.transport.abort()


async def _drain(socket) -> None:
    try:
        async for _ in socket:
            pass
    except WebSocketException:
        pass


def _nested(depth: int) -> str:
    return '{"a": ' * depth + "{}" + "}" * depth


async def _nesting(ws_url: str, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            async with connect(ws_url, max_size=None) as socket:
                reader = asyncio.ensure_future(_drain(socket))
                for depth in (60, 400, 900) * 10:
                    if stop.is_set():
                        break
                    frame = '{"id": 1, "method": "initialize", "params": {"clientInfo": {"name": "x", "version": "1"}, "capabilities": ' + _nested(depth) + "}}"
                    await socket.send(frame)
                    await asyncio.sleep(0.002)
                reader.cancel()
        except (WebSocketException, OSError):
            await asyncio.sleep(0.01)


async def _slowloris(ws_url: str, stop: asyncio.Event) -> None:
    host, port = ws_url.split("//")[1].rstrip("/").split(":")
    writers = []
    while not stop.is_set():
        while len(writers) < 200 and not stop.is_set():
            try:
                _, writer = await asyncio.open_connection(host, int(port))
            except OSError:
                break
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
            writers.append(writer)
        for writer in list(writers):
            if writer.is_closing() or writer.transport.is_closing():
                writers.remove(writer)
                continue
            try:
                writer.write(b"X")
            except (OSError, RuntimeError):
                writers.remove(writer)
        await asyncio.sleep(1.0)
    for writer in writers:
        writer.transport.abort()


async def _control(ws_url: str, stop: asyncio.Event) -> None:
    await stop.wait()


ATTACKERS = {"control": _control, "memory": _memory, "database": _database, "nesting": _nesting, "slowloris": _slowloris}


def _attacker_process(attack: str, ws_url: str, stop) -> None:
    """The attacker, in a process of its own: in the clients' process its
    loop would slow the well-behaved clients' own measurement."""

    async def run() -> None:
        stopped = asyncio.Event()

        async def watch() -> None:
            while not stop.is_set():
                await asyncio.sleep(0.05)
            stopped.set()

        watcher = asyncio.ensure_future(watch())
        await ATTACKERS[attack](ws_url, stopped)
        watcher.cancel()

    asyncio.run(run())


async def _under_attack(ws_url: str, attack: str, turns_each: int, server) -> tuple[list[float], int]:
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    attacker = context.Process(target=_attacker_process, args=(attack, ws_url, stop), name=f"attacker {attack}")
    attacker.start()
    await asyncio.sleep(1.5)  # the attack is under way before the clients start
    try:
        latencies = await _well_behaved_latencies(ws_url, turns_each)
        rss_during = server.rss_bytes()
    finally:
        stop.set()
        attacker.join(30)
        if attacker.is_alive():
            attacker.kill()
    return latencies, rss_during


def abuse_isolation(bench) -> dict:
    server = bench.start("ours_abuse", CODEX_REQUEST_HEAD_SECONDS="5")
    turns_each = 3 if bench.quick else 8
    asyncio.run(_well_behaved_latencies(server.ws_url, 1))  # warm up
    results: dict = {}
    for attack in ATTACKS:
        alone, attacked, rss_during = [], [], 0
        rss_before = None
        for _ in range(2 if bench.quick else ROUNDS):
            alone += asyncio.run(_well_behaved_latencies(server.ws_url, turns_each))
            if rss_before is None:
                rss_before = server.rss_bytes()  # after the same clients' own round: what the attacker adds
            under_attack, rss = asyncio.run(_under_attack(server.ws_url, attack, turns_each, server))
            attacked += under_attack
            rss_during = max(rss_during, rss)
        time.sleep(2)  # what the attacker held is given back
        rss_after = server.rss_bytes()
        results[attack] = {
            "alone_p50_ms": statistics.median(alone),
            "alone_p99_ms": _p99(alone),
            "attacked_p50_ms": statistics.median(attacked),
            "attacked_p99_ms": _p99(attacked),
            "p50_ratio": statistics.median(attacked) / statistics.median(alone),
            "p99_ratio": _p99(attacked) / _p99(alone),
            "rss_before_mib": rss_before / 2**20,
            "rss_during_mib": rss_during / 2**20,
            "rss_after_mib": rss_after / 2**20,
            "rss_after_ratio": rss_after / rss_before,
        }
    results["server_alive"] = server.process.poll() is None
    bench.stop(server)
    return results


def print_abuse_report(results: dict) -> None:
    abuse = results["abuse"]
    print(f"\n10. one hostile client beside {WELL_BEHAVED} well-behaved ones (their turn latency; the server's RSS)")
    print(f"   {'attack':<10} {'p50 ms':>15} {'p50 x':>6} {'p99 ms':>15} {'p99 x':>6} {'RSS MiB before/during/after':>28}")
    for attack in ATTACKS:
        row = abuse[attack]
        print(
            f"   {attack:<10} {row['alone_p50_ms']:6.1f} → {row['attacked_p50_ms']:6.1f} {row['p50_ratio']:6.2f}"
            f" {row['alone_p99_ms']:6.1f} → {row['attacked_p99_ms']:6.1f} {row['p99_ratio']:6.2f}"
            f"   {row['rss_before_mib']:7.1f} / {row['rss_during_mib']:7.1f} / {row['rss_after_mib']:7.1f}"
        )

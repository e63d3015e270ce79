"""Many concurrent clients with distinct identities, each running turns; count misattributions.

Shared by the load test (CI: 200 connections) and the benchmarks (up to 2,000).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from websockets.asyncio.client import connect

from .local_upstream import UpstreamServer
from .rpc_client import SocketClient


@dataclass
class LoadReport:
    connections: int
    turns: int = 0
    completed: int = 0
    server_errors: int = 0
    misattributed: int = 0
    latencies: list[float] = field(default_factory=list)

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


def client_name(index: int) -> str:
    return f"load_client_{index:05d}"


async def open_clients(
    ws_url: str, count: int, batch: int = 100, first_index: int = 0
) -> list[tuple[str, SocketClient, object]]:
    """Connect and initialize ``count`` clients named from ``first_index`` on,
    ``batch`` at a time; returns (name, client, socket)."""
    opened: list[tuple[str, SocketClient, object]] = []

    async def open_one(index: int):
        socket = await connect(ws_url, open_timeout=60, max_size=None)
        client = SocketClient(socket)
        await client.initialize(client_name(index), "1.0.0")
        return client_name(index), client, socket

    end = first_index + count
    for start in range(first_index, end, batch):
        opened += await asyncio.gather(*(open_one(i) for i in range(start, min(end, start + batch))))
    return opened


async def run_turns(clients, text: str, report: LoadReport, timeout: float = 120.0) -> dict[str, str]:
    """Every client starts a thread; once all have one, every client starts a
    turn at the same instant; returns thread id → client name."""
    # 2,000 at once queue on one process: the turns' latencies would depend on
    # how the thread starts spread out if each client went on at once.
    threads = await asyncio.gather(*(client.start_thread(timeout=timeout) for _, client, _ in clients))

    async def one(name: str, client: SocketClient, thread: str) -> tuple[str, str]:
        started = time.perf_counter()
        completed = await client.run_turn(thread, text, timeout=timeout)
        report.latencies.append(time.perf_counter() - started)
        report.turns += 1
        report.completed += completed["turn"]["status"] == "completed"
        report.server_errors += sum("error" in m for m in client.inbox)
        return thread, name

    return dict(await asyncio.gather(*(one(name, client, thread) for (name, client, _), thread in zip(clients, threads))))


def count_misattributed(upstream: UpstreamServer, owners: dict[str, str]) -> int:
    """Model requests whose identity headers are not those of the thread's owner."""
    wrong = 0
    for record in upstream.model_requests():
        owner = owners.get(record.headers.get("session-id"))
        if owner is None:
            continue
        wrong += record.originator != owner or not (record.user_agent or "").endswith(f"({owner}; 1.0.0)")
    return wrong


async def close_clients(clients) -> None:
    for _, client, socket in clients:
        await client.close()
    await asyncio.gather(*(socket.close() for _, _, socket in clients), return_exceptions=True)

"""The peer: the real Codex app-server (npm ``@openai/codex``), on the same local upstream.

Installed here, not in the project's requirements: ``npm install`` into
``bench/.peer`` on first use. Without npm this part is skipped and says so.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import subprocess
import time
from collections import Counter
from pathlib import Path

from websockets.asyncio.client import connect

from codexserver.devtools.attribution_load import (
    LoadReport,
    close_clients,
    count_misattributed,
    open_clients,
    run_turns,
)
from codexserver.devtools.rpc_client import SocketClient
from codexserver.devtools.server_process import ServerProcess

PEER_PACKAGE = "@openai/codex@0.169.0"
PEER_DIR = Path(__file__).resolve().parent / ".peer"
PEER_BIN = PEER_DIR / "node_modules" / ".bin" / "codex"
CONCURRENT_CLIENTS = 20

CONFIG = """\
model = "gpt-bench"
model_provider = "local"
approval_policy = "never"
sandbox_mode = "read-only"

[model_providers.local]
name = "local upstream (canned replies)"
base_url = "{base_url}"
wire_api = "responses"
env_key = "OPENAI_API_KEY"
"""


def ensure_installed() -> str | None:
    """None when the peer is ready, else why it is not."""
    if PEER_BIN.exists():
        return None
    if shutil.which("npm") is None:
        return "npm is not available"
    PEER_DIR.mkdir(exist_ok=True)
    done = subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--prefix", str(PEER_DIR), PEER_PACKAGE],
        capture_output=True, text=True, timeout=600,
    )
    if done.returncode != 0 or not PEER_BIN.exists():
        return f"npm install {PEER_PACKAGE} failed: {done.stderr.strip()[-300:]}"
    return None


def start_peer(bench, workdir: Path) -> ServerProcess:
    home = workdir / "peer-home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(CONFIG.format(base_url=bench.upstream.api_base_url))
    env = {**bench.env, "CODEX_HOME": str(home), "RUST_LOG": "error"}
    server = ServerProcess(
        env,
        workdir / "peer.log",
        command=["app-server", "--listen", "ws://127.0.0.1:{port}"],
        ready_path="/",
    )
    server.executable = str(PEER_BIN)
    return server.start()


CHAT_TURN = "flood:20:16"  # a reply of 20 deltas
TOOL_TURN = "exec[true]"  # the model runs `true`, then answers with its output: two model requests
TOOL_STEPS_TURN = "exec[true] steps:10"  # ten tool steps, one `true` each: eleven model requests


async def sequential_latency(ws_url: str, turns: int, text: str = CHAT_TURN, **thread_params) -> float:
    async with connect(ws_url, max_size=None) as socket:
        client = SocketClient(socket)
        await client.initialize("bench_latency", "1.0.0")
        thread = await client.start_thread(**thread_params)
        await client.run_turn(thread, text, timeout=60)  # warm up
        latencies = []
        for _ in range(turns):
            client.inbox.clear()
            started = time.perf_counter()
            completed = await client.run_turn(thread, text, timeout=60)
            assert completed["turn"]["status"] == "completed", completed
            if text.startswith("exec["):  # the command ran (the scripted model repeats its output): not refused
                said = [item["text"] for item in completed["turn"]["items"] if item["type"] == "agentMessage"]
                assert "Process exited with code 0" in said[-1], completed
            latencies.append(time.perf_counter() - started)
        await client.close()
        return statistics.median(latencies) * 1000


async def misattributed(bench, ws_url: str) -> tuple[int, int, dict[str, int]]:
    """(model requests carrying another connection's identity, model requests, originators seen)."""
    bench.upstream.reset()
    clients = await open_clients(ws_url, CONCURRENT_CLIENTS, batch=CONCURRENT_CLIENTS)
    owners = await run_turns(clients, "flood:5:16", LoadReport(connections=CONCURRENT_CLIENTS), timeout=120)
    await close_clients(clients)
    requests = bench.upstream.model_requests()
    seen = Counter(record.originator for record in requests)
    return count_misattributed(bench.upstream, owners), len(requests), dict(seen.most_common(3))


def compare(bench, workdir: Path) -> dict:
    why_not = ensure_installed()
    if why_not:
        return {"skipped": why_not}
    version = subprocess.run([str(PEER_BIN), "--version"], capture_output=True, text=True).stdout.strip()
    workspace = workdir / "peer-workspace"  # where both run the tool turn's command, in their sandboxes
    workspace.mkdir(exist_ok=True)
    ours = bench.start("ours_peer", CODEX_WORKSPACE_ROOTS=str(workspace))
    peer = start_peer(bench, workdir)
    bench.servers.append(peer)
    turns = 10 if bench.quick else 30
    samples = {"ours": [], "peer": []}
    tool_samples = {"ours": [], "peer": []}
    steps_samples = {"ours": [], "peer": []}
    for _ in range(2 if bench.quick else 3):  # interleaved: both see the same machine
        for name, server in (("ours", ours), ("peer", peer)):
            samples[name].append(asyncio.run(sequential_latency(server.ws_url, turns)))
            for text, kept, count in ((TOOL_TURN, tool_samples, turns), (TOOL_STEPS_TURN, steps_samples, max(3, turns // 3))):
                kept[name].append(
                    asyncio.run(sequential_latency(server.ws_url, count, text, cwd=str(workspace), sandbox="read-only"))
                )
    ours_wrong, ours_total, _ = asyncio.run(misattributed(bench, ours.ws_url))
    peer_wrong, peer_total, peer_seen = asyncio.run(misattributed(bench, peer.ws_url))
    bench.stop(ours)
    bench.stop(peer)
    ours_ms, peer_ms = statistics.median(samples["ours"]), statistics.median(samples["peer"])
    ours_tool_ms, peer_tool_ms = statistics.median(tool_samples["ours"]), statistics.median(tool_samples["peer"])
    ours_steps_ms, peer_steps_ms = statistics.median(steps_samples["ours"]), statistics.median(steps_samples["peer"])
    return {
        "version": version,
        "ours_median_ms": ours_ms,
        "peer_median_ms": peer_ms,
        "latency_ratio": ours_ms / peer_ms,
        "ours_tool_turn_median_ms": ours_tool_ms,
        "peer_tool_turn_median_ms": peer_tool_ms,
        "tool_turn_latency_ratio": ours_tool_ms / peer_tool_ms,
        "ours_tool_steps_median_ms": ours_steps_ms,
        "peer_tool_steps_median_ms": peer_steps_ms,
        "tool_steps_latency_ratio": ours_steps_ms / peer_steps_ms,
        "ours_misattributed": ours_wrong,
        "ours_requests": ours_total,
        "peer_misattributed": peer_wrong,
        "peer_requests": peer_total,
        "peer_originators_seen": peer_seen,  # most common originators on the peer's model requests
    }

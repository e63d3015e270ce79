"""Send hostile frames to a real app-server process and check it survives.

    .venv/bin/python scripts/fuzz_server.py --frames 100000

Starts its own local upstream and `manage.py serve` on loopback, sends the frames over several
connections, then checks the process is alive and a fresh client can
initialize and run a turn. Exits non-zero on any invalid reply.
"""

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "codexserver.settings")

from websockets.asyncio.client import connect  # noqa: E402

from codexserver.devtools.hostile_frames import fuzz_server  # noqa: E402
from codexserver.devtools.local_upstream import UpstreamServer  # noqa: E402
from codexserver.devtools.rpc_client import SocketClient  # noqa: E402
from codexserver.devtools.server_process import ServerProcess, migrate  # noqa: E402


async def fresh_client_works(ws_url: str) -> bool:
    async with connect(ws_url) as websocket:
        client = SocketClient(websocket)
        await client.initialize("after_fuzz", "1")
        completed = await client.run_turn(await client.start_thread())
        return completed["turn"]["status"] == "completed"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    upstream = UpstreamServer().start()
    with tempfile.TemporaryDirectory() as workdir:
        env = {
            **os.environ,
            "DATABASE_URL": f"sqlite:///{workdir}/fuzz.sqlite3",
            "CODEX_API_BASE_URL": upstream.api_base_url,
            "CODEX_CHATGPT_BASE_URL": upstream.chatgpt_base_url,
            "OPENAI_API_KEY": "sk-fuzz",
            "CODEX_LOG_LEVEL": "ERROR",
        }
        migrate(env)
        server = ServerProcess(env, Path(workdir) / "server.log").start()
        try:
            report = asyncio.run(fuzz_server(server.ws_url, args.frames, args.connections, args.seed))
            alive = server.process.poll() is None
            works = asyncio.run(fresh_client_works(server.ws_url))
        finally:
            server.stop()
            upstream.stop()
    print(report.summary())
    print(f"server alive afterwards: {alive}; fresh client ran a turn: {works}")
    return 0 if alive and works and not report.invalid_replies else 1


if __name__ == "__main__":
    sys.exit(main())

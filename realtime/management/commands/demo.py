"""``python manage.py demo``: the whole point of the project, offline, in one command.

Starts a local upstream that answers with a canned reply (never a real
model), serves the app-server on a free loopback port, connects
``codex-backend`` first and ``codex_ios`` second, runs a turn, a realtime
start and ``app/list`` on each, then prints every upstream request with the
identity it carried, and the ConnectionIdentity rows.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import tempfile
from pathlib import Path

from django.core.management.base import BaseCommand
from websockets.asyncio.client import connect

from codexserver.devtools.local_upstream import UpstreamServer
from codexserver.devtools.rpc_client import SocketClient
from codexserver.devtools.server_process import ServerProcess, migrate

CANNED_REPLY = ["[canned reply from the local demo upstream] ", "Hello from ", "a fake model."]
DEMO_API_KEY = "sk-demo-not-a-real-key"
CLIENTS = [("codex-backend", "2.0.0"), ("codex_ios", "1.4.0")]


class Command(BaseCommand):
    help = "Run an offline demo: two clients, one process, each upstream request labelled with its own identity."

    def handle(self, *args, **options):
        upstream = UpstreamServer()
        upstream.canned_reply = CANNED_REPLY
        upstream.apps = [
            {"id": "github", "name": "GitHub", "description": "shown to everyone"},
            {"id": "shortcuts", "name": "Shortcuts", "description": "iOS only", "originators": ["codex_ios"]},
        ]
        upstream.start()
        with tempfile.TemporaryDirectory(prefix="codexserver-demo-") as workdir:
            database = Path(workdir) / "demo.sqlite3"
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith(("CODEX_", "DATABASE_URL", "REDIS_URL"))},
                "DATABASE_URL": f"sqlite:///{database}",
                "CODEX_API_BASE_URL": upstream.api_base_url,
                "CODEX_CHATGPT_BASE_URL": upstream.chatgpt_base_url,
                "OPENAI_API_KEY": DEMO_API_KEY,
                "CODEX_SERVER_INSTANCE": "demo",
                "CODEX_TELEMETRY_FLUSH_INTERVAL": "0.1",
                "CODEX_LOG_LEVEL": "WARNING",
            }
            migrate(env)
            server = ServerProcess(env, Path(workdir) / "server.log").start()
            self.stdout.write(f"local upstream (canned replies, no network): {upstream.url}")
            self.stdout.write(f"app-server (daphne): {server.ws_url}\n")
            try:
                caused = asyncio.run(self._run_clients(server, upstream))
            finally:
                server.stop()
                upstream.stop()
            self._print_requests(upstream, caused)
            self._print_rows(database)

    async def _run_clients(self, server: ServerProcess, upstream: UpstreamServer) -> list[tuple[str, str]]:
        """Each client acts in turn; returns, for each request the upstream
        received, (the client that caused it, the User-Agent it must carry)."""
        caused: list[tuple[str, str]] = []
        async with connect(server.ws_url) as first, connect(server.ws_url) as second:
            clients = [SocketClient(first), SocketClient(second)]
            user_agents = {}
            for client, (name, version) in zip(clients, CLIENTS):  # backend first, on purpose
                result = await client.initialize(name, version)
                user_agents[name] = result["userAgent"]
                self.stdout.write(f"{name:<15} initialized, userAgent = {result['userAgent']}")
            for client, (name, _) in zip(clients, CLIENTS):
                before = len(_sent(upstream))
                await self._act(client, name)
                await _settled(upstream, before)  # its telemetry too, before the next client acts
                caused += [(name, user_agents[name])] * (len(_sent(upstream)) - before)
        return caused

    async def _act(self, client: SocketClient, name: str) -> None:
        """A turn, a realtime call and an app listing; its telemetry flushed before the next client acts."""
        thread = await client.start_thread()
        completed = await client.run_turn(thread, f"hello from {name}")
        call = await client.call("thread/realtime/start", {"threadId": thread, "sdp": f"v=0\r\no={name}\r\n"})
        apps = await client.call("app/list", {})
        reply = "".join(m["params"]["delta"] for m in client.inbox if m.get("method") == "item/agentMessage/delta")
        self.stdout.write(
            f"{name:<15} turn {completed['turn']['status']}: {reply!r}; "
            f"realtime call {call['callId']}; apps {[a['id'] for a in apps['data']]}"
        )
        await client.call("thread/realtime/stop", {"threadId": thread})

    def _print_requests(self, upstream: UpstreamServer, caused: list[tuple[str, str]]) -> None:
        self.stdout.write("\nEvery request the upstream received, the client that caused it, and the identity it carried:\n")
        rows = [("#", "request", "caused by", "originator", "User-Agent")]
        wrong = 0
        sent = _sent(upstream)
        caused = caused + [("?", "")] * (len(sent) - len(caused))  # (none expected: counted as wrong if any)
        for number, (record, (client, user_agent)) in enumerate(zip(sent, caused), 1):
            target = f"{record.method} {record.path}" + (f"?{record.query}" if record.query else "")
            if record.kind == "ws-message":
                target = f"  ws message {record.body.get('type')} on {record.path}"
            rows.append((str(number), target, client, record.originator or "-", record.user_agent or "-"))
            wrong += record.user_agent != user_agent or record.originator != user_agent.split("/", 1)[0]
        self._table(rows)
        self.stdout.write(f"\nrequests checked: {len(sent)}, carrying another client's identity: {wrong}")

    def _print_rows(self, database: Path) -> None:
        self.stdout.write("\nConnectionIdentity rows:\n")
        with sqlite3.connect(database) as db:
            found = db.execute(
                "select client_name, originator, is_infrastructure, is_first_party, user_agent,"
                " disconnected_at is not null from identity_connectionidentity order by connected_at"
            ).fetchall()
        rows = [("client_name", "originator", "infra", "1st-party", "user_agent", "closed")]
        rows += [(n, o, str(bool(i)), str(bool(f)), ua, str(bool(c))) for n, o, i, f, ua, c in found]
        self._table(rows)

    def _table(self, rows: list[tuple[str, ...]]) -> None:
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for index, row in enumerate(rows):
            self.stdout.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
            if index == 0:
                self.stdout.write("  ".join("-" * width for width in widths))


def _sent(upstream: UpstreamServer) -> list:
    """What the upstream received (a stream's end is not a request)."""
    return [record for record in upstream.records if record.kind != "closed"]


async def _settled(upstream: UpstreamServer, before: int, quiet: float = 0.5, most: float = 10.0) -> None:
    """Until the client's telemetry has arrived and nothing more came for ``quiet`` seconds."""
    loop = asyncio.get_running_loop()
    deadline, last, still_since = loop.time() + most, -1, loop.time()
    while loop.time() < deadline:
        sent = _sent(upstream)[before:]
        if len(sent) != last:
            last, still_since = len(sent), loop.time()
        elif any("analytics-events" in record.path for record in sent) and loop.time() - still_since >= quiet:
            return
        await asyncio.sleep(0.05)

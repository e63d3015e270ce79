"""The sandbox, tried from the inside (PROTOCOL §11): each test runs real
commands under the real bubblewrap and tries to get out, never checks the
flags it was given.

The workspaces live in the checkout's ignored ``.cache/``, not under
``/tmp``: a command's ``/tmp`` is its own, so a write there proves nothing.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import uuid

import pytest

from codexserver.devtools.server_process import PROJECT_DIR
from realtime.tools.exec_sessions import MAX_KEPT_OUTPUT, SessionRegistry
from realtime.tools.sandbox import (
    FULL_ACCESS,
    READ_ONLY,
    WORKSPACE_WRITE,
    SandboxPolicy,
    bwrap_binary,
    sandboxed_argv,
)

SECRETS = {
    "OPENAI_API_KEY": "sk-test-sandbox-secret-0123456789",
    "CODEX_WS_AUTH_TOKEN": "ws-token-sandbox-secret",
    "DATABASE_URL": "postgres://postgres:hunter2@127.0.0.1:5432/test",
    "REDIS_URL": "redis://:hunter2@127.0.0.1:6379/0",
    "DJANGO_SECRET_KEY": "django-secret-sandbox",
}


@pytest.fixture
def places():
    """A workspace with the server's database file in it, and a directory beside it."""
    root = PROJECT_DIR / ".cache" / f"sandbox-{uuid.uuid4().hex[:8]}"
    workspace, outside = root / "workspace", root / "outside"
    workspace.mkdir(parents=True)
    outside.mkdir()
    (workspace / "notes.txt").write_text("visible\n")
    (workspace / "db.sqlite3").write_text("the server's rows\n")
    yield workspace, outside
    shutil.rmtree(root, ignore_errors=True)


def line(argv: list[str], workspace, policy: SandboxPolicy, hidden=(), protected=()) -> list[str]:
    """The sandbox's command line for ``argv``, run in the workspace."""
    return sandboxed_argv(
        argv, str(workspace), str(workspace), policy, tuple(map(str, hidden)), bwrap_binary(), tuple(map(str, protected))
    )


def run(command: str, workspace, policy: SandboxPolicy, hidden=(), protected=()) -> str:
    """The command's output (stdout and stderr), run as the server runs one: a session."""

    async def session_output() -> str:
        argv = line(["/bin/bash", "-c", command], workspace, policy, hidden, protected)
        session = await SessionRegistry().start(argv, thread_id="t", turn_id="u", item_id="i", command=command, cwd=str(workspace))
        await session.wait(30)
        assert not session.running
        return session.kept.text()

    return asyncio.run(session_output())


def writable(workspace) -> SandboxPolicy:
    return SandboxPolicy(WORKSPACE_WRITE, (str(workspace),))


def test_a_command_writes_its_workspace_and_nothing_else(places):
    workspace, outside = places
    output = run(f"echo made > made.txt; echo escaped > {outside}/escaped.txt; echo x > {PROJECT_DIR}/escaped.txt", workspace, writable(workspace))
    assert (workspace / "made.txt").read_text() == "made\n"
    assert not (outside / "escaped.txt").exists() and not (PROJECT_DIR / "escaped.txt").exists()
    if not str(PROJECT_DIR).startswith("/tmp/"):  # under /tmp (CI's clone may be) they land in the command's own /tmp
        assert output.count("Read-only file system") == 2


def test_read_only_refuses_every_write_even_in_the_workspace(places):
    workspace, _ = places
    output = run("echo x > notes.txt; rm notes.txt; cat notes.txt", workspace, SandboxPolicy(READ_ONLY))
    assert (workspace / "notes.txt").read_text() == "visible\n"
    assert output.endswith("visible\n") and "Read-only file system" in output


def test_no_network_unless_granted(places):
    workspace, _ = places
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        probe = f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), 2)\" && echo reached"
        assert "reached" not in run(probe, workspace, writable(workspace))
        granted = SandboxPolicy(WORKSPACE_WRITE, (str(workspace),), network_access=True)
        assert run(probe, workspace, granted) == "reached\n"


def test_the_servers_secrets_and_files_are_invisible_inside(places, monkeypatch):
    workspace, _ = places
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    seen = run(
        "env; cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n'; cat /proc/1/cmdline; ls /proc; cat db.sqlite3; cat notes.txt",
        workspace,
        writable(workspace),
        hidden=[workspace / "db.sqlite3"],
    )
    assert not any(value in seen for value in SECRETS.values())
    assert not any(name in seen for name in SECRETS)
    assert "the server's rows" not in seen and "visible" in seen
    # its own PID namespace: it sees a handful of its own processes, never the server's
    pids = [line for line in seen.splitlines() if line.isdigit()]
    assert len(pids) < 10 and str(__import__("os").getpid()) not in pids


def test_a_hidden_directory_stays_hidden_where_the_workspace_lies_inside_it(places):
    workspace, _ = places
    home = workspace.parent  # the server's home, say, with the workspace inside
    (home / "credentials").write_text("aws secret\n")
    output = run(f"cat {home}/credentials; cat notes.txt; ls {home}", workspace, writable(workspace), hidden=[home])
    assert "aws secret" not in output and "visible" in output


def test_full_access_has_no_sandbox_to_build():
    with pytest.raises(ValueError):
        line(["true"], "/", SandboxPolicy(FULL_ACCESS))


async def test_killing_a_session_leaves_no_process_behind(places):
    workspace, _ = places
    marker = f"sleep {300 + uuid.uuid4().int % 100}.{uuid.uuid4().int % 1000}"
    registry = SessionRegistry()
    argv = line(["/bin/bash", "-c", f"{marker} & {marker} & {marker}"], workspace, writable(workspace))
    session = await registry.start(argv, thread_id="t", turn_id="u", item_id="i", command=marker, cwd=str(workspace))
    await session.wait(0.5)
    assert _processes(marker) >= 3
    registry.kill_turns("t", "u")
    await session.wait(1.0)
    assert not session.running
    for _ in range(50):  # the kernel ends the namespace's processes a moment after its bwrap
        if _processes(marker) == 0:
            break
        await asyncio.sleep(0.02)
    assert _processes(marker) == 0


async def test_a_sessions_kept_output_is_bounded_head_and_tail(places):
    workspace, _ = places
    registry = SessionRegistry()
    script = "python3 -c \"import sys; sys.stdout.write('H' * 100 + 'x' * 3_000_000 + 'T' * 100)\""
    argv = line(["/bin/bash", "-c", script], workspace, writable(workspace))
    session = await registry.start(argv, thread_id="t", turn_id="u", item_id="i", command="big", cwd=str(workspace))
    await session.wait(20)
    kept = session.kept.text()
    assert session.exit_code == 0
    assert kept.startswith("H" * 100) and kept.endswith("T" * 100) and len(kept) <= MAX_KEPT_OUTPUT + 100


def _processes(pattern: str) -> int:
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return len(found.stdout.split())


def test_sessions_are_bounded_per_thread(places, monkeypatch):
    from realtime.tools import exec_sessions

    workspace, _ = places
    monkeypatch.setattr(exec_sessions, "MAX_SESSIONS_PER_THREAD", 2)

    async def start_three():
        registry = SessionRegistry()
        argv = line(["/bin/sleep", "30"], workspace, writable(workspace))
        try:
            for _ in range(3):
                await registry.start(argv, thread_id="t", turn_id="u", item_id="i", command="sleep", cwd=str(workspace))
        finally:
            await registry.stop_all()

    with pytest.raises(exec_sessions.SessionLimitReached):
        asyncio.run(start_three())


def test_local_services_sockets_are_out_of_reach_even_with_network_access(places):
    workspace, _ = places
    probe = (
        "python3 -c \"import socket, sys; s = socket.socket(socket.AF_UNIX); "
        "s.connect('/var/run/postgresql/.s.PGSQL.5432'); print('reached')\""
    )
    assert os.path.exists("/var/run/postgresql/.s.PGSQL.5432")  # this machine's PostgreSQL, outside
    granted = SandboxPolicy(WORKSPACE_WRITE, (str(workspace),), network_access=True)
    assert "reached" not in run(probe, workspace, granted)


def test_the_servers_own_files_stay_read_only_inside_a_writable_workspace(places):
    workspace, _ = places
    server_dir = workspace / "server"  # as when the workspace root is the server's checkout
    server_dir.mkdir()
    (server_dir / "settings.py").write_text("SAFE = True\n")
    output = run(
        "echo 'SAFE = False' > server/settings.py; touch server/db.sqlite3-journal; touch mine.txt; cat db.sqlite3",
        workspace,
        writable(workspace),
        hidden=[workspace / "db.sqlite3"],
        protected=[server_dir],
    )
    assert (server_dir / "settings.py").read_text() == "SAFE = True\n"
    assert not (server_dir / "db.sqlite3-journal").exists() and (workspace / "mine.txt").exists()
    assert "the server's rows" not in output


def test_a_hidden_place_equal_to_the_workspace_stays_hidden(places):
    workspace, _ = places
    output = run("ls -a; cat notes.txt", workspace, writable(workspace), hidden=[workspace])
    assert "visible" not in output  # the server's home as a workspace shows nothing of it


def test_a_workspace_inside_the_servers_own_files_is_not_writable(places):
    workspace, _ = places
    output = run("echo changed > notes.txt", workspace, writable(workspace), protected=[workspace.parent])
    assert (workspace / "notes.txt").read_text() == "visible\n" and "Read-only file system" in output

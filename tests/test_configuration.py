"""A new operator's mistakes end in one line naming what to fix, never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from codexserver.devtools.server_process import PROJECT_DIR


def manage(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("CODEX_", "OPENAI_", "DATABASE_", "REDIS_"))}
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=PROJECT_DIR, env={**clean, **env}, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    "variable, value",
    [
        ("CODEX_RESPONSES_TRANSPORT", "bogus"),
        ("CODEX_UPSTREAM_MAX_TRIES", "abc"),
        ("CODEX_UPSTREAM_IDLE_TIMEOUT", "-1"),
        ("CODEX_MAX_HISTORY_BYTES", "4MB"),
        ("CODEX_API_BASE_URL", "api.openai.com/v1"),
        ("CODEX_LOG_LEVEL", "loud"),
    ],
)
def test_a_bad_setting_stops_the_process_in_one_line_naming_it(variable, value):
    result = manage("check", **{variable: value})
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("configuration error: ") and variable in line and repr(value) in line


def test_a_bad_duration_is_a_usage_error():
    result = manage("close_stale_connections", "--older-than", "1x")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot read '1x' as a duration" in result.stderr


def test_serve_says_it_cannot_listen_before_saying_it_listens(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = manage("serve", "--port", str(port), DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "listening" not in result.stdout
    assert "OPENAI_API_KEY is not set" in result.stderr


def test_help_of_the_scripts_installs_nothing_and_offers_only_real_options():
    offline = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "/nonexistent"}  # an install would fail
    bench = subprocess.run([sys.executable, "bench/run.py", "--help"], cwd=PROJECT_DIR, env=offline, capture_output=True, text=True, timeout=120)
    assert bench.returncode == 0 and "--quick" in bench.stdout and "Successfully installed" not in bench.stdout
    fuzz = subprocess.run([sys.executable, "scripts/fuzz_server.py", "--help"], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=60)
    assert fuzz.returncode == 0 and "--url" not in fuzz.stdout

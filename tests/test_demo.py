"""`manage.py demo` runs offline and shows each client's own identity on every request."""

import subprocess
import sys

import pytest

from codexserver.devtools.server_process import PROJECT_DIR

pytestmark = pytest.mark.e2e


def test_demo_prints_requests_attributed_to_their_own_client():
    done = subprocess.run(
        [sys.executable, "manage.py", "demo"], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "canned reply from the local demo upstream" in out
    table = out.split("Every request the upstream received", 1)[1].split("ConnectionIdentity rows", 1)[0]
    lines = [line for line in table.splitlines() if line[:1].isdigit()]
    assert len(lines) >= 10
    for line in lines:
        if "(codex_ios; 1.4.0)" in line:
            assert " codex_ios      codex_ios " in line and "codex_ios/" in line  # caused by, and carried
        else:
            assert "(codex-backend; 2.0.0)" in line and " codex-backend  codex_cli_rs " in line
    assert {"codex-backend", "codex_ios"} == {line.split()[3] for line in lines if "analytics-events" in line}  # each one's telemetry
    assert f"requests checked: {len(lines)}, carrying another client's identity: 0" in out
    assert sum("/v1/responses" in line for line in lines) == 2
    rows = out.split("ConnectionIdentity rows", 1)[1]
    assert "codex-backend  codex_cli_rs  True" in rows and "codex_ios      codex_ios     False" in rows

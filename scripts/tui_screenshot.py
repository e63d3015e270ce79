"""Refreshes docs/codex-tui.png (the real Codex TUI chatting through this
server) and docs/codex-tui-approval.png (it running a command in the
sandbox, then asking to approve one that leaves it).

    .venv/bin/python scripts/tui_screenshot.py

Needs tmux, aha and chromium (Debian packages). Offline: the upstream is the
local recording one, whose replies are canned text ("slow:N" streams N words).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from codexserver.devtools.local_upstream import UpstreamServer  # noqa: E402
from codexserver.devtools.server_process import ServerProcess, migrate  # noqa: E402
from tests.codex_cli import CONFIG_TOML, Terminal, codex_binary  # noqa: E402

OUT = PROJECT / "docs" / "codex-tui.png"
APPROVAL_OUT = PROJECT / "docs" / "codex-tui-approval.png"


def save_screen(terminal: Terminal, work: Path, out: Path, height: int = 560) -> None:
    """The terminal as it looks, colours and all: tmux's ANSI screen, as HTML (aha), through Chromium."""
    ansi = terminal._run("capture-pane", "-e", "-p", "-t", "main")
    html = subprocess.run(["aha", "--black", "--title", "Codex TUI"], input=ansi, capture_output=True, text=True, check=True).stdout
    page = work / f"{out.stem}.html"
    page.write_text(html.replace("<pre>", '<pre style="font-size:15px;line-height:1.25;margin:12px">'))
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--hide-scrollbars", f"--screenshot={out}",
         f"--window-size=1040,{height}", page.as_uri()],
        check=True, capture_output=True,
    )  # fmt: skip
    print(f"wrote {out}")


def main() -> None:
    work = Path(tempfile.mkdtemp())
    upstream = UpstreamServer().start()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CODEX_", "OPENAI_", "DATABASE_", "REDIS_"))}
    env.update(
        DATABASE_URL=f"sqlite:///{work / 'db.sqlite3'}",
        CODEX_API_BASE_URL=upstream.api_base_url,
        CODEX_CHATGPT_BASE_URL=upstream.chatgpt_base_url,
        OPENAI_API_KEY="sk-screenshot-not-a-real-key",
    )
    workspace = work / "workspace"
    workspace.mkdir()
    env["CODEX_WORKSPACE_ROOTS"] = str(workspace)
    migrate(env)
    server = ServerProcess(env, work / "server.log").start()
    home = work / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text(CONFIG_TOML)
    try:
        terminal = Terminal(width=110, height=24).start(
            f"{codex_binary()} --remote ws://127.0.0.1:{server.port}", cwd=work, env={"CODEX_HOME": home}
        )
        terminal.wait_for_text("Ask Codex to do anything", timeout=60)
        for prompt, expect in [("Hello from the Codex TUI", "Hello world"), ("slow:12", "d11")]:
            send(terminal, prompt, expect)
        save_screen(terminal, work, OUT)
        terminal.close()

        terminal = Terminal(width=110, height=30).start(
            f"{codex_binary()} --remote ws://127.0.0.1:{server.port}", cwd=work, env={"CODEX_HOME": home}
        )
        terminal.wait_for_text("Ask Codex to do anything", timeout=60)
        send(terminal, "exec[ls -la; echo listed]", "listed")
        send(terminal, "escalate[touch approved.txt]", "Yes, proceed")
        save_screen(terminal, work, APPROVAL_OUT, height=680)
        terminal.close()
    finally:
        server.stop()
        upstream.stop()


def send(terminal: Terminal, prompt: str, expect: str) -> None:
    terminal.type(prompt)
    time.sleep(0.6)
    terminal.press("Enter")
    terminal.wait_for_text(expect, timeout=30)
    time.sleep(1)

if __name__ == "__main__":
    main()

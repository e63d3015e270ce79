"""Refreshes docs/codex-tui.png: the real Codex TUI chatting through this server.

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
    migrate(env)
    server = ServerProcess(env, work / "server.log").start()
    home = work / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text(CONFIG_TOML)
    terminal = Terminal(width=110, height=24).start(
        f"{codex_binary()} --remote ws://127.0.0.1:{server.port}", cwd=work, env={"CODEX_HOME": home}
    )
    try:
        terminal.wait_for_text("Ask Codex to do anything", timeout=60)
        for prompt, expect in [("Hello from the Codex TUI", "Hello world"), ("slow:12", "d11")]:
            terminal.type(prompt)
            time.sleep(0.6)
            terminal.press("Enter")
            terminal.wait_for_text(expect)
        time.sleep(1)
        ansi = terminal._run("capture-pane", "-e", "-p", "-t", "main")
        html = subprocess.run(["aha", "--black", "--title", "Codex TUI"], input=ansi, capture_output=True, text=True, check=True).stdout
        page = work / "screen.html"
        page.write_text(html.replace("<pre>", '<pre style="font-size:15px;line-height:1.25;margin:12px">'))
        subprocess.run(
            ["chromium", "--headless", "--no-sandbox", "--hide-scrollbars", f"--screenshot={OUT}",
             "--window-size=1040,560", page.as_uri()],
            check=True, capture_output=True,
        )
        print(f"wrote {OUT}")
    finally:
        terminal.close()
        server.stop()
        upstream.stop()


if __name__ == "__main__":
    main()

"""The real Codex CLI (npm ``@openai/codex``), installed at test time and driven
in tmux like a person at a terminal: keys in, the rendered screen out.

Installed once into ``.cache/codex-cli/`` (ignored by git). A machine without
npm or tmux fails the tests that need them, loudly: they are never skipped.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from pathlib import Path

CODEX_VERSION = "0.169.0"  # the release whose schema is tests/schema/
CACHE = Path(__file__).resolve().parent.parent / ".cache" / "codex-cli"
# Nothing the CLI would fetch by itself: no update check, no analytics.
CONFIG_TOML = """\
check_for_update_on_startup = false

[analytics]
enabled = false
"""


def _require(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        raise RuntimeError(f"{program} is not installed: run scripts/install-system-packages.sh")
    return path


def codex_binary() -> Path:
    """The ``codex`` launcher of the pinned release, installing it on first use."""
    binary = CACHE / "node_modules" / ".bin" / "codex"
    package = CACHE / "node_modules" / "@openai" / "codex" / "package.json"
    if not (binary.exists() and f'"version": "{CODEX_VERSION}"' in package.read_text()):
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [_require("npm"), "install", "--no-audit", "--no-fund", "--prefix", str(CACHE), f"@openai/codex@{CODEX_VERSION}"],
            check=True,
            timeout=600,
        )
    return binary


class Terminal:
    """One tmux session on its own server socket, running one command."""

    def __init__(self, width: int = 120, height: int = 40):
        self.socket = f"codexserver-{uuid.uuid4().hex[:8]}"
        self.size = (width, height)
        self._tmux = _require("tmux")

    def _run(self, *args: str) -> str:
        return subprocess.run([self._tmux, "-L", self.socket, *args], check=True, capture_output=True, text=True).stdout

    def start(self, command: str, cwd: Path, env: dict[str, str]) -> Terminal:
        exports = " ".join(f"{name}={value!s}" for name, value in env.items())
        # `; sleep` keeps the pane, and what the program printed last, after it exits.
        self._run("new-session", "-d", "-s", "main", "-x", str(self.size[0]), "-y", str(self.size[1]),
                  f"cd {cwd} && env {exports} {command}; sleep 600")
        return self

    def screen(self) -> str:
        return self._run("capture-pane", "-p", "-t", "main")

    def type(self, text: str) -> None:
        self._run("send-keys", "-t", "main", "-l", text)

    def press(self, *keys: str) -> None:
        for key in keys:
            self._run("send-keys", "-t", "main", key)
            time.sleep(0.2)

    def wait_for(self, predicate, timeout: float = 20.0, what: str = "") -> str:
        """The screen once ``predicate(screen)`` holds; fails with the screen otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if predicate(screen):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what or predicate}; the screen:\n{screen}")
            time.sleep(0.2)

    def wait_for_text(self, text: str, timeout: float = 20.0) -> str:
        return self.wait_for(lambda screen: text in screen, timeout, repr(text))

    def close(self) -> None:
        subprocess.run([self._tmux, "-L", self.socket, "kill-server"], capture_output=True)

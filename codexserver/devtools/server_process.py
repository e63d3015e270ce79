"""Run ``manage.py serve`` (daphne) as a real process on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

PROJECT_DIR = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def migrate(env: dict[str, str], project_dir: Path = PROJECT_DIR) -> None:
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v0"], cwd=project_dir, env=env, check=True
    )


class ServerProcess:
    """One server process (by default ``manage.py serve``); ``start()`` returns once it answers."""

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        port: int | None = None,
        command: list[str] | None = None,
        ready_path: str = "/healthz",
        project_dir: Path = PROJECT_DIR,  # whose manage.py runs (bench/compare_checkouts.py: another checkout's)
    ):
        self.port = port or free_port()
        self.env = env
        self.log_path = log_path
        self.command = command or ["manage.py", "serve", "--port", "{port}"]
        self.ready_path = ready_path
        self.project_dir = project_dir
        self.executable = sys.executable  # the command runs under this program
        self.process: subprocess.Popen | None = None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerProcess:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [self.executable, *(part.format(port=self.port) for part in self.command)],
                cwd=self.project_dir,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited early:\n{self.log()}")
            try:
                httpx.get(self.http_url + self.ready_path, timeout=1)
                return self  # any HTTP answer means it is listening
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the server did not answer {self.ready_path}:\n{self.log()}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def rss_bytes(self) -> int:
        """Resident memory of the process, from /proc (Linux)."""
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def cpu_seconds(self) -> float:
        """User and system CPU time the process has used, from /proc (Linux)."""
        return cpu_seconds_of(f"/proc/{self.process.pid}/stat")

    def main_thread_cpu_seconds(self) -> float:
        """The same, of its main thread alone: daphne's event loop."""
        return cpu_seconds_of(f"/proc/{self.process.pid}/task/{self.process.pid}/stat")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def cpu_seconds_of(stat_path: str) -> float:
    """User and system CPU time from a /proc ``stat`` file (a process's or a thread's)."""
    with open(stat_path) as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

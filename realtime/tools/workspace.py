"""Where a thread may work (PROTOCOL §11, §12): inside one of its
principal's workspace roots, or the server's (``CODEX_WORKSPACE_ROOTS``,
by default the directory ``serve`` started in)."""

from __future__ import annotations

import os

from django.conf import settings

from identity.principals import AuthenticatedPrincipal
from realtime.store.threads import Thread

from .sandbox import WORKSPACE_WRITE, SandboxPolicy, inside_or_equal


def workspace_roots(principal: AuthenticatedPrincipal) -> tuple[str, ...]:
    return tuple(principal.workspace_roots) or tuple(settings.CODEX_WORKSPACE_ROOTS)


def within_workspace(cwd: str, roots: tuple[str, ...]) -> bool:
    """Whether ``cwd`` is an existing directory inside one of ``roots``, links
    resolved (a link out of a root is outside it)."""
    return os.path.isdir(cwd) and any(inside_or_equal(cwd, root) for root in roots)


def outside_workspace_warning(cwd: str) -> str:
    return (
        f"{cwd} is not inside a workspace root of this server, so this thread is a conversation only: "
        "the model runs no commands here (see CODEX_WORKSPACE_ROOTS, or the principal's workspace roots)."
    )


def thread_sandbox(thread: Thread) -> SandboxPolicy:
    """The sandbox a thread's commands run in: its mode, its cwd writable under workspace-write."""
    writable = (thread.cwd,) if thread.sandbox_mode == WORKSPACE_WRITE else ()
    return SandboxPolicy(thread.sandbox_mode, writable, thread.network_access)

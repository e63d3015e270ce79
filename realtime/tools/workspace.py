"""Where a thread may work (PROTOCOL §11, §12): inside one of its
principal's workspace roots, or the server's (``CODEX_WORKSPACE_ROOTS``,
by default the directory ``serve`` started in)."""

from __future__ import annotations

import os

from django.conf import settings

from identity.principals import AuthenticatedPrincipal


def workspace_roots(principal: AuthenticatedPrincipal) -> tuple[str, ...]:
    return tuple(principal.workspace_roots) or tuple(settings.CODEX_WORKSPACE_ROOTS)


def within_workspace(cwd: str, roots: tuple[str, ...]) -> bool:
    """Whether ``cwd`` is an existing directory inside one of ``roots``, links
    resolved (a link out of a root is outside it)."""
    if not os.path.isdir(cwd):
        return False
    real = os.path.realpath(cwd)
    for root in roots:
        real_root = os.path.realpath(root)
        if os.path.commonpath([real, real_root]) == real_root:
            return True
    return False


def outside_workspace_warning(cwd: str) -> str:
    return (
        f"{cwd} is not inside a workspace root of this server, so this thread is a conversation only: "
        "the model runs no commands here (see CODEX_WORKSPACE_ROOTS, or the principal's workspace roots)."
    )

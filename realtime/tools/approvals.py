"""When a command must be approved by the people on its thread, and what
their answer means (PROTOCOL §11). The policy is the thread's, an argument.

- ``untrusted``: ask before every command not known to only read;
- ``on-request``: run in the sandbox without asking; ask when the model
  asks to run outside it (``require_escalated``);
- ``never``: never ask; an escalation is refused and the model told;
- granular (``{"granular": {"sandbox_approval": …}}``): like on-request,
  where ``sandbox_approval`` allows asking at all.

An ``acceptForSession`` lets the same command run without asking for the
rest of the thread's life on this server.
"""

from __future__ import annotations

import os
import shlex
from typing import Any

from codexserver.loop_local import LoopLocal

RUN, ASK, REFUSE = "run", "ask", "refuse"
ACCEPT, ACCEPT_FOR_SESSION, DECLINE, CANCEL = "accept", "acceptForSession", "decline", "cancel"
DECISIONS_OFFERED = [ACCEPT, ACCEPT_FOR_SESSION, DECLINE, CANCEL]

# Programs that only read, run as one simple command (no pipes, redirections
# or substitutions, which could write or run anything).
# None of them has an option that writes a file or runs a program.
READ_ONLY_PROGRAMS = frozenset({
    "ls", "cat", "head", "tail", "wc", "pwd", "echo", "grep", "which", "stat", "du", "df", "nl", "cut", "date",
    "whoami", "id", "uname", "true", "false", "basename", "dirname", "realpath",
})  # fmt: skip
READ_ONLY_GIT = frozenset({"status", "log", "show", "rev-parse", "ls-files", "blame"})
GIT_WRITING_OPTIONS = ("--output", "-o")
FIND_ACTIONS = frozenset({"-exec", "-execdir", "-ok", "-okdir", "-delete", "-fprint", "-fprint0", "-fprintf", "-fls"})
SHELL_SYNTAX = frozenset(";&|<>`$\n(){}")


def known_to_only_read(cmd: str) -> bool:
    if any(character in SHELL_SYNTAX for character in cmd):
        return False
    try:
        words = shlex.split(cmd)
    except ValueError:
        return False
    if not words:
        return False
    program = os.path.basename(words[0])
    if program == "git":
        return len(words) > 1 and words[1] in READ_ONLY_GIT and not any(w.startswith(GIT_WRITING_OPTIONS) for w in words)
    if program == "find":
        return not FIND_ACTIONS.intersection(words)
    return program in READ_ONLY_PROGRAMS


def approval_needed(
    approval_policy: Any, cmd: str, escalated: bool, approved_for_session: bool, default_shell: bool = True
) -> str:
    """RUN, ASK or REFUSE for one command under the thread's policy
    (``default_shell``: run by /bin/bash, not a shell the model chose)."""
    if approved_for_session:
        return RUN
    if approval_policy == "never":
        return REFUSE if escalated else RUN
    if approval_policy == "untrusted":
        return RUN if not escalated and default_shell and known_to_only_read(cmd) else ASK
    if isinstance(approval_policy, dict):  # granular
        if not escalated:
            return RUN
        return ASK if approval_policy.get("granular", {}).get("sandbox_approval") else REFUSE
    return ASK if escalated else RUN  # on-request


def decision_of(answer: Any) -> str:
    """The first answer's decision; anything unreadable, or an error, declines."""
    decision = answer.get("decision") if isinstance(answer, dict) else None
    if decision in (ACCEPT, ACCEPT_FOR_SESSION, DECLINE, CANCEL):
        return decision
    if isinstance(decision, dict) and decision.keys() & {"acceptWithExecpolicyAmendment", "applyNetworkPolicyAmendment"}:
        return ACCEPT
    return DECLINE


class SessionApprovals:
    """Commands accepted for the rest of a thread's life on this server, each
    as it was asked: inside the sandbox, or escalated."""

    def __init__(self) -> None:
        self._commands: dict[str, set[tuple[str, bool]]] = {}

    def approved(self, thread_id: str, command: str, escalated: bool) -> bool:
        return (command, escalated) in self._commands.get(thread_id, ())

    def approve(self, thread_id: str, command: str, escalated: bool) -> None:
        self._commands.setdefault(thread_id, set()).add((command, escalated))


_approvals: LoopLocal[SessionApprovals] = LoopLocal(SessionApprovals)


def session_approvals() -> SessionApprovals:
    return _approvals.get()

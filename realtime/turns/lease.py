"""How long a turn may still act for its thread: its lock's lease, on this host's clock.

The lock's expiry is on the database's clock; this process knows only when
it asked for it. A request sent at ``t`` gives an expiry of at least ``t +
lock seconds`` there, so the turn stops acting (streaming, running tools) a
margin before that on the local monotonic clock, which keeps counting while
the process is stopped (SIGSTOP, a frozen VM): a process resumed past its
lease stops at once instead of streaming into a thread another process may
have taken over.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

# The share of the lock's length the turn may rely on after asking: the rest
# covers the way to the database and back, and clocks that drift.
TRUSTED_SHARE = 0.8


@dataclass(eq=False)
class Lease:
    seconds: float  # the lock's length (CODEX_TURN_LOCK_SECONDS)
    until: float  # on time.monotonic()

    @classmethod
    def asked_now(cls, seconds: float) -> Lease:
        lease = cls(seconds, 0.0)
        lease.extended(time.monotonic())
        return lease

    @classmethod
    def forever(cls) -> Lease:
        """An ephemeral thread's turn: its lock is this process's memory."""
        return cls(math.inf, math.inf)

    def extended(self, asked_at: float) -> None:
        self.until = max(self.until, asked_at + self.seconds * TRUSTED_SHARE)

    def remaining(self) -> float:
        return self.until - time.monotonic()

    @property
    def lapsed(self) -> bool:
        return time.monotonic() >= self.until

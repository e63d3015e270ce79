"""Giving memory back to the system once a connection that held a lot of it is gone.

A client that stops reading can make this process hold up to its outbox's
byte bound (32 MiB) of replies, and as much again in the socket's write
buffer, until it is dropped. Python frees those strings at once, but
glibc's allocator keeps most freed heap pages (its dynamic mmap threshold
has grown past such replies, and a few live objects pin the heap's top), so
one such client left the process about 22 MiB larger for good.
``malloc_trim(0)`` returns every free page of every arena. It costs a few
milliseconds on a large heap, off the event loop, so it runs only after a
connection that queued a lot, at most once a second.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import platform
import time
from functools import cache

logger = logging.getLogger(__name__)

TRIM_AFTER_BYTES = 1 << 20  # a connection whose outbox held this much at once
MIN_SECONDS_BETWEEN = 1.0


class FreedMemory:
    """The process's one trimmer (its last trim, to space them out)."""

    def __init__(self) -> None:
        self._last = -MIN_SECONDS_BETWEEN
        self._running: asyncio.Future | None = None

    def release_after(self, peak_bytes: int) -> None:
        """A connection closed whose outbox held ``peak_bytes`` at most."""
        if peak_bytes < TRIM_AFTER_BYTES or _malloc_trim() is None:
            return
        now = time.monotonic()
        if now - self._last < MIN_SECONDS_BETWEEN or (self._running is not None and not self._running.done()):
            return
        self._last = now
        self._running = asyncio.get_running_loop().run_in_executor(None, _malloc_trim(), 0)
        self._running.add_done_callback(_log_failure)


def _log_failure(trim: asyncio.Future) -> None:
    if not trim.cancelled() and trim.exception() is not None:
        logger.warning("malloc_trim failed: %s", trim.exception())


@cache
def _malloc_trim():
    """glibc's ``malloc_trim`` (it releases the GIL while it runs), or None elsewhere (musl, macOS)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


freed_memory = FreedMemory()

"""One value per running event loop.

Connection pools, semaphores, events and buffers belong to the loop that made
them. daphne runs one loop, but the test suite and the benchmarks run many,
so each process-wide singleton of that kind is kept per loop.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class LoopLocal(Generic[T]):
    def __init__(self, make: Callable[[], T]):
        self._make = make
        self._values: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = weakref.WeakKeyDictionary()
        # The last loop asked for and its value: some values are asked for
        # once per notification, and a weak dictionary's lookup makes a
        # weak reference each time (5 % of a burst's CPU). It keeps that
        # value (and what it holds, maybe its loop) alive until another loop
        # asks or ``pop``: one at most, and daphne runs one loop.
        self._last: tuple[weakref.ref, T] | None = None

    def get(self) -> T:
        """The running loop's value, made on first use."""
        loop = asyncio.get_running_loop()
        last = self._last
        if last is not None and last[0]() is loop:
            return last[1]
        value = self._values.get(loop)
        if value is None:
            value = self._values[loop] = self._make()
        self._last = (weakref.ref(loop), value)
        return value

    def peek(self) -> T | None:
        """The running loop's value if it was ever made."""
        return self._values.get(asyncio.get_running_loop())

    def values(self) -> list[T]:
        """Every loop's value, of the loops still alive."""
        return list(self._values.values())

    def pop(self) -> T | None:
        """Forget the running loop's value (the next ``get`` makes a new one); returns it."""
        self._last = None
        return self._values.pop(asyncio.get_running_loop(), None)

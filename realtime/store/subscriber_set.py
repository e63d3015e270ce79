"""A thread's subscribers on this process: held weakly, walked cheaply.

Every notification of a turn (twenty deltas and more per turn) walks them. A
``WeakSet`` walk is a guarded generator, about ten Python calls each time;
``refs`` is a tuple of weak references kept between changes, so a walk is a
loop over it. Weak as before: a connection whose close never got to leave
(cancelled at shutdown) is not kept alive by the threads it had open, and
its reference in ``refs`` then gives None. What it offers is what the hub
uses: ``add``, ``discard``, ``in``, ``len`` and ``refs``, which is replaced
on each change, never changed in place, so a walk of it is a snapshot.
"""

from __future__ import annotations

import weakref
from typing import Generic, TypeVar

T = TypeVar("T")


class SubscriberSet(Generic[T]):
    __slots__ = ("_members", "refs")

    def __init__(self) -> None:
        self._members: weakref.WeakSet[T] = weakref.WeakSet()
        self.refs: tuple[weakref.ref[T], ...] = ()  # call each: None for one collected since

    def __copy__(self) -> SubscriberSet[T]:
        # A shallow copy would share the members and not the walk list: the two would drift.
        raise TypeError("a thread's subscribers are not copied")

    def __deepcopy__(self, memo: dict) -> SubscriberSet[T]:
        return self.__copy__()

    def add(self, member: T) -> None:
        if member not in self._members:
            self._members.add(member)
            self._refresh()

    def discard(self, member: T) -> None:
        if member in self._members:
            self._members.discard(member)
            self._refresh()

    def _refresh(self) -> None:
        self.refs = tuple(weakref.ref(member) for member in self._members)

    def __contains__(self, member: object) -> bool:
        return member in self._members

    def __len__(self) -> int:
        return len(self._members)

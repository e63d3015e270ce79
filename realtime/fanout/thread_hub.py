"""This process's loaded threads, their subscribers, and the bridge to other processes.

A thread is *loaded* here while a connection of this process is subscribed
to it or a turn of it runs here. A notification of a thread reaches:
- the subscribers on this process directly, through their outboxes;
- the subscribers on other processes through the channel layer: each thread
  is a group (``thread.<id>``) whose members are the *process channels* of
  the processes with a subscriber, so a delta costs one group send however
  many connections follow the thread. Sends are batched by a publisher task,
  each thread's in order and the threads' side by side, and only where
  another process is in the group; a process ignores the batches it
  published itself.

With the in-memory layer there is no other process, so nothing goes through
the layer. ``turn/interrupt`` for a turn running elsewhere goes straight to
the channel of the process running it (recorded with the turn's lock).

A *server request* of a thread (an approval, PROTOCOL §11) goes the same way
to every subscriber, carrying the channel of the process that asked; the
first answer from any of them goes back there and wins, and every
subscriber then hears ``serverRequest/resolved``. A connection that
subscribes while one is open is asked too, wherever it was asked: each
process keeps the open requests of the threads it follows (its own, and
those it heard from others), and a process that joins a thread's group
asks the group for the open ones it missed.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from channels import DEFAULT_CHANNEL_LAYER
from channels.layers import InMemoryChannelLayer, channel_layers, get_channel_layer

from codexserver.loop_local import LoopLocal
from realtime.store.history_cache import history_cache

if TYPE_CHECKING:
    from realtime.rpc.connection import AppServerConnection
    from realtime.store.threads import Thread

logger = logging.getLogger(__name__)

DELTA_SUFFIXES = ("/delta", "Delta")  # item/agentMessage/delta, item/reasoning/summaryTextDelta, …
EVENTS, INTERRUPT, ANSWER = "thread.events", "turn.interrupt", "server.answer"
# A process that just joined a thread's group asks for its open server requests; the askers answer.
OPEN_REQUESTS_QUERY, OPEN_REQUESTS = "server.open_requests_query", "server.open_requests"
MAX_RESOLVED_KEPT = 4096  # resolved request ids remembered, so a late answer to our query is not taken as open
RESOLVED = "serverRequest/resolved"
MAX_BATCH = 200  # notifications per group send
# Notifications waiting for the layer (Redis slow or down) past which deltas
# are dropped for the other processes; item/completed still carries the text.
MAX_PENDING = 10_000
# A process rejoins its groups every quarter of the layer's group expiry
# (CODEX_CHANNEL_GROUP_EXPIRY_SECONDS), so a live member never lapses and a
# dead one stops counting within the expiry; and within this long of a Redis
# fault (a restart or a flush empties every group, silently).
REJOIN_CHECK_SECONDS = 1.0
# Group joins and leaves in flight at once. Each holds one of the layer's
# pooled Redis connections, and redis-py refuses the 101st outright
# ("Too many connections"): 2,000 clients starting threads at once failed
# all but a hundred of their thread/starts before this bound.
MAX_MEMBERSHIP_CALLS = 32
# Group sends in flight at once, one per thread: with the joins and leaves
# above, the receiver and the refresher, 66 of the hub's layer's pooled
# connections at most.
MAX_PUBLISH_CALLS = 32
DRAIN_SECONDS = 2.0  # at stop, for batches still waiting to be published


@dataclass(frozen=True, slots=True)
class PendingRequest:
    """A server request this process asked, until its first answer: sent
    again to a connection of this process that subscribes meanwhile."""

    thread_id: str
    method: str
    params: dict[str, Any]
    answered: asyncio.Future


def group_name(thread_id: str) -> str:
    return f"thread.{thread_id}"


class ThreadHub:
    def __init__(self) -> None:
        self.loaded: dict[str, Thread] = {}
        shared = get_channel_layer()
        self.cross_process = shared is not None and not isinstance(shared, InMemoryChannelLayer)
        # A layer object of its own: channels_redis serves all of one object's
        # process channels with one blocking pop at a time, bound to one
        # event loop. The hub's receive must neither queue behind another
        # user's pops (the readiness probe's) nor outlive its loop in theirs.
        self.layer = channel_layers.make_backend(DEFAULT_CHANNEL_LAYER) if self.cross_process else None
        self.channel: str | None = None
        self._start: asyncio.Future | None = None
        self._outgoing: list[tuple[str, str, dict[str, Any], list[Any]]] = []
        self._asked: dict[str, PendingRequest] = {}  # this process's server requests awaiting their first answer
        # Other processes' open server requests of threads followed here: id → (thread, asking channel, method, params).
        self._heard: dict[str, tuple[str, str, str, dict[str, Any]]] = {}
        self._sending: set[asyncio.Future] = set()
        self._resolved: dict[str, None] = {}  # the latest resolved requests' ids, oldest first
        self._wake = asyncio.Event()
        self.tasks: list[asyncio.Task] = []
        self.dropped_deltas = 0
        self._joined: set[str] = set()  # threads whose group this process is in
        self._membership_locks: dict[str, asyncio.Lock] = {}
        self._membership_users: dict[str, int] = {}  # tasks holding or awaiting each lock
        self._membership_calls = asyncio.Semaphore(MAX_MEMBERSHIP_CALLS)
        self._publish_calls = asyncio.Semaphore(MAX_PUBLISH_CALLS)
        self._publishing = False

    async def ensure_started(self) -> None:
        """Open this process's channel and start its receiver and publisher; once."""
        if not self.cross_process:
            return
        if self._start is None or (self._start.done() and (self._start.cancelled() or self._start.exception())):
            self._start = asyncio.ensure_future(self._begin())
        await asyncio.shield(self._start)

    async def _begin(self) -> None:
        self.channel = await self.layer.new_channel("threads")
        empty = contextvars.Context()  # no connection's identity scope rides along
        for work, name in ((self._receive, "thread receiver"), (self._publish, "thread publisher"), (self._refresh, "group refresh")):
            self.tasks.append(asyncio.create_task(work(), name=name, context=empty))

    # --- loaded threads and subscribers -------------------------------------

    def get(self, thread_id: str) -> Thread | None:
        return self.loaded.get(thread_id)

    async def subscribe(self, thread: Thread, connection: AppServerConnection) -> Thread:
        """Subscribe ``connection``; returns this process's one object for the
        thread. Returns once this process is in the thread's group, so nothing
        published after the reply is missed."""
        thread = self.loaded.setdefault(thread.id, thread)
        newly = connection not in thread.subscribers
        thread.subscribers.add(connection)
        if self.cross_process and not thread.ephemeral:
            try:
                await self._set_membership(thread.id)
            except BaseException:
                # Not in the group: not subscribed either.
                thread.subscribers.discard(connection)
                self.release_if_unused(thread)
                raise
        if newly:  # it may answer a question still open, asked here or elsewhere
            for request_id, pending in self._asked.items():
                if pending.thread_id == thread.id and not pending.answered.done():
                    connection.send_server_request(request_id, self.channel, pending.method, pending.params)
            for request_id, (thread_id, asked_by, method, params) in list(self._heard.items()):
                if thread_id == thread.id:
                    connection.send_server_request(request_id, asked_by, method, params)
        return thread

    async def unsubscribe(self, thread: Thread, connection: AppServerConnection) -> None:
        thread.subscribers.discard(connection)
        if thread.subscribers:
            return
        self.release_if_unused(thread)
        if self.cross_process and not thread.ephemeral:
            await self._set_membership(thread.id)

    async def _set_membership(self, thread_id: str) -> None:
        """Join or leave the thread's group as its subscribers here now say,
        one change at a time per thread: a join and a leave never cross."""
        lock = self._membership_locks.setdefault(thread_id, asyncio.Lock())
        self._membership_users[thread_id] = self._membership_users.get(thread_id, 0) + 1
        try:
            await self._change_membership(thread_id, lock)
        finally:
            # Dropped only once nobody holds or awaits it: a released lock is
            # not yet taken by the waiter it woke.
            self._membership_users[thread_id] -= 1
            if not self._membership_users[thread_id]:
                del self._membership_users[thread_id]
                self._membership_locks.pop(thread_id, None)

    async def _change_membership(self, thread_id: str, lock: asyncio.Lock) -> None:
        async with lock:
            loaded = self.loaded.get(thread_id)
            wanted = loaded is not None and bool(loaded.subscribers)
            if wanted and thread_id not in self._joined:
                await self.ensure_started()
                async with self._membership_calls:
                    await self.layer.group_add(group_name(thread_id), self.channel)
                self._joined.add(thread_id)
                # Requests asked before we joined reached nobody here: ask for them.
                query = {"type": OPEN_REQUESTS_QUERY, "thread": thread_id, "origin": self.channel}
                try:
                    async with self._membership_calls:
                        await self.layer.group_send(group_name(thread_id), query)
                except Exception as exc:  # Redis down: a question asked elsewhere meanwhile is not re-sent here
                    logger.warning("could not ask for the open requests of thread %s: %s", thread_id, exc)
            elif not wanted and thread_id in self._joined:
                self._joined.discard(thread_id)
                self._forget_heard(thread_id)
                async with self._membership_calls:
                    await self.layer.group_discard(group_name(thread_id), self.channel)

    def hold(self, thread: Thread) -> Thread:
        """Keep ``thread`` loaded while a turn of it runs here."""
        return self.loaded.setdefault(thread.id, thread)

    def release_if_unused(self, thread: Thread) -> None:
        """Nobody here subscribed and no turn running here: unload it. An
        ephemeral thread lives nowhere else, so it is gone."""
        if not thread.subscribers and thread.active_turn is None and self.loaded.get(thread.id) is thread:
            del self.loaded[thread.id]

    def as_seen_here(self, stored: Thread, running: bool) -> tuple[Thread, bool]:
        """A thread read from the store, and whether a turn of it runs on
        another process, as this process shows it: a thread loaded here is
        this process's object (its status says so), brought up to date."""
        local = self.loaded.get(stored.id)
        if local is None:
            return stored, running
        local.refresh_from(stored)
        return local, running and local.active_turn is None

    def subscribed(self) -> list[Thread]:
        return [thread for thread in self.loaded.values() if thread.subscribers]

    # --- notifications ------------------------------------------------------

    def publish(
        self,
        thread: Thread,
        method: str,
        params: dict[str, Any],
        pace_setter: AppServerConnection | None = None,
        request: list[Any] | None = None,
    ) -> None:
        """Send a notification to every subscriber of the thread, here and
        elsewhere; with ``request`` ([id, asking channel]), a server request."""
        deliver(thread, method, params, pace_setter, request)
        if self.cross_process and not thread.ephemeral:
            if len(self._outgoing) >= MAX_PENDING and method.endswith(DELTA_SUFFIXES):
                self.dropped_deltas += 1
                return
            self._outgoing.append((thread.id, method, params, request or []))
            self._wake.set()

    # --- server requests ------------------------------------------------------

    async def ask(self, thread: Thread, method: str, params: dict[str, Any]) -> Any:
        """A server request to every subscriber of ``thread``, on every
        process: the first answer's ``result`` (None for an error answer).
        However it ends (answered, or the turn interrupted), every subscriber
        hears ``serverRequest/resolved``, and later answers are ignored."""
        request_id = f"request-{uuid.uuid4()}"
        answered = asyncio.get_running_loop().create_future()
        self._asked[request_id] = PendingRequest(thread.id, method, params, answered)
        try:
            self.publish(thread, method, params, request=[request_id, self.channel])
            return await answered
        finally:
            self._asked.pop(request_id, None)
            self.publish(thread, RESOLVED, {"threadId": thread.id, "requestId": request_id})

    async def answer(self, request_id: str, asked_by: str | None, result: Any) -> None:
        """A subscriber answered a server request: to the process that asked."""
        if asked_by is None or asked_by == self.channel:
            self._take_answer(request_id, result)
            return
        async with self._membership_calls:
            await self.layer.send(asked_by, {"type": ANSWER, "request": request_id, "result": result})

    def _take_answer(self, request_id: str, result: Any) -> None:
        pending = self._asked.get(request_id)
        if pending is not None and not pending.answered.done():  # the first answer wins
            pending.answered.set_result(result)

    async def _publish(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._outgoing:
                self._publishing = True
                batch, self._outgoing = self._outgoing, []
                await self._send_batch(_by_thread(batch))
                _stop_if_cancelled()
            self._publishing = False

    async def _send_batch(self, events: dict[str, list[list[Any]]]) -> None:
        """One drain: which of its threads another process follows, in one
        read, then those threads' group sends side by side, each thread's
        events in order. One thread after another, a group send is four
        Redis round trips, each waiting its turn on a busy loop: with 50
        turns streaming, about ten sends a second went out and the other
        processes' subscribers heard each turn seconds late."""
        try:
            membership = await self.layer.groups_with_others([group_name(thread_id) for thread_id in events], self.channel)
        except Exception as exc:  # Redis down: those subscribers miss these events
            self.layer.faults += 1
            logger.warning("could not publish the events of %d thread(s): %s", len(events), exc)
            return
        _stop_if_cancelled()
        if membership.unread:
            logger.warning(
                "could not publish the events of %d thread(s): %s", len(membership.unread), next(iter(membership.unread.values()))
            )
        await asyncio.gather(
            *(
                self._send_events(thread_id, run)
                for thread_id, run in events.items()
                if group_name(thread_id) in membership.followed
            )
        )

    async def _send_events(self, thread_id: str, events: list[list[Any]]) -> None:
        async with self._publish_calls:
            for first in range(0, len(events), MAX_BATCH):
                run = events[first : first + MAX_BATCH]
                try:
                    await self.layer.group_send(
                        group_name(thread_id), {"type": EVENTS, "origin": self.channel, "thread": thread_id, "events": run}
                    )
                except Exception as exc:  # Redis down: those subscribers miss these events
                    self.layer.faults += 1
                    logger.warning("could not publish %d event(s) of thread %s: %s", len(run), thread_id, exc)
                _stop_if_cancelled()

    async def _receive(self) -> None:
        while True:
            message = await self.layer.receive(self.channel)
            _stop_if_cancelled()
            try:
                self._dispatch(message)
            except Exception:
                logger.exception("could not dispatch a %s message", message.get("type"))

    def _dispatch(self, message: dict[str, Any]) -> None:
        if message["type"] == ANSWER:
            self._take_answer(message.get("request", ""), message.get("result"))
            return
        thread = self.loaded.get(message.get("thread", ""))
        if thread is None:
            return
        if message["type"] == EVENTS and message.get("origin") != self.channel:
            for method, params, *request in message["events"]:
                if method == "turn/started":  # its end will change the history: this process's copy is stale
                    history_cache().forget(thread.id)
                request = request[0] if request else None
                if request and request[0] in self._heard:
                    continue  # already had from the group's answer to our query
                self._hear(thread.id, method, params, request)
                deliver(thread, method, params, pace_setter=None, request=request)
        elif message["type"] == OPEN_REQUESTS_QUERY and message.get("origin") != self.channel:
            self._answer_open_requests_query(thread.id, message["origin"])
        elif message["type"] == OPEN_REQUESTS:
            for request_id, asked_by, method, params in message.get("requests", ()):
                if request_id not in self._heard and request_id not in self._resolved:
                    self._hear(thread.id, method, params, [request_id, asked_by])
                    deliver(thread, method, params, pace_setter=None, request=[request_id, asked_by])
        elif message["type"] == INTERRUPT:
            turn = thread.active_turn
            if turn is not None and turn.id == message.get("turn"):
                turn.interrupt()

    def _hear(self, thread_id: str, method: str, params: dict[str, Any], request: list[Any] | None) -> None:
        """Keep another process's open server requests until they are
        resolved, or their turn ends (its process may have died unresolved)."""
        if request:
            if request[0] not in self._resolved:  # (an answer to our query, late)
                self._heard[request[0]] = (thread_id, request[1], method, params)
        elif method == RESOLVED:
            self._heard.pop(params.get("requestId"), None)
            self._resolved[params.get("requestId")] = None
            if len(self._resolved) > MAX_RESOLVED_KEPT:
                self._resolved.pop(next(iter(self._resolved)))
        elif method == "turn/completed":
            ended = (params.get("turn") or {}).get("id")
            for request_id in [rid for rid, heard in self._heard.items() if heard[3].get("turnId") == ended]:
                del self._heard[request_id]

    def _forget_heard(self, thread_id: str) -> None:
        for request_id in [request_id for request_id, heard in self._heard.items() if heard[0] == thread_id]:
            del self._heard[request_id]

    def _answer_open_requests_query(self, thread_id: str, origin: str) -> None:
        requests = [
            [request_id, self.channel, pending.method, pending.params]
            for request_id, pending in self._asked.items()
            if pending.thread_id == thread_id and not pending.answered.done()
        ]
        if requests:
            reply = {"type": OPEN_REQUESTS, "thread": thread_id, "requests": requests}
            sending = asyncio.ensure_future(self._send_to(origin, reply))
            self._sending.add(sending)  # the loop keeps only weak references to tasks
            sending.add_done_callback(self._sending.discard)

    async def _send_to(self, channel: str, message: dict[str, Any]) -> None:
        try:
            async with self._membership_calls:
                await self.layer.send(channel, message)
        except Exception as exc:  # Redis down: that process's new subscribers are not asked
            logger.warning("could not send %s to %s: %s", message["type"], channel, exc)

    async def interrupt_elsewhere(self, channel: str, thread: Thread, turn_id: str) -> None:
        async with self._membership_calls:  # many clients may press stop at once
            await self.layer.send(channel, {"type": INTERRUPT, "thread": thread.id, "turn": turn_id})

    async def _refresh(self) -> None:
        """Stay in the followed threads' groups: join them all again every
        quarter of the group expiry, and at once after a Redis fault (after
        a restart or flush the hub would otherwise believe it is in groups
        that are gone, and hear nothing from other processes)."""
        interval = self.layer.group_expiry / 4
        last, faults = time.monotonic(), self.layer.faults
        while True:
            await asyncio.sleep(REJOIN_CHECK_SECONDS)
            if self.layer.faults == faults and time.monotonic() - last < interval:
                continue
            faults = self.layer.faults
            try:
                await self.layer.refresh_groups([group_name(thread_id) for thread_id in self._joined], self.channel)
                last = time.monotonic()
            except Exception as exc:
                self.layer.faults += 1  # tried again in a second
                if time.monotonic() - last >= interval:
                    logger.warning("could not join the groups of %d thread(s) again: %s", len(self._joined), exc)
                    last = time.monotonic()

    async def stop(self) -> None:
        """Stop the receiver, publisher and refresher, and close the layer's
        connections: that also ends a Redis read that swallowed its task's
        cancellation (redis-py can), which would otherwise never return."""
        # What shutdown's interrupted turns announced still goes out, briefly.
        for _ in range(int(DRAIN_SECONDS / 0.05)):
            if not (self.tasks and (self._outgoing or self._publishing)):
                break
            await asyncio.sleep(0.05)
        for task in self.tasks:
            task.cancel()
        if self.layer is not None:
            await self.layer.close_pools()
        if self.tasks:
            _, stuck = await asyncio.wait(self.tasks, timeout=5)
            if stuck:
                logger.warning("%d thread hub task(s) did not stop", len(stuck))
        self.tasks.clear()


async def stop_thread_hub() -> None:
    """At shutdown (and at the end of each test's event loop): stop this loop's hub, if it started."""
    hub = _hubs.peek()
    if hub is not None:
        await hub.stop()


def _stop_if_cancelled() -> None:
    """redis-py can swallow a cancellation that lands mid-command; a loop
    that then waited again would never stop."""
    if asyncio.current_task().cancelling():
        raise asyncio.CancelledError


def deliver(
    thread: Thread,
    method: str,
    params: dict[str, Any],
    pace_setter: AppServerConnection | None,
    request: list[Any] | None = None,
) -> None:
    """Hand a notification (or, with ``request``, a server request) to this
    process's subscribers of ``thread``.

    The turn waits for ``pace_setter`` (its own client) only. Another
    subscriber that falls behind misses deltas rather than its connection:
    ``item/completed`` still brings it the whole text.
    """
    droppable = method.endswith(DELTA_SUFFIXES)
    for subscriber in thread.subscribers.refs:
        connection = subscriber()
        if connection is None:  # collected without leaving
            continue
        if request:
            connection.send_server_request(request[0], request[1], method, params)
            continue
        if droppable and connection is not pace_setter and connection.outbox.overloaded:
            continue
        if method == RESOLVED:
            connection.forget_server_request(params["requestId"])
        connection.notify(method, params)


def _by_thread(batch: list[tuple[str, str, dict[str, Any], list[Any]]]) -> dict[str, list[list[Any]]]:
    """Each thread's events, in order (the order between threads is not kept:
    a subscriber follows one thread's events); a server request's event
    carries [its id, the asking channel] third."""
    events: dict[str, list[list[Any]]] = {}
    for thread_id, method, params, request in batch:
        events.setdefault(thread_id, []).append([method, params, request] if request else [method, params])
    return events


_hubs: LoopLocal[ThreadHub] = LoopLocal(ThreadHub)


def thread_hub() -> ThreadHub:
    """This process's (this event loop's) hub."""
    return _hubs.get()

"""The Redis channel layer, made safe for connections that stay idle for days.

channels_redis blocks in ``BZPOPMIN`` for ``brpop_timeout`` (5 s) at a time,
while redis-py may give its sockets a read timeout of the same length or
shorter (redis-py 8 does: 5 s). A read timeout, or any other Redis fault,
raised from ``receive`` would end the thread hub's receiver (realtime/
thread_hub.py, the one reader of the layer per process; consumers have no
channel of their own) while its WebSockets are perfectly healthy. Here no
Redis fault ever escapes ``receive``: it waits for Redis to come back
instead, and the socket read timeout is set explicitly, well above the
blocking pop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from channels_redis.core import RedisChannelLayer
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)

RETRY_FIRST_DELAY = 0.1
RETRY_MAX_DELAY = 5.0


def redis_host(url: str) -> dict[str, Any]:
    """One ``hosts`` entry: the URL plus timeouts that outlast the blocking pop."""
    return {
        "address": url,
        "socket_timeout": RedisChannelLayer.brpop_timeout + 10,
        "socket_connect_timeout": 5,
        "socket_keepalive": True,
        "health_check_interval": 30,
    }


# Which of the groups (KEYS) have a live member other than the sender
# (ARGV[1]): a 1 or 0 for each, read in one call, each in O(log n). Live:
# joined or refreshed after ARGV[2] (now less the group expiry), as
# channels_redis's group_send counts them; a dead process's channel stops
# counting once it has not refreshed for that long.
GROUPS_WITH_OTHERS = """
local found = {}
local since = '(' .. ARGV[2]
for index, key in ipairs(KEYS) do
  local members = redis.call('ZCOUNT', key, since, '+inf')
  local own = redis.call('ZSCORE', key, ARGV[1])
  if own and tonumber(own) > tonumber(ARGV[2]) then
    members = members - 1
  end
  found[index] = members > 0 and 1 or 0
end
return found
"""
# Join (or stay in) each group (KEYS) as the channel ARGV[1] at time ARGV[2],
# each group kept ARGV[3] seconds: group_add's two commands for many groups
# in one call.
REFRESH_GROUPS = """
for index, key in ipairs(KEYS) do
  redis.call('ZADD', key, ARGV[2], ARGV[1])
  redis.call('EXPIRE', key, ARGV[3])
end
return #KEYS
"""
REFRESH_CHUNK = 500  # groups a call


@dataclass
class Membership:
    """What one read of groups' members found."""

    followed: set[str]  # groups with a member other than the sender
    unread: dict[str, Exception]  # groups whose host failed, with its error


class ResilientRedisChannelLayer(RedisChannelLayer):
    _groups_script: AsyncScript | None = None
    _refresh_script: AsyncScript | None = None
    faults = 0  # Redis faults seen so far: after one, the thread hub joins its groups again at once

    async def refresh_groups(self, groups: list[str], channel: str) -> None:
        """Join every one of ``groups`` again, now: after a Redis restart or
        flush the groups are gone, and a member that stops refreshing
        (its process died) stops counting after ``group_expiry``."""
        for index, on_host in self._by_host(groups).items():
            connection = self.connection(index)
            if self._refresh_script is None:
                self._refresh_script = connection.register_script(REFRESH_GROUPS)
            for first in range(0, len(on_host), REFRESH_CHUNK):
                keys = [self._group_key(group) for group in on_host[first : first + REFRESH_CHUNK]]
                await self._refresh_script(keys=keys, args=[channel, time.time(), self.group_expiry], client=connection)

    async def groups_with_others(self, groups: list[str], sender: str) -> Membership:
        """Which of ``groups`` have a member other than ``sender`` (a
        channel): one Redis call for all of them, one per host when sharded,
        the hosts side by side (one host down loses only its own groups).

        A group send is four Redis round trips and brings the message back to
        the sender's own channel too, to be read and dropped, so the thread
        hub sends only to groups another process is in (a thread no other
        process follows, most of them, costs no send). One read of members
        per group was still a command per thread per drain of the hub: a
        quarter of the event loop's time per stored turn on PostgreSQL +
        Redis. Whoever is a member by the time of this read, as by a group
        send's own, gets the message.
        """
        hosts = list(self._by_host(groups).items())
        read = await asyncio.gather(
            *(self._others_on_host(index, on_host, sender) for index, on_host in hosts), return_exceptions=True
        )
        membership = Membership(set(), {})
        for (_, on_host), flags in zip(hosts, read, strict=True):
            if isinstance(flags, Exception):
                membership.unread.update(dict.fromkeys(on_host, flags))
            elif isinstance(flags, BaseException):  # cancelled: the caller stops
                raise flags
            else:
                membership.followed.update(group for group, flag in zip(on_host, flags, strict=True) if flag)
        return membership

    def _by_host(self, groups: list[str]) -> dict[int, list[str]]:
        """``groups`` by the index of the Redis host that keeps each (sharding)."""
        by_host: dict[int, list[str]] = {}
        for group in groups:
            by_host.setdefault(self.consistent_hash(group), []).append(group)
        return by_host

    async def _others_on_host(self, index: int, groups: list[str], sender: str) -> list[int]:
        connection = self.connection(index)
        if self._groups_script is None:  # hashed once; EVALSHA, loaded into a server on first use there
            self._groups_script = connection.register_script(GROUPS_WITH_OTHERS)
        return await self._groups_script(
            keys=[self._group_key(group) for group in groups], args=[sender, time.time() - self.group_expiry], client=connection
        )

    async def receive(self, channel: str) -> dict:
        delay = RETRY_FIRST_DELAY
        while True:
            try:
                return await super().receive(channel)
            except (RedisError, OSError) as exc:  # OSError covers TimeoutError and socket errors
                if asyncio.current_task().cancelling():
                    # redis-py turns a cancellation that lands mid-read into a
                    # connection error; retrying would never let the task stop.
                    raise asyncio.CancelledError from exc
                self.faults += 1
                if delay == RETRY_FIRST_DELAY:
                    logger.warning("channel layer receive failed (%s: %s); retrying", type(exc).__name__, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_DELAY)

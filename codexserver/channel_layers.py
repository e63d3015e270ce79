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
from typing import Any

from channels_redis.core import RedisChannelLayer
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


# Which of the groups (KEYS) have a member other than the sender (ARGV[1]):
# a 1 or 0 for each, read in one call.
GROUPS_WITH_OTHERS = """
local found = {}
for index, key in ipairs(KEYS) do
  found[index] = 0
  for _, member in ipairs(redis.call('ZRANGE', key, 0, -1)) do
    if member ~= ARGV[1] then
      found[index] = 1
      break
    end
  end
end
return found
"""


class ResilientRedisChannelLayer(RedisChannelLayer):
    async def groups_with_others(self, groups: list[str], sender: str) -> set[str]:
        """Those of ``groups`` with a member other than ``sender`` (a channel):
        one Redis call for all of them (one per host when sharded).

        A group send is four Redis round trips and brings the message back to
        the sender's own channel too, to be read and dropped, so the thread
        hub sends only to groups another process is in (a thread no other
        process follows, most of them, costs no send). One read of members
        per group was still a command per thread per drain of the hub: a
        quarter of the event loop's time per stored turn on PostgreSQL +
        Redis. Whoever is a member by the time of this read, as by a group
        send's own, gets the message.
        """
        by_host: dict[int, list[str]] = {}
        for group in groups:
            by_host.setdefault(self.consistent_hash(group), []).append(group)
        found: set[str] = set()
        for index, on_host in by_host.items():
            script = self.connection(index).register_script(GROUPS_WITH_OTHERS)  # EVALSHA, loaded on first use
            flags = await script(keys=[self._group_key(group) for group in on_host], args=[sender])
            found.update(group for group, flag in zip(on_host, flags, strict=True) if flag)
        return found

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
                if delay == RETRY_FIRST_DELAY:
                    logger.warning("channel layer receive failed (%s: %s); retrying", type(exc).__name__, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_DELAY)

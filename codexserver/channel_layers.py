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


class ResilientRedisChannelLayer(RedisChannelLayer):
    async def group_send_to_others(self, group: str, message: dict, sender: str) -> bool:
        """``group_send``, unless ``sender`` (a channel) is the group's only
        member; whether it sent.

        A group send is four Redis round trips and brings the message back to
        the sender's own channel too, to be read and dropped. A group with no
        other member (a thread no other process follows, most of them) now
        costs one round trip, a read of its members; one with others costs
        that read plus the group send (five). Whoever is a member by the time
        of the read, as by the group send's own, gets the message.
        """
        members = await self.connection(self.consistent_hash(group)).zrange(self._group_key(group), 0, -1)
        if all(member.decode() == sender for member in members):
            return False
        await self.group_send(group, message)
        return True

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

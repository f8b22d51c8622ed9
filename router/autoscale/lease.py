"""One replica acts: a lease in Redis (`{prefix}:autoscale:leader`), taken and renewed by the replica
that holds it, with a TTL so a dead replica's lease expires and another takes over.

Safety: a replica believes it holds the lease only until `ttl x 0.8` after the start of its last
successful renewal, measured on its own clock. If it cannot reach Redis it stops acting before the key
can expire for the others, so two replicas never act at once (clocks drift far less than 20% of a TTL).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis

# KEYS[1] the lease; ARGV[1] our id, ARGV[2] TTL ms. 1: held by us (taken or renewed), 0: someone else's.
_ACQUIRE = """
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if not v then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisLease:
    """`acquire()` once per interval: True while this replica holds the lease. Errors propagate (the loop
    treats them as "not the leader")."""

    def __init__(
        self,
        client: aioredis.Redis,
        key: str,
        holder: str,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError("lease ttl must be > 0")
        self.client = client
        self.key = key
        self.holder = holder
        self.ttl_s = ttl_s
        self.clock = clock
        self._valid_until = 0.0

    @property
    def held(self) -> bool:
        return self.clock() < self._valid_until

    async def acquire(self) -> bool:
        started = self.clock()
        try:
            got: Any = await self.client.eval(_ACQUIRE, 1, self.key, self.holder, int(self.ttl_s * 1000))
        except BaseException:
            self._valid_until = 0.0
            raise
        self._valid_until = started + 0.8 * self.ttl_s if int(got) == 1 else 0.0
        return self.held

    async def holder_now(self) -> str | None:
        v: Any = await self.client.get(self.key)
        return None if v is None else str(v)

    async def release(self) -> None:
        self._valid_until = 0.0
        await self.client.eval(_RELEASE, 1, self.key, self.holder)

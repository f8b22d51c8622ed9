"""Per-tenant quotas: requests in flight and tokens per second (prompt + max_tokens, with a burst).

Shared by every replica and process through one Redis Lua script: one round trip checks and takes
both limits atomically on Redis's own clock (`TIME`). Why a script rather than the `limits` library:
`limits` has rate limits but no concurrency semaphore, so the two checks would be two round trips and
not atomic (a request could take tokens and then fail the concurrency check); the script is ~25
lines and needs no new dependency. Concurrency is a sorted set of leases (member = request id,
score = expiry), so a replica that crashes with requests in flight leaks nothing past `lease_s`.

When Redis is unreachable (or slower than `timeout_s`) the same limits are enforced per process
(`LocalQuotas`), with one warning logged and `degraded` set (a metric), and Redis is tried again
after a backoff: traffic never waits on Redis longer than `timeout_s`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvroute.router.shared.common import REDIS_ERRORS
from kvroute.router.tenants.errors import Rejected
from kvroute.router.tenants.table import Tenant

log = logging.getLogger("kvroute.quotas")
_ERRORS: tuple[type[BaseException], ...] = (TimeoutError, *REDIS_ERRORS)

_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local maxc = tonumber(ARGV[1])
if maxc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZCARD', KEYS[1]) >= maxc then
    return {0, 1000, 'quota_concurrency'}
  end
end
local rate = tonumber(ARGV[4])
if rate > 0 then
  local burst = tonumber(ARGV[5])
  local cost = tonumber(ARGV[6])
  local b = redis.call('HMGET', KEYS[2], 'tokens', 'ts')
  local tokens = tonumber(b[1]) or burst
  local ts = tonumber(b[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
  local need = math.min(cost, burst)
  if tokens < need then
    return {0, math.ceil((need - tokens) * 1000 / rate), 'quota_tokens'}
  end
  redis.call('HSET', KEYS[2], 'tokens', tostring(tokens - cost), 'ts', now)
  redis.call('PEXPIRE', KEYS[2], math.ceil((burst + cost) * 1000 / rate) + 1000)
end
if maxc > 0 then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
end
return {1, 0, ''}
"""


def _limited(tenant: Tenant) -> bool:
    return bool(tenant.max_concurrent or tenant.tokens_per_s)


def _reject(tenant: Tenant, reason: str, retry_s: float) -> Rejected:
    what = (
        f"{tenant.max_concurrent} requests in flight"
        if reason == "quota_concurrency"
        else f"{tenant.tokens_per_s:g} tokens/s (burst {tenant.bucket_tokens:g})"
    )
    return Rejected(f"tenant {tenant.name!r} is over its quota of {what}", reason, retry_s)


class _Nothing:
    def release(self) -> None:
        return None


NO_LEASE = _Nothing()


@dataclass
class _Bucket:
    tokens: float
    at: float


class _LocalLease:
    __slots__ = ("_owner", "_tenant")

    def __init__(self, owner: LocalQuotas, tenant: str) -> None:
        self._owner: LocalQuotas | None = owner
        self._tenant = tenant

    def release(self) -> None:
        if self._owner is not None:
            n = self._owner.in_flight.get(self._tenant, 0) - 1
            if n > 0:
                self._owner.in_flight[self._tenant] = n
            else:
                self._owner.in_flight.pop(self._tenant, None)
            self._owner = None


@dataclass
class LocalQuotas:
    """The limits in this process only (no Redis, or Redis away)."""

    clock: Callable[[], float] = time.monotonic
    in_flight: dict[str, int] = field(default_factory=dict)
    buckets: dict[str, _Bucket] = field(default_factory=dict)

    async def acquire(self, tenant: Tenant, tokens: int, request_id: str) -> Any:
        return self.take(tenant, tokens)

    def take(self, tenant: Tenant, tokens: int) -> Any:
        if not _limited(tenant):
            return NO_LEASE
        name = tenant.name
        if tenant.max_concurrent and self.in_flight.get(name, 0) >= tenant.max_concurrent:
            raise _reject(tenant, "quota_concurrency", 1.0)
        if tenant.tokens_per_s:
            now, burst, rate = self.clock(), tenant.bucket_tokens, tenant.tokens_per_s
            b = self.buckets.get(name)
            if b is None:
                b = self.buckets[name] = _Bucket(burst, now)
            b.tokens = min(burst, b.tokens + max(0.0, now - b.at) * rate)
            b.at = now
            need = min(float(tokens), burst)
            if b.tokens < need:
                raise _reject(tenant, "quota_tokens", (need - b.tokens) / rate)
            b.tokens -= tokens
        if tenant.max_concurrent:
            self.in_flight[name] = self.in_flight.get(name, 0) + 1
            return _LocalLease(self, name)
        return NO_LEASE


class _RedisLease:
    __slots__ = ("_owner", "_key", "_member")

    def __init__(self, owner: RedisQuotas, key: str, member: str) -> None:
        self._owner: RedisQuotas | None = owner
        self._key, self._member = key, member

    def release(self) -> None:
        if self._owner is not None:
            self._owner._release(self._key, self._member)
            self._owner = None


class RedisQuotas:
    """Quotas shared through Redis (see the module docstring); falls back to `LocalQuotas`."""

    def __init__(
        self,
        client: Any,
        key_prefix: str,
        *,
        lease_s: float = 660.0,
        timeout_s: float = 0.1,
        retry_s: float = 2.0,
        on_degraded: Callable[[bool], None] | None = None,
    ) -> None:
        """`lease_s`: how long a request counts against max_concurrent if its release never reaches
        Redis (a crashed replica): longer than the longest request. `timeout_s`: the most a request
        waits on Redis. `retry_s`: how long to use local quotas after a Redis failure before trying again."""
        self.client = client
        self.prefix = key_prefix
        self.lease_ms = int(lease_s * 1000)
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.local = LocalQuotas()
        self.degraded = False
        self.fallbacks = 0  # requests checked locally because Redis was away
        self._retry_at = 0.0
        self._on_degraded = on_degraded
        self._script = client.register_script(_SCRIPT)
        self._pending: set[asyncio.Task[Any]] = set()
        self._seq = 0

    async def acquire(self, tenant: Tenant, tokens: int, request_id: str) -> Any:
        if not _limited(tenant):
            return NO_LEASE
        if self.degraded and time.monotonic() < self._retry_at:
            self.fallbacks += 1
            return self.local.take(tenant, tokens)
        self._seq += 1
        member = f"{request_id or 'r'}:{id(self):x}:{self._seq}"
        conc = f"{self.prefix}:quota:{tenant.name}:inflight"
        bucket = f"{self.prefix}:quota:{tenant.name}:tokens"
        args = [
            tenant.max_concurrent,
            self.lease_ms,
            member,
            tenant.tokens_per_s,
            tenant.bucket_tokens,
            tokens,
        ]
        try:
            ok, retry_ms, reason = await asyncio.wait_for(
                self._script(keys=[conc, bucket], args=args), self.timeout_s
            )
        except _ERRORS as exc:
            self._lost(exc)
            self.fallbacks += 1
            return self.local.take(tenant, tokens)
        self._recovered()
        if not int(ok):
            raise _reject(tenant, str(reason), int(retry_ms) / 1000.0)
        return _RedisLease(self, conc, member) if tenant.max_concurrent else NO_LEASE

    def _release(self, key: str, member: str) -> None:
        async def rem() -> None:
            try:
                await asyncio.wait_for(self.client.zrem(key, member), max(1.0, self.timeout_s))
            except _ERRORS:
                pass  # the lease expires by itself

        try:
            task = asyncio.get_running_loop().create_task(rem())
        except RuntimeError:
            return
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _lost(self, exc: BaseException) -> None:
        self._retry_at = time.monotonic() + self.retry_s
        if not self.degraded:
            self.degraded = True
            log.warning(
                "quotas: Redis unreachable (%s: %s); enforcing tenant quotas per process until it is back",
                type(exc).__name__,
                exc,
            )
            if self._on_degraded is not None:
                self._on_degraded(True)

    def _recovered(self) -> None:
        if self.degraded:
            self.degraded = False
            log.info("quotas: Redis reachable again; tenant quotas are shared again")
            if self._on_degraded is not None:
                self._on_degraded(False)

    async def close(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

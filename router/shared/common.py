"""What the replica-sharing parts have in common: their config, the Redis client, key names and backoff."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

log = logging.getLogger("kvroute.replicas")

# What "Redis is unreachable or misbehaving" looks like from the client: caught at one boundary per task.
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)


class SharedStateError(RuntimeError):
    """A replica-sharing component was used wrongly (not started, bad config)."""


def default_replica_id() -> str:
    """host-pid-random: unique per process, readable in `redis-cli` when debugging."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class ReplicaConfig:
    """How router replicas share state through Redis. Mirrors the proposed `RouterConfig` fields."""

    redis_url: str | None = None  # e.g. redis://127.0.0.1:6379/0; None = no sharing (single replica)
    replica_id: str = ""  # this replica's name in Redis; "" = host-pid-random
    sync_interval_s: float = 0.2  # seconds between load syncs (one Redis round trip each)
    replica_ttl_s: float = 2.0  # seconds a replica's load counts without a refresh (crashed replicas expire)
    key_prefix: str = "kvroute"  # namespace of every key and channel (one per fleet sharing a Redis)
    reconnect_max_s: float = 5.0  # longest wait between reconnect tries while Redis is down
    redis_timeout_s: float = 1.0  # socket connect/read timeout per Redis call, seconds
    share_records: bool = False  # share cache_aware's routing records (a capped stream); False = off
    share_inflight: bool = True  # publish routed prompts for the others' in-flight prediction (kv_aware)
    inflight_ttl_s: float = 10.0  # seconds another replica's routed prompt counts as in flight here

    def __post_init__(self) -> None:
        if self.sync_interval_s <= 0:
            raise SharedStateError(f"sync_interval_s must be > 0, got {self.sync_interval_s}")
        if self.replica_ttl_s <= self.sync_interval_s:
            raise SharedStateError(
                f"replica_ttl_s ({self.replica_ttl_s}) must exceed sync_interval_s ({self.sync_interval_s}),"
                " or live replicas would flicker out between syncs"
            )
        if self.reconnect_max_s <= 0 or self.redis_timeout_s <= 0:
            raise SharedStateError("reconnect_max_s and redis_timeout_s must be > 0")
        if not self.key_prefix:
            raise SharedStateError("key_prefix must not be empty")
        if self.inflight_ttl_s <= 0:
            raise SharedStateError(f"inflight_ttl_s must be > 0, got {self.inflight_ttl_s}")

    @property
    def enabled(self) -> bool:
        return self.redis_url is not None

    @property
    def resolved_id(self) -> str:
        return self.replica_id or default_replica_id()

    @classmethod
    def from_router_config(cls, cfg: Any) -> ReplicaConfig:
        """Read the `RouterConfig` fields (`redis_url`, `replica_id`, `sync_interval_s`, `replica_ttl_s`,
        `redis_key_prefix`, `redis_share_records`, `redis_share_inflight`, `redis_inflight_ttl_s`); absent
        ones take the defaults."""
        d = cls()
        return cls(
            redis_url=getattr(cfg, "redis_url", d.redis_url),
            replica_id=getattr(cfg, "replica_id", d.replica_id),
            sync_interval_s=getattr(cfg, "sync_interval_s", d.sync_interval_s),
            replica_ttl_s=getattr(cfg, "replica_ttl_s", d.replica_ttl_s),
            key_prefix=getattr(cfg, "redis_key_prefix", d.key_prefix),
            share_records=getattr(cfg, "redis_share_records", d.share_records),
            share_inflight=getattr(cfg, "redis_share_inflight", d.share_inflight),
            inflight_ttl_s=getattr(cfg, "redis_inflight_ttl_s", d.inflight_ttl_s),
        )


@dataclass(frozen=True)
class Keys:
    """Every Redis name the replicas use, under one prefix (so a test or a fleet owns its own names)."""

    prefix: str

    @property
    def replicas(self) -> str:
        """Sorted set: replica id -> Redis server time (ms) of its last sync."""
        return f"{self.prefix}:replicas"

    def load(self, replica_id: str) -> str:
        """String per replica (TTL'd): lines "url in_flight pending_prefill_tokens active_blocks"."""
        return f"{self.prefix}:load:{replica_id}"

    @property
    def load_prefix(self) -> str:
        return f"{self.prefix}:load:"

    @property
    def workers(self) -> str:
        """Hash: worker url -> JSON WorkerSpec (the shared membership)."""
        return f"{self.prefix}:workers"

    @property
    def workers_epoch(self) -> str:
        """String: random id set when the hash is (re)created; a change means Redis lost the set."""
        return f"{self.prefix}:workers:epoch"

    @property
    def workers_channel(self) -> str:
        """Pub/sub channel of membership changes (JSON MembershipChange)."""
        return f"{self.prefix}:workers:changes"

    @property
    def inflight_channel(self) -> str:
        """Pub/sub channel of routed prompts (JSON: origin, [[url, [block hashes]], ...])."""
        return f"{self.prefix}:inflight"

    @property
    def policy(self) -> str:
        """String: the policy last set through the admin API (JSON PolicyChange)."""
        return f"{self.prefix}:policy"

    @property
    def policy_channel(self) -> str:
        """Pub/sub channel of policy changes (JSON PolicyChange)."""
        return f"{self.prefix}:policy:changes"


def connect(url: str, timeout_s: float) -> aioredis.Redis:
    """A client that fails fast: no built-in retries (our loops back off themselves), short timeouts,
    so a dead Redis costs one timeout per sync instead of stalling the task for seconds."""
    return aioredis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
    )


class Backoff:
    """Exponential delays from `base` to `cap` seconds; `reset` after a success."""

    def __init__(self, base: float, cap: float) -> None:
        self.base, self.cap = base, max(base, cap)
        self._next = base

    def next(self) -> float:
        d = self._next
        self._next = min(self.cap, self._next * 2)
        return d

    def reset(self) -> None:
        self._next = self.base


class Outage:
    """Whether one replica component has lost Redis; logged once when it happens and once on recovery."""

    def __init__(self, replica_id: str, what: str) -> None:
        self.replica_id, self.what = replica_id, what
        self.degraded = False

    def lost(self, exc: BaseException) -> None:
        if not self.degraded:
            self.degraded = True
            log.warning(
                "replica %s: %s lost (%s: %s); retrying with backoff",
                self.replica_id,
                self.what,
                type(exc).__name__,
                exc,
            )

    def recovered(self) -> None:
        if self.degraded:
            self.degraded = False
            log.info("replica %s: %s reconnected", self.replica_id, self.what)


async def listen_forever(
    client: aioredis.Redis,
    channel: str,
    on_message: Callable[[str], Awaitable[None]],
    on_subscribed: Callable[[], Awaitable[None]],
    outage: Outage,
    backoff: Backoff,
) -> None:
    """Subscribe to `channel` and hand each message to `on_message`, until cancelled. `on_subscribed`
    runs after every (re)subscription (read the stored state: no change published meanwhile is missed).
    Redis errors mark `outage` and retry with `backoff`; other errors are logged and retried the same."""
    while True:
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(channel)
            await on_subscribed()
            backoff.reset()
            outage.recovered()
            while True:
                msg = await pubsub.get_message(timeout=1.0)
                if msg is not None and msg.get("type") == "message":
                    await on_message(msg["data"])
        except Exception as exc:
            if not isinstance(exc, REDIS_ERRORS):
                log.exception("replica %s: %s loop failed", outage.replica_id, outage.what)
            outage.lost(exc)
        finally:
            with contextlib.suppress(*REDIS_ERRORS):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
        await asyncio.sleep(backoff.next())


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any] | None]) -> None:
    """Cancel `tasks` and wait until each has ended. A cancel can be swallowed by redis-py while it opens
    a connection (seen with redis 8.1 when a replica stops right after it starts: the loop carried on
    and shutdown hung), so the cancel is repeated until it lands."""
    pending = {t for t in tasks if t is not None}
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)


async def sync_forever(
    sync_once: Callable[[], Awaitable[bool]], interval_s: float, backoff: Backoff, replica_id: str, what: str
) -> None:
    """Run `sync_once` every `interval_s` seconds while it succeeds, after `backoff`'s delays while it fails,
    until cancelled. The loop of the load and record sharers; `what` names it in the log."""
    while True:
        try:
            ok = await sync_once()
        except Exception:  # a bug must not silently end sharing for the process's lifetime
            log.exception("replica %s: %s failed", replica_id, what)
            ok = False
        await asyncio.sleep(interval_s if ok else backoff.next())

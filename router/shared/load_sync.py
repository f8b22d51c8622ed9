"""Load sharing between router replicas: each publishes its own per-worker load and adds the others'.

Why: behind an L4 balancer every replica routes a share of the traffic; scoring only its own tickets,
a replica would pile requests on a worker the others already keep busy. Each replica writes what its
own tickets hold per worker (in flight, pending prefill tokens, active KV blocks) and reads the sum of
the other live replicas', which is folded into the `WorkerLoad` counters the policies already read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

import redis.asyncio as aioredis

from kvroute.router.shared.common import (
    REDIS_ERRORS,
    Backoff,
    Keys,
    ReplicaConfig,
    cancel_and_wait,
    sync_forever,
)
from kvroute.router.types import Worker, WorkerLoad

log = logging.getLogger("kvroute.replicas")


class LoadVector(NamedTuple):
    """One replica's (or several replicas' summed) load on one worker."""

    in_flight: int = 0
    pending_prefill_tokens: int = 0
    active_blocks: int = 0

    def __add__(self, other: object) -> LoadVector:
        if not isinstance(other, LoadVector):
            return NotImplemented
        return LoadVector(
            self.in_flight + other.in_flight,
            self.pending_prefill_tokens + other.pending_prefill_tokens,
            self.active_blocks + other.active_blocks,
        )

    def encode(self) -> str:
        return f"{self.in_flight} {self.pending_prefill_tokens} {self.active_blocks}"

    @classmethod
    def decode(cls, s: str) -> LoadVector | None:
        """None for a malformed value (a replica of another version): ignored, never fatal."""
        parts = s.split()
        if len(parts) != 3:
            return None
        try:
            a, b, c = (max(0, int(p)) for p in parts)
        except ValueError:
            return None
        return cls(a, b, c)


ZERO = LoadVector()


@dataclass
class _Applied:
    load: WorkerLoad  # the object the remote share was added to (a re-added worker has a new one)
    remote: LoadVector


class RemoteLoadFolder:
    """Folds the other replicas' load into each `Worker.load`, so policies need no change.

    Invariant: for every worker, `load.<field> == local + remote` where `local` is what this replica's
    tickets added and `remote` the share last folded in. Tickets subtract only what they added, so they
    never hit the clamp at 0 and the fold is exact; `local()` recovers this replica's own share.
    Only touches a `WorkerLoad` it has seen; a worker removed and re-added starts with remote 0.
    """

    def __init__(self, workers: Callable[[], Iterable[Worker]]) -> None:
        self._workers = workers
        self._applied: dict[str, _Applied] = {}

    def _prev(self, w: Worker) -> LoadVector:
        a = self._applied.get(w.url)
        return a.remote if a is not None and a.load is w.load else ZERO

    def local(self) -> dict[str, LoadVector]:
        """This replica's own load per worker (zero loads left out)."""
        out: dict[str, LoadVector] = {}
        for w in self._workers():
            ld, prev = w.load, self._prev(w)
            v = LoadVector(
                max(0, ld.in_flight - prev.in_flight),
                max(0, ld.pending_prefill_tokens - prev.pending_prefill_tokens),
                max(0, ld.active_blocks - prev.active_blocks),
            )
            if v != ZERO:
                out[w.url] = v
        return out

    def apply(self, remote: dict[str, LoadVector]) -> None:
        """Make every worker's remote share `remote[url]` (0 when absent)."""
        applied: dict[str, _Applied] = {}
        for w in self._workers():
            ld, prev = w.load, self._prev(w)
            target = remote.get(w.url, ZERO)
            if target != prev:
                ld.in_flight = max(0, ld.in_flight - prev.in_flight) + target.in_flight
                ld.pending_prefill_tokens = (
                    max(0, ld.pending_prefill_tokens - prev.pending_prefill_tokens)
                    + target.pending_prefill_tokens
                )
                ld.active_blocks = max(0, ld.active_blocks - prev.active_blocks) + target.active_blocks
            if target != ZERO:
                applied[w.url] = _Applied(ld, target)
        self._applied = applied

    def add_transient(self, worker: Worker, extra: LoadVector) -> None:
        """Another replica's request, known from its in-flight record before its load arrives: counted
        in `worker`'s remote share until the next `apply` replaces that share with the synced one (which
        includes the request if it is still running). Our own share (`local()`) is unchanged."""
        ld, prev = worker.load, self._prev(worker)
        ld.in_flight += extra.in_flight
        ld.pending_prefill_tokens += extra.pending_prefill_tokens
        ld.active_blocks += extra.active_blocks
        self._applied[worker.url] = _Applied(ld, prev + extra)

    def remote(self, url: str) -> LoadVector:
        a = self._applied.get(url)
        return a.remote if a is not None else ZERO


# One round trip per sync, atomic, on Redis' own clock (no skew between replica hosts): replace our
# load blob, stamp our liveness, prune dead replicas, return the live peers' blobs. One string per
# replica (not a hash field per worker): a few bulk replies instead of thousands of RESP elements,
# which is what the Python client spends its time parsing.
# KEYS[1] our load key, KEYS[2] the replicas zset; ARGV: id, ttl ms, load key prefix, our blob
_SYNC_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
if ARGV[4] == '' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], ARGV[4], 'PX', ttl) end
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. (now - ttl))
redis.call('PEXPIRE', KEYS[2], ttl * 10)
local out = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  if id ~= ARGV[1] then
    out[#out + 1] = id
    out[#out + 1] = redis.call('GET', ARGV[3] .. id) or ''
  end
end
return out
"""


def encode_blob(loads: dict[str, LoadVector]) -> str:
    """One line per worker: "url in_flight pending_prefill_tokens active_blocks"."""
    return "\n".join(f"{url} {v.encode()}" for url, v in loads.items())


def add_blob(into: dict[str, list[int]], blob: str) -> None:
    """Sum a peer's blob into `into` (url -> [in_flight, pending, active]); malformed lines are skipped
    (a peer of another version), negatives clamped. Hot: runs on the loop for every peer every sync,
    so it avoids per-line objects (1,000 workers x 7 peers parse in ~2 ms)."""
    for line in blob.split("\n"):
        parts = line.split(" ")
        if len(parts) != 4:
            continue
        try:
            a, b, c = int(parts[1]), int(parts[2]), int(parts[3])
        except ValueError:
            continue
        if a < 0 or b < 0 or c < 0:
            a, b, c = max(0, a), max(0, b), max(0, c)
        acc = into.get(parts[0])
        if acc is None:
            into[parts[0]] = [a, b, c]
        else:
            acc[0] += a
            acc[1] += b
            acc[2] += c


class ReplicaStateSync:
    """Publishes this replica's per-worker load every `sync_interval_s` and folds in the live peers'.

    Invariants: one Redis round trip per interval, from its own task (routing never waits on Redis);
    when Redis fails the replica keeps routing on what it knows, drops peers' load once it is older than
    `replica_ttl_s`, logs the outage once and retries with exponential backoff up to `reconnect_max_s`.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        folder: RemoteLoadFolder,
        config: ReplicaConfig,
        replica_id: str,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.folder = folder
        self.config = config
        self.replica_id = replica_id
        self.keys = Keys(config.key_prefix)
        self._clock = clock
        self._script = client.register_script(_SYNC_LUA)
        self._backoff = Backoff(config.sync_interval_s, config.reconnect_max_s)
        self._task: asyncio.Task[None] | None = None
        self._last_ok: float | None = None
        self.degraded = False  # True while Redis is unreachable (routing on local state only)
        self.syncs = 0  # successful round trips
        self.failures = 0  # failed round trips
        self.peers: tuple[str, ...] = ()  # live peers at the last successful sync

    # --- lifecycle

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"kvroute-replica-sync {self.replica_id}")

    async def close(self, *, forget: bool = True) -> None:
        """Stop syncing; `forget` removes our load from Redis at once (a crash leaves it to the TTL)."""
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None
        self.folder.apply({})
        if forget:
            with contextlib.suppress(*REDIS_ERRORS):
                async with self.client.pipeline(transaction=True) as p:
                    p.zrem(self.keys.replicas, self.replica_id)
                    p.delete(self.keys.load(self.replica_id))
                    await p.execute()

    # --- one sync

    async def sync_once(self) -> bool:
        """One round trip: publish our load, fold in the peers'. False (and degraded) if Redis failed."""
        blob = encode_blob(self.folder.local())
        args: list[str | int] = [
            self.replica_id,
            int(self.config.replica_ttl_s * 1000),
            self.keys.load_prefix,
            blob,
        ]
        try:
            reply = await self._script(keys=[self.keys.load(self.replica_id), self.keys.replicas], args=args)
        except REDIS_ERRORS as exc:
            self._failed(exc)
            return False
        sums: dict[str, list[int]] = {}
        peers = []
        for i in range(0, len(reply), 2):
            peers.append(reply[i])
            add_blob(sums, reply[i + 1])
        self.folder.apply({url: LoadVector(*v) for url, v in sums.items()})
        self.peers = tuple(peers)
        self._last_ok = self._clock()
        self.syncs += 1
        self._backoff.reset()
        if self.degraded:
            self.degraded = False
            log.info(
                "replica %s: Redis reachable again, sharing load with %d peers", self.replica_id, len(peers)
            )
        return True

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        if not self.degraded:
            self.degraded = True
            log.warning(
                "replica %s: Redis unavailable (%s: %s); routing on local load until it is back",
                self.replica_id,
                type(exc).__name__,
                exc,
            )
        if self._last_ok is None or self._clock() - self._last_ok >= self.config.replica_ttl_s:
            self.folder.apply({})  # peers' load is too old to trust: what they held has likely finished
            self.peers = ()

    async def _run(self) -> None:
        interval = self.config.sync_interval_s
        await sync_forever(self.sync_once, interval, self._backoff, self.replica_id, "load sync")

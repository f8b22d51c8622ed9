"""Shared worker membership: an admin add/remove/drain on one replica reaches every replica.

Layout in Redis: a hash (url -> JSON `WorkerSpec`) holds the shared set, so a replica that starts or
reconnects loads it whole; a pub/sub channel carries each change as it happens. A replica subscribes
before it loads the set, so no change falls between the two (a change seen twice is harmless: every
listener operation is idempotent).
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import redis.asyncio as aioredis

from kvroute.router.shared.common import (
    REDIS_ERRORS,
    Backoff,
    Keys,
    Outage,
    ReplicaConfig,
    cancel_and_wait,
    listen_forever,
)
from kvroute.router.types import WorkerRole

log = logging.getLogger("kvroute.replicas")


class Op(enum.Enum):
    ADD = "add"
    REMOVE = "remove"
    DRAIN = "drain"
    UNDRAIN = "undrain"


@dataclass(frozen=True)
class WorkerSpec:
    """What another replica needs to register a worker itself (it runs its own checks and subscriptions)."""

    url: str
    role: str = "regular"  # WorkerRole value
    kv_events: str | None = None  # zmq endpoint override, as given to the admin API
    drained: bool = False
    bootstrap_port: int | None = None  # a prefill server's bootstrap port override (PD), as given


@dataclass(frozen=True)
class MembershipChange:
    op: Op
    spec: WorkerSpec
    origin: str = ""  # replica id that made the change ("" for a snapshot replayed at (re)connect)

    def encode(self) -> str:
        return json.dumps({"op": self.op.value, "spec": asdict(self.spec), "origin": self.origin})

    @classmethod
    def decode(cls, raw: str) -> MembershipChange | None:
        try:
            d = json.loads(raw)
            return cls(Op(d["op"]), WorkerSpec(**d["spec"]), str(d.get("origin", "")))
        except (ValueError, KeyError, TypeError):
            return None


class MembershipListener(Protocol):
    """What the registry implements to receive other replicas' changes. Must be idempotent: adding a
    known worker, removing an unknown one or draining a drained one is a no-op, never an error."""

    async def apply_membership(self, change: MembershipChange) -> None: ...


class SharedMembership:
    """Mirror of the shared worker set; publishes this replica's admin changes, applies the others'.

    Invariants: `known` equals the Redis hash as of the last snapshot plus the changes seen since;
    own changes are never re-applied (origin check); after a Redis outage the snapshot is reloaded and
    the differences (workers removed or added meanwhile) are applied, so replicas converge.
    """

    def __init__(
        self, client: aioredis.Redis, listener: MembershipListener, config: ReplicaConfig, replica_id: str
    ) -> None:
        self.client = client
        self.listener = listener
        self.config = config
        self.replica_id = replica_id
        self.keys = Keys(config.key_prefix)
        self.known: dict[str, WorkerSpec] = {}
        self._outage = Outage(replica_id, "membership channel")
        self.ready = asyncio.Event()  # set once the first snapshot has been applied
        self._backoff = Backoff(config.sync_interval_s, config.reconnect_max_s)
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[Any]] = set()
        self._epoch: str | None = None  # the shared set's epoch at our last snapshot
        # Publishes go out one at a time, in call order (asyncio.Lock is FIFO): an add followed at once
        # by a drain must not reach Redis as drain-then-add (the hash would end up undrained).
        self._publish_lock = asyncio.Lock()
        self._unsent: list[tuple[Op, WorkerSpec]] = []  # made while Redis was down, replayed in order

    # --- lifecycle

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"kvroute-membership {self.replica_id}")

    async def close(self) -> None:
        await cancel_and_wait((self._task, *self._pending))
        self._task = None
        self._pending.clear()

    # --- publishing this replica's changes

    async def publish(self, op: Op, spec: WorkerSpec) -> bool:
        """Record `op` in the shared set and tell the others; one atomic round trip. False if Redis is down:
        the change is applied here already and is queued, in order, to be replayed to Redis as soon as it
        is back (before the snapshot is read), so the other replicas get it then (issue #18: a drain made
        during an outage never reached the other replica). A later change to the same worker wins."""
        async with self._publish_lock:
            if self._unsent and not await self._flush_unsent():
                self._queue(op, spec)
                return False
            if await self._publish(op, spec):
                return True
            self._queue(op, spec)
            return False

    @property
    def unsent(self) -> int:
        """Changes made during a Redis outage, waiting to be replayed."""
        return len(self._unsent)

    def _queue(self, op: Op, spec: WorkerSpec) -> None:
        self._unsent.append((op, spec))
        log.warning(
            "replica %s: Redis is unreachable; %s %s applied here and queued (%d waiting) for the other "
            "replicas",
            self.replica_id,
            op.value,
            spec.url,
            len(self._unsent),
        )

    async def _flush_unsent(self) -> bool:
        """Replay the queued changes in order; True when none is left."""
        while self._unsent:
            op, spec = self._unsent[0]
            if not await self._publish(op, spec):
                return False
            self._unsent.pop(0)
            log.info(
                "replica %s: replayed %s %s queued during the outage", self.replica_id, op.value, spec.url
            )
        return True

    async def _publish(self, op: Op, spec: WorkerSpec) -> bool:
        known = self.known.get(spec.url)
        if op in (Op.DRAIN, Op.UNDRAIN) and known is not None:  # keep role, endpoints, bootstrap port
            spec = WorkerSpec(**{**asdict(known), "drained": op is Op.DRAIN})
        change = MembershipChange(op, spec, self.replica_id)
        try:
            async with self.client.pipeline(transaction=True) as p:
                if op is Op.REMOVE:
                    p.hdel(self.keys.workers, spec.url)
                else:
                    p.hset(self.keys.workers, spec.url, json.dumps(asdict(spec)))
                p.publish(self.keys.workers_channel, change.encode())
                await p.execute()
        except REDIS_ERRORS as exc:
            log.warning("replica %s: could not share %s %s (%s)", self.replica_id, op.value, spec.url, exc)
            return False
        self._remember(change)
        return True

    def notify(self, op: Op, spec: WorkerSpec) -> None:
        """`publish` from sync code (the registry's admin methods): scheduled, never blocks the caller."""
        task = asyncio.get_running_loop().create_task(self.publish(op, spec))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    # --- receiving

    async def _run(self) -> None:
        await listen_forever(
            self.client,
            self.keys.workers_channel,
            self._on_message,
            self._load_snapshot,
            self._outage,
            self._backoff,
        )

    @property
    def degraded(self) -> bool:
        return self._outage.degraded

    async def _on_message(self, raw: str) -> None:
        change = MembershipChange.decode(raw)
        if change is None:
            log.warning("replica %s: ignoring malformed membership message", self.replica_id)
        elif change.origin != self.replica_id:
            await self._apply(change)

    async def _load_snapshot(self) -> None:
        """Load the shared set and apply the differences from what we knew.

        If Redis lost the set (restarted without persistence, or failed over: the epoch is missing or
        new), removals cannot be told from data loss, so nothing is removed: our known workers are
        written back (HSETNX, not overwriting what others re-seeded) under a fresh epoch. Changes made
        here during an outage are replayed first.
        """
        async with self._publish_lock:
            if not await self._flush_unsent():
                raise ConnectionError("Redis unreachable while replaying queued membership changes")
        epoch, raw = await self._read_set()
        if epoch is None or (self._epoch is not None and epoch != self._epoch):
            async with self.client.pipeline(transaction=True) as p:
                p.set(self.keys.workers_epoch, uuid.uuid4().hex, nx=True)
                for url, spec in self.known.items():
                    p.hsetnx(self.keys.workers, url, json.dumps(asdict(spec)))
                await p.execute()
            if self.known:
                log.warning(
                    "replica %s: shared worker set was lost by Redis; re-seeded %d workers",
                    self.replica_id,
                    len(self.known),
                )
            epoch, raw = await self._read_set()
        self._epoch = epoch
        snap: dict[str, WorkerSpec] = {}
        for url, js in raw.items():
            try:
                snap[url] = WorkerSpec(**json.loads(js))
            except (ValueError, TypeError):
                log.warning("replica %s: ignoring malformed worker entry %s", self.replica_id, url)
        for url, spec in list(self.known.items()):
            if url not in snap:
                await self._apply(MembershipChange(Op.REMOVE, spec))
        for url, spec in snap.items():
            old = self.known.get(url)
            if old is None:
                await self._apply(MembershipChange(Op.ADD, spec))
                if spec.drained:
                    await self._apply(MembershipChange(Op.DRAIN, spec))
            elif old.drained != spec.drained:
                await self._apply(MembershipChange(Op.DRAIN if spec.drained else Op.UNDRAIN, spec))
            elif old != spec:
                self.known[url] = spec
        self.ready.set()

    async def _read_set(self) -> tuple[str | None, dict[Any, Any]]:
        async with self.client.pipeline(transaction=True) as p:
            p.get(self.keys.workers_epoch)
            p.hgetall(self.keys.workers)
            epoch, raw = await p.execute()
        return epoch, raw

    async def _apply(self, change: MembershipChange) -> None:
        self._remember(change)
        try:
            await self.listener.apply_membership(change)
        except Exception:  # one bad change must not stop the channel
            log.exception(
                "replica %s: applying %s %s failed", self.replica_id, change.op.value, change.spec.url
            )

    def _remember(self, change: MembershipChange) -> None:
        url = change.spec.url
        if change.op is Op.REMOVE:
            self.known.pop(url, None)
        elif change.op is Op.ADD:
            self.known[url] = change.spec
        elif url in self.known:
            self.known[url] = WorkerSpec(**{**asdict(self.known[url]), "drained": change.op is Op.DRAIN})


class RegistryMembership:
    """`MembershipListener` over the router's `WorkerRegistry`: applies other replicas' admin changes.

    Takes the registry as `Any` (duck-typed: add/remove/drain/undrain and `in`) so this module does not
    import the HTTP layer; its errors for "already registered" / "unknown" make the operations idempotent.
    """

    def __init__(self, registry: Any) -> None:
        self.registry = registry

    async def apply_membership(self, change: MembershipChange) -> None:
        reg, spec = self.registry, change.spec
        present = spec.url in reg
        if change.op is Op.ADD and not present:
            reg.add(
                spec.url,
                role=WorkerRole(spec.role),
                kv_events=spec.kv_events,
                bootstrap_port=spec.bootstrap_port,
            )
        elif change.op is Op.REMOVE and present:
            await reg.remove(spec.url)
        elif change.op is Op.DRAIN and present:
            reg.drain(spec.url)
        elif change.op is Op.UNDRAIN and present:
            reg.undrain(spec.url)

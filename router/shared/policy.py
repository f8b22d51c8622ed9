"""The routing policy set through the admin API, shared by every replica.

An admin `PUT /admin/policy` reaches one replica (or one process of `kvroute serve --processes N`); the
fleet must route by one policy. The change is stored under `{prefix}:policy` (so a replica that starts
or reconnects later adopts it) and published on `{prefix}:policy:changes`. A replica started with no
shared policy stored keeps its `--policy`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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

log = logging.getLogger("kvroute.replicas")


@dataclass(frozen=True)
class PolicyChange:
    name: str
    params: dict[str, Any]
    origin: str = ""
    at: float = 0.0  # publisher's wall clock, for operators reading the key in redis-cli

    def encode(self) -> str:
        return json.dumps({"name": self.name, "params": self.params, "origin": self.origin, "at": self.at})

    @classmethod
    def decode(cls, raw: str | bytes) -> PolicyChange | None:
        try:
            d = json.loads(raw)
            if not isinstance(d["name"], str) or not isinstance(d.get("params") or {}, dict):
                return None
            return cls(
                d["name"], dict(d.get("params") or {}), str(d.get("origin", "")), float(d.get("at", 0))
            )
        except (ValueError, KeyError, TypeError):
            return None

    @property
    def setting(self) -> tuple[str, str]:
        """What identifies the policy itself (origin and time excluded)."""
        return self.name, json.dumps(self.params, sort_keys=True)


class SharedPolicy:
    """Publishes this replica's admin policy changes; applies the stored one and the others' changes.

    `apply(name, params)` is the router's `set_policy`; it raises ValueError for a policy this replica
    cannot build (an older version), which is logged and leaves its current policy in place.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        apply: Callable[[str, dict[str, Any]], None],
        config: ReplicaConfig,
        replica_id: str,
        initial: tuple[str, dict[str, Any]] | None = None,
    ) -> None:
        """`initial`: the policy this replica starts with (its `--policy`), so a stored equal one is not
        re-applied (which would reset learned policy state) nor logged as an override."""
        self.client = client
        self.apply = apply
        self.replica_id = replica_id
        self.keys = Keys(config.key_prefix)
        self._outage = Outage(replica_id, "policy channel")
        self.ready = asyncio.Event()  # set once the stored policy (if any) has been read and applied
        # the setting last applied or published here
        self.current = PolicyChange(*initial).setting if initial is not None else None
        self._backoff = Backoff(config.sync_interval_s, config.reconnect_max_s)
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[Any]] = set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"kvroute-policy {self.replica_id}")

    async def close(self) -> None:
        await cancel_and_wait((self._task, *self._pending))
        self._task = None
        self._pending.clear()

    async def publish(self, name: str, params: dict[str, Any]) -> bool:
        """Store and announce a policy this replica has just applied. False if Redis is down (the change
        stays local; the next stored change, from any replica, wins)."""
        change = PolicyChange(name, dict(params), self.replica_id, time.time())
        self.current = change.setting
        try:
            async with self.client.pipeline(transaction=True) as p:
                p.set(self.keys.policy, change.encode())
                p.publish(self.keys.policy_channel, change.encode())
                await p.execute()
        except REDIS_ERRORS as exc:
            log.warning("replica %s: could not share policy %s (%s)", self.replica_id, name, exc)
            return False
        return True

    def notify(self, name: str, params: dict[str, Any]) -> None:
        """`publish` from a request handler without waiting on Redis."""
        task = asyncio.get_running_loop().create_task(self.publish(name, params))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _run(self) -> None:
        await listen_forever(
            self.client,
            self.keys.policy_channel,
            self._on_message,
            self._read_stored,
            self._outage,
            self._backoff,
        )

    @property
    def degraded(self) -> bool:
        return self._outage.degraded

    async def _read_stored(self) -> None:
        stored = await self.client.get(self.keys.policy)
        if stored is not None:
            self._receive(stored, at_start=not self.ready.is_set())
        self.ready.set()

    async def _on_message(self, raw: str) -> None:
        self._receive(raw, at_start=False)

    def _receive(self, raw: str | bytes, at_start: bool) -> None:
        change = PolicyChange.decode(raw)
        if change is None:
            log.warning("replica %s: ignoring malformed policy message", self.replica_id)
            return
        if change.setting == self.current:
            return
        try:
            self.apply(change.name, change.params)
        except ValueError as exc:
            log.error("replica %s: cannot apply shared policy %s: %s", self.replica_id, change.name, exc)
            return
        self.current = change.setting
        log.log(
            logging.WARNING if at_start else logging.INFO,
            "replica %s: policy %s %s from %s (set through the admin API; it overrides --policy)",
            self.replica_id,
            change.name,
            change.params,
            change.origin or "another replica",
        )

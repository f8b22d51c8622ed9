"""Tenants changed through the admin API, shared by every replica and `--processes` through Redis.

The same mechanism as the shared policy (router/shared/policy.py): each change is stored in the hash
`{prefix}:tenants` (name -> JSON tenant, or `null` for a deleted one, so deleting a tenant from the
config file sticks) and published on `{prefix}:tenants:changes`; `listen_forever` re-reads the hash
after every (re)subscription, so a replica that starts or reconnects later converges.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis

from kvroute.router.shared.common import REDIS_ERRORS, Backoff, Outage, cancel_and_wait, listen_forever

log = logging.getLogger("kvroute.tenants")

# apply(name, tenant table as config, or None to delete); ValueError for one this replica rejects
Apply = Callable[[str, dict[str, Any] | None], None]


class SharedTenants:
    def __init__(
        self,
        client: aioredis.Redis,
        apply: Apply,
        key_prefix: str,
        replica_id: str,
        reconnect_max_s: float = 5.0,
    ) -> None:
        self.client = client
        self.apply = apply
        self.replica_id = replica_id
        self.key = f"{key_prefix}:tenants"
        self.channel = f"{key_prefix}:tenants:changes"
        self._outage = Outage(replica_id, "tenants channel")
        self._backoff = Backoff(0.2, reconnect_max_s)
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[Any]] = set()
        self.ready = asyncio.Event()  # the stored changes were read once

    @property
    def degraded(self) -> bool:
        return self._outage.degraded

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(
                listen_forever(
                    self.client,
                    self.channel,
                    self._on_message,
                    self._read_stored,
                    self._outage,
                    self._backoff,
                ),
                name=f"kvroute-tenants {self.replica_id}",
            )

    async def close(self) -> None:
        await cancel_and_wait((self._task, *self._pending))
        self._task = None

    async def publish(self, name: str, tenant: dict[str, Any] | None) -> bool:
        """Store and announce a change this replica has applied. False if Redis is down (local only)."""
        raw = json.dumps(tenant)
        msg = json.dumps({"name": name, "tenant": tenant, "origin": self.replica_id})
        try:
            async with self.client.pipeline(transaction=True) as p:
                p.hset(self.key, name, raw)
                p.publish(self.channel, msg)
                await p.execute()
        except REDIS_ERRORS as exc:
            log.warning("replica %s: could not share tenant %s (%s)", self.replica_id, name, exc)
            return False
        return True

    def notify(self, name: str, tenant: dict[str, Any] | None) -> None:
        task = asyncio.get_running_loop().create_task(self.publish(name, tenant))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _read_stored(self) -> None:
        stored = await self.client.hgetall(self.key)
        for name, raw in sorted(stored.items()):
            self._receive(name, raw)
        self.ready.set()

    async def _on_message(self, raw: str) -> None:
        try:
            d = json.loads(raw)
            name, tenant, origin = d["name"], d.get("tenant"), d.get("origin")
        except (ValueError, KeyError, TypeError):
            log.warning("replica %s: ignoring malformed tenants message", self.replica_id)
            return
        if origin != self.replica_id:
            self._receive(name, json.dumps(tenant))

    def _receive(self, name: Any, raw: Any) -> None:
        try:
            tenant = json.loads(raw)
            if not isinstance(name, str) or not (tenant is None or isinstance(tenant, dict)):
                raise ValueError("not a tenant table")
            self.apply(name, tenant)
        except ValueError as exc:
            log.error("replica %s: cannot apply shared tenant %r: %s", self.replica_id, name, exc)

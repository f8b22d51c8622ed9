"""One replica's sharing machinery, started and stopped as a unit (the app's `cleanup_ctx` hook)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from kvroute.router.config import normalize_url
from kvroute.router.shared.common import REDIS_ERRORS, ReplicaConfig, connect
from kvroute.router.shared.inflight import InflightShare, inflight_sink
from kvroute.router.shared.load_sync import RemoteLoadFolder, ReplicaStateSync
from kvroute.router.shared.membership import Op, RegistryMembership, SharedMembership, WorkerSpec
from kvroute.router.shared.policy import SharedPolicy
from kvroute.router.shared.records import RoutingRecordShare, cache_aware_sink
from kvroute.router.types import RoutingRequest, Worker

log = logging.getLogger("kvroute.replicas")


class ReplicaRuntime:
    """The Redis client, the load sync, the membership mirror and the shared policy of one replica."""

    def __init__(self, config: ReplicaConfig, router: Any, registry: Any | None) -> None:
        """`router`: a `Router` (its `workers()` are synced, its policy shared); `registry`: a
        `WorkerRegistry`, or None to share load only (library use without the HTTP layer)."""
        if config.redis_url is None:
            raise ValueError("ReplicaRuntime needs config.redis_url")
        self.config = config
        self.replica_id = config.resolved_id
        self.client = connect(config.redis_url, config.redis_timeout_s)
        self.sync = ReplicaStateSync(self.client, RemoteLoadFolder(router.workers), config, self.replica_id)
        self.membership = (
            SharedMembership(self.client, RegistryMembership(registry), config, self.replica_id)
            if registry is not None
            else None
        )
        info = router.policy_info()
        self.policy = (
            SharedPolicy(
                self.client, router.set_policy, config, self.replica_id, (info["name"], info["params"])
            )
            if registry is not None
            else None
        )
        self.records = (
            RoutingRecordShare(self.client, cache_aware_sink(router), config, self.replica_id)
            if config.share_records
            else None
        )
        self.inflight = (
            InflightShare(
                self.client,
                inflight_sink(router, config.inflight_ttl_s, self.sync.folder),
                config,
                self.replica_id,
            )
            if config.share_inflight
            else None
        )
        self._router = router

    def on_routed(self, request: RoutingRequest, worker: Worker) -> None:
        """`Router.routed_hooks` entry: queue the routing record for the other replicas."""
        if self.records is not None:
            self.records.record(worker.url, request.block_hashes)

    async def start(self) -> None:
        """Starts the tasks; never waits on Redis (an unreachable Redis leaves the replica degraded)."""
        self.sync.start()
        if self.membership is not None:
            self.membership.start()
        if self.policy is not None:
            self.policy.start()
        if self.records is not None:
            self.records.start()
            self._router.routed_hooks.append(self.on_routed)
        if self.inflight is not None:
            self.inflight.start()
            self._router.routed_hooks.append(self.inflight.on_routed)

    async def close(self) -> None:
        if self.on_routed in self._router.routed_hooks:
            self._router.routed_hooks.remove(self.on_routed)
        if self.inflight is not None:
            if self.inflight.on_routed in self._router.routed_hooks:
                self._router.routed_hooks.remove(self.inflight.on_routed)
            await self.inflight.close()
        if self.records is not None:
            await self.records.close()
        if self.membership is not None:
            await self.membership.close()
        if self.policy is not None:
            await self.policy.close()
        await self.sync.close(forget=True)
        with contextlib.suppress(*REDIS_ERRORS):
            await self.client.aclose()

    # --- hooks for the admin API, called after a local change succeeded (sync, never block) ------

    def notify_add(
        self,
        url: str,
        role: str = "regular",
        kv_events: str | None = None,
        bootstrap_port: int | None = None,
    ) -> None:
        spec = WorkerSpec(
            url=normalize_url(url), role=role, kv_events=kv_events, bootstrap_port=bootstrap_port
        )
        self._notify(Op.ADD, spec)

    def notify_remove(self, url: str) -> None:
        self._notify(Op.REMOVE, WorkerSpec(url=normalize_url(url)))

    def notify_drain(self, url: str, drained: bool = True, role: str = "regular") -> None:
        """`role`: the worker's, kept in the shared set when it does not hold the worker yet (a
        --worker-urls worker); a worker it holds keeps its stored spec (merged when published, in order)."""
        self._notify(
            Op.DRAIN if drained else Op.UNDRAIN, WorkerSpec(normalize_url(url), role, drained=drained)
        )

    def notify_policy(self, name: str, params: dict[str, Any]) -> None:
        """After a local `set_policy` succeeded: store it for every replica and tell them."""
        if self.policy is not None:
            self.policy.notify(name, params)

    def _notify(self, op: Op, spec: WorkerSpec) -> None:
        if self.membership is not None:
            self.membership.notify(op, spec)

    def status(self) -> dict[str, Any]:
        """For /admin and metrics: who we are, which peers we see, whether Redis is reachable."""
        return {
            "replica_id": self.replica_id,
            "peers": list(self.sync.peers),
            "degraded": self.sync.degraded
            or bool(self.membership and self.membership.degraded)
            or bool(self.policy and self.policy.degraded)
            or bool(self.inflight and self.inflight.degraded)
            or bool(self.records and self.records.degraded),
            "syncs": self.sync.syncs,
            "sync_failures": self.sync.failures,
            "shared_workers": sorted(self.membership.known) if self.membership else [],
            "unsent_changes": self.membership.unsent if self.membership else 0,
            "inflight_published": self.inflight.published if self.inflight else 0,
            "inflight_applied": self.inflight.applied if self.inflight else 0,
        }


@contextlib.asynccontextmanager
async def replica_context(
    config: Any, router: Any, registry: Any | None
) -> AsyncIterator[ReplicaRuntime | None]:
    """Yields the running `ReplicaRuntime`, or None when `redis_url` is unset (sharing disabled).
    `config`: a `RouterConfig` (the proposed fields are read with defaults) or a `ReplicaConfig`."""
    rc = config if isinstance(config, ReplicaConfig) else ReplicaConfig.from_router_config(config)
    if not rc.enabled:
        yield None
        return
    rt = ReplicaRuntime(rc, router, registry)
    await rt.start()
    try:
        yield rt
    finally:
        await rt.close()

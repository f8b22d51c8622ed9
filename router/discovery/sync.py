"""`DiscoverySync`: a source's snapshots -> the registry's add, undrain and retire.

Invariants: it touches only workers it added itself (a `--worker-urls` or admin-added worker at the
same URL is left alone); a worker that vanishes is retired (drained, removed once none of its requests
is in flight), never removed with requests on it; a worker that comes back while still draining is
undrained, keeping its index and connections.
"""

from __future__ import annotations

import logging
from typing import Protocol

from kvroute.router.discovery.base import DiscoveredWorker, Snapshot
from kvroute.router.types import Worker, WorkerRole

log = logging.getLogger("kvroute.discovery")


class Registry(Protocol):
    """The part of `kvroute.router.workers.WorkerRegistry` discovery acts through."""

    def __contains__(self, url: str) -> bool: ...

    def add(
        self,
        url: str,
        role: WorkerRole = ...,
        kv_events: str | None = None,
        bootstrap_port: int | None = None,
    ) -> Worker: ...

    def retire(self, url: str, reason: str, poll_s: float = ...) -> Worker: ...

    def retiring(self, url: str) -> bool: ...

    def undrain(self, url: str) -> Worker: ...


class DiscoveryObserver(Protocol):
    """Counts what discovery does (router.metrics implements it)."""

    def discovery_change(self, source: str, change: str) -> None: ...

    def discovery_error(self, source: str) -> None: ...

    def discovery_workers(self, source: str, n: int) -> None: ...


class DiscoverySync:
    """Applies one source's snapshots to the registry (the source's `DiscoverySink`)."""

    def __init__(self, registry: Registry, source: str, observer: DiscoveryObserver | None = None) -> None:
        self.registry = registry
        self.source = source
        self.observer = observer
        self.owned: dict[str, DiscoveredWorker] = {}  # url -> as discovered, while registered by us
        self.last_error: str | None = None
        self.snapshots = 0
        self._errors_since_publish = 0

    def publish(self, workers: Snapshot) -> None:
        self.snapshots += 1
        if not self._errors_since_publish:  # a clean round: the next error is news again
            self.last_error = None
        self._errors_since_publish = 0
        for url, found in workers.items():
            known = self.owned.get(url)
            if known is not None and url in self.registry:
                if self.registry.retiring(url):
                    self.registry.undrain(url)
                    log.info("discovery (%s): %s is back; undrained", self.source, url)
                    self._count("returned")
                if known != found:
                    log.warning(
                        "discovery (%s): %s changed (%s -> %s); its registration is kept (remove it "
                        "through the admin API to apply the change)",
                        self.source,
                        url,
                        known,
                        found,
                    )
                    self.owned[url] = found
                continue
            if known is None and url in self.registry:
                log.info(
                    "discovery (%s): %s is already registered (not by discovery); left as is",
                    self.source,
                    url,
                )
                continue
            try:
                self.registry.add(
                    url, found.role, kv_events=found.kv_events, bootstrap_port=found.bootstrap_port
                )
            except ValueError as exc:  # RegistryError: a URL or port the registry refuses
                self.error(f"cannot register {url}: {exc}")
                continue
            self.owned[url] = found
            log.info("discovery (%s): %s appeared (%s); registering", self.source, url, found.role.value)
            self._count("added")
        for url in list(self.owned):
            if url in workers:
                continue
            if url not in self.registry:  # retired and removed already, or removed by an admin
                del self.owned[url]
                continue
            if not self.registry.retiring(url):
                self.registry.retire(url, f"draining (discovery: {self.source} no longer lists it)")
                log.info("discovery (%s): %s vanished; draining, removed once idle", self.source, url)
                self._count("retired")
        if self.observer is not None:
            self.observer.discovery_workers(self.source, len(workers))

    def error(self, message: str) -> None:
        """Logged when it differs from the last one (a source retrying every few seconds says it once)."""
        if message != self.last_error:
            log.error("discovery (%s): %s; keeping the last known workers", self.source, message)
        self.last_error = message
        self._errors_since_publish += 1
        if self.observer is not None:
            self.observer.discovery_error(self.source)

    def _count(self, change: str) -> None:
        if self.observer is not None:
            self.observer.discovery_change(self.source, change)

"""DNS discovery: the workers behind a name, re-resolved every `interval_s` (a headless Kubernetes
service, Consul, or any zone the operator's tooling keeps).

`record="A"`: the name's A and AAAA addresses, each `http://addr:port` with the configured port.
`record="SRV"`: the name's SRV records (`_http._tcp.NAME`), each target resolved to its addresses, with
the port from the record. Lookups go through dnspython's asyncio resolver (the system's resolv.conf,
or the `nameserver` given), never blocking the event loop.

A name that stops resolving (NXDOMAIN, no records, timeouts, server failures) keeps its last workers
for `grace_s` seconds, then they are retired; a name that resolves to fewer addresses retires the
missing ones at once (that is an intended change, not an outage).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from kvroute.router.discovery.base import DiscoveredWorker, DiscoverySink, Snapshot, http_url, snapshot
from kvroute.router.types import WorkerRole


class DnsLookupError(Exception):
    """The name did not resolve to any usable record."""


def make_resolver(nameserver: str | None, timeout_s: float) -> Any:
    """A dnspython asyncio resolver: the system's configuration, or `HOST[:PORT]` (tests, sidecars)."""
    try:
        import dns.asyncresolver
    except ImportError as exc:
        raise RuntimeError("DNS discovery needs dnspython: pip install 'kvroute[dns]'") from exc
    if nameserver is None:
        resolver = dns.asyncresolver.Resolver()
    else:
        resolver = dns.asyncresolver.Resolver(configure=False)
        host, _, port = nameserver.rpartition(":") if nameserver.count(":") == 1 else (nameserver, "", "")
        resolver.nameservers = [host]
        resolver.port = int(port) if port else 53
    resolver.lifetime = timeout_s
    resolver.cache = None  # every round asks again: the point is to see changes
    return resolver


class DnsSource:
    """Publishes the workers behind one name per role (see the module docstring)."""

    name = "dns"

    def __init__(
        self,
        names: Sequence[tuple[WorkerRole, str]],
        record: str = "A",
        port: int = 80,
        interval_s: float = 30.0,
        grace_s: float = 30.0,
        nameserver: str | None = None,
        resolver: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if record not in ("A", "SRV"):
            raise ValueError(f"record must be A or SRV, got {record!r}")
        self.names = list(names)
        self.record = record
        self.port = port
        self.interval_s = interval_s
        self.grace_s = grace_s
        self.clock = clock
        self.resolver = resolver or make_resolver(nameserver, timeout_s=min(5.0, interval_s))
        self._good: dict[str, tuple[list[DiscoveredWorker], float]] = {}  # name -> (workers, when)

    async def _addresses(self, name: str) -> list[str]:
        import dns.exception
        import dns.resolver

        found: list[str] = []
        errors: list[str] = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self.resolver.resolve(name, rdtype, search=False)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer) as exc:
                errors.append(type(exc).__name__)
                continue
            except dns.exception.DNSException as exc:
                raise DnsLookupError(f"{name} {rdtype}: {type(exc).__name__}: {exc}") from exc
            found += [r.address for r in answer]
        if not found:
            raise DnsLookupError(f"{name}: no A/AAAA records ({', '.join(errors)})")
        return sorted(set(found))

    async def lookup(self, role: WorkerRole, name: str) -> list[DiscoveredWorker]:
        """The workers behind `name` now; DnsLookupError when there are none."""
        if self.record == "A":
            return [DiscoveredWorker(http_url(a, self.port), role) for a in await self._addresses(name)]
        import dns.exception

        try:
            answer = await self.resolver.resolve(name, "SRV", search=False)
        except dns.exception.DNSException as exc:
            raise DnsLookupError(f"{name} SRV: {type(exc).__name__}: {exc}") from exc
        out: list[DiscoveredWorker] = []
        for srv in answer:
            target = srv.target.to_text(omit_final_dot=True)
            for addr in await self._addresses(target):
                out.append(DiscoveredWorker(http_url(addr, int(srv.port)), role))
        return out

    async def resolve_all(self, sink: DiscoverySink) -> Snapshot:
        """One round: every name looked up; a failing name keeps its last workers within the grace."""
        now = self.clock()
        workers: list[DiscoveredWorker] = []
        for role, name in self.names:
            try:
                found = await self.lookup(role, name)
            except DnsLookupError as exc:
                good = self._good.get(name)
                kept = good is not None and now - good[1] < self.grace_s
                sink.error(f"{exc} ({'keeping its last workers' if kept else 'no workers'})")
                if good is not None and kept:
                    workers += good[0]
                continue
            self._good[name] = (found, now)
            workers += found
        return snapshot(workers)

    async def run(self, sink: DiscoverySink) -> None:
        while True:
            sink.publish(await self.resolve_all(sink))
            await asyncio.sleep(self.interval_s)

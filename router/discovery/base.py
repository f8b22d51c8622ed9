"""What every discovery source produces: the full set of workers it sees now, published on each change.

A source publishes snapshots (never deltas): a reconnecting watch, a re-read file or a re-resolved
name simply publishes what it sees, and `DiscoverySync` works out what was added and what vanished.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from kvroute.router.config import normalize_url
from kvroute.router.types import WorkerRole


@dataclass(frozen=True)
class DiscoveredWorker:
    """One engine a source sees. `bootstrap_port`: a prefill server's KV bootstrap port (None: from
    its `/server_info`); `kv_events`: its event endpoint when the source knows it (None: discovered)."""

    url: str
    role: WorkerRole = WorkerRole.REGULAR
    bootstrap_port: int | None = None
    kv_events: str | None = None


Snapshot = dict[str, DiscoveredWorker]  # normalised url -> worker


class DiscoverySink(Protocol):
    """Where a source reports: `publish` the full set it sees; `error` what went wrong (the last set
    stays in force)."""

    def publish(self, workers: Snapshot) -> None: ...

    def error(self, message: str) -> None: ...


def snapshot(workers: Iterable[DiscoveredWorker]) -> Snapshot:
    return {normalize_url(w.url): w for w in workers}


def http_url(host: str, port: int) -> str:
    """`http://host:port`, with IPv6 addresses in brackets."""
    return f"http://[{host}]:{port}" if ":" in host and not host.startswith("[") else f"http://{host}:{port}"


class DiscoverySource(Protocol):
    """A source of workers. `run` publishes a snapshot once it knows the set and whenever it changes,
    reports errors to the sink and carries on (the last published set stays in force), and returns
    only when cancelled."""

    name: str

    async def run(self, sink: DiscoverySink) -> None: ...

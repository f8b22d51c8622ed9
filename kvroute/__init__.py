"""kvroute: a KV-cache-aware request router and load balancer for SGLang serving fleets.

The public API, for use as a library (the same decisions as the HTTP proxy, without HTTP):

    from kvroute import Router
    from kvroute.router.types import Worker, WorkerState

The repository's folders are this package's subpackages: `kvroute.router` (routing core, HTTP proxy,
registry, discovery, admin), `kvroute.engines` (SGLang client and simulated/GPU engines),
`kvroute.cache_index` (block hashing and the radix index), `kvroute.bench` (benchmarks).
"""

from kvroute.router import LoadTracker, NoWorkerAvailable, Router, Ticket, WorkerStats
from kvroute.router._version import __version__

__all__ = ["LoadTracker", "NoWorkerAvailable", "Router", "Ticket", "WorkerStats", "__version__"]

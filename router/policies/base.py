"""The `Policy` protocol: every routing policy is one file behind it.

Selection only reads: a policy never reserves load or mutates queues (the proxy reserves on the
chosen worker and releases in `finally`). The optional hooks default to no-ops.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from router.types import Decision, RoutingRequest, Worker


class NoWorkerAvailable(Exception):
    """No candidate can take the request (none healthy, all draining or circuit-open)."""


class Policy(Protocol):
    name: str

    def select(self, request: RoutingRequest, candidates: Sequence[Worker]) -> Decision:
        """Pick a worker among `candidates` (non-empty, all routable). Must not mutate anything."""
        ...

    def on_routed(self, request: RoutingRequest, worker: Worker) -> None:
        """The request was sent to `worker` (approximate indexes learn here)."""
        ...

    def on_worker_removed(self, url: str) -> None: ...

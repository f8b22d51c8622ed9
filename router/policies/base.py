"""The `Policy` protocol: every routing policy is one file behind it.

Selection only reads: a policy never reserves load or mutates queues (the proxy reserves on the
chosen worker and releases in `finally`). The optional hooks default to no-ops (`PolicyBase`).
Extended by the policies' author: `explain`, `PolicyContext`, `OverlapSource`, `PolicyBase`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from kvroute.cache_index.hashing import BlockHash
from kvroute.router.types import Decision, RoutingRequest, Worker, WorkerScore


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

    def explain(self, request: RoutingRequest, candidates: Sequence[Worker]) -> list[WorkerScore]:
        """Score every candidate as `select` would, best first, with no side effect at all (not even
        advancing a counter or an RNG): what `/admin/route/explain` shows."""
        ...


class OverlapSource(Protocol):
    """What says how many leading blocks of a prompt each worker holds (RadixIndex, InflightIndex)."""

    def match(self, block_hashes: Sequence[BlockHash]) -> Mapping[str, int]: ...


@runtime_checkable
class SharingSource(Protocol):
    """How many in-flight prompts on a worker share a block (InflightIndex): a prefix's live traffic."""

    def holding(self, url: str, block: BlockHash) -> int: ...

    def holding_before(self, url: str, block: BlockHash, depth: int, since: float) -> int:
        """Of those, the prompts added before `since` (`block` being their `depth`-th block)."""
        ...


@dataclass(frozen=True)
class PolicyContext:
    """The router's shared state a policy may read (never write): given to `make_policy`.

    `kv_index`: the event-fed index (kv_aware). `inflight`: prompts routed and not finished, per worker
    (kv_aware's prediction for blocks not yet confirmed by events). `block_counts`: blocks the index
    holds for a worker (how full its cache is: kv_aware's placement term). `clock`: seconds, monotonic.
    """

    kv_index: OverlapSource | None = None
    inflight: OverlapSource | None = None
    clock: Callable[[], float] = time.monotonic
    block_counts: Callable[[str], int] | None = None


class PolicyBase:
    """No-op hooks, so a policy file only writes what it uses."""

    name: str = ""
    # Reads RoutingRequest.block_hashes (directly or through the block load); False: no hashing.
    needs_blocks: bool = True

    def on_routed(self, request: RoutingRequest, worker: Worker) -> None:
        return None

    def on_worker_removed(self, url: str) -> None:
        return None

"""`cache_aware`: SGLang router's cache-aware policy, same parameters and rule, on our block hashes.

SGLang's rule (sglang-router 0.3.2): loads are requests in flight. If the fleet is imbalanced,
`max - min > balance_abs_threshold` and `max > balance_rel_threshold * min`, take the least loaded.
Else, if the best worker's matched fraction of the prompt exceeds `cache_threshold`, take the worker
with the deepest match (whatever its load); else the least loaded.

The index is approximate, learned from the router's own decisions (`on_routed` records the prompt's
blocks as held by the chosen worker), like SGLang's character tree, but over our block hashes: for
text-only requests those come from the text fallback, so the policy works the same either way.
Differences, documented: SGLang counts characters, we count blocks, so `max_tree_size` is in blocks per
worker (LRU beyond it, enforced at every insert); and entries not refreshed for `ttl_secs` expire
(SGLang keeps them until size pushes them out: `ttl_secs = 0`), lazily at match and by a sweep every
`eviction_interval_secs` (run from `on_routed`), which bounds memory for prompts never seen again.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvroute.cache_index.approx import ApproxIndex
from kvroute.router.policies.base import PolicyBase, PolicyContext
from kvroute.router.policies.common import config_from_params, decision_from_scores, in_flight, require
from kvroute.router.types import Decision, RoutingRequest, Worker, WorkerScore


@dataclass(frozen=True)
class CacheAwareConfig:
    cache_threshold: float = 0.3  # matched fraction of the prompt's blocks to follow the cache; > 1 disables
    balance_abs_threshold: int = 64  # imbalance needs max - min in-flight requests above this; huge disables
    balance_rel_threshold: float = 1.5  # ... and max above this times min
    eviction_interval_secs: float = 60.0  # period of the expiry sweep, seconds; 0: expire lazily only
    max_tree_size: int = 2**20  # blocks remembered per worker (LRU beyond); ~SGLang's 2**26 characters
    ttl_secs: float = 600.0  # a routed prompt is assumed cached this long after its last use; 0: forever

    def __post_init__(self) -> None:
        require(self.cache_threshold >= 0, "cache_aware", "cache_threshold must be >= 0")
        require(self.balance_abs_threshold >= 0, "cache_aware", "balance_abs_threshold must be >= 0")
        require(self.balance_rel_threshold >= 1, "cache_aware", "balance_rel_threshold must be >= 1")
        require(self.eviction_interval_secs >= 0, "cache_aware", "eviction_interval_secs must be >= 0")
        require(self.max_tree_size >= 1, "cache_aware", "max_tree_size must be >= 1")
        require(self.ttl_secs >= 0, "cache_aware", "ttl_secs must be >= 0")


class CacheAwarePolicy(PolicyBase):
    """Mutable state: its approximate index, written by `on_routed` and `on_worker_removed` (and
    expired lazily by `match`, which only drops what could no longer match anyway).

    Scores: in cache mode the cost is the prompt blocks a worker lacks (then load breaks ties); in
    balance mode (imbalanced fleet, or too little matched) the cost is its requests in flight.
    """

    name = "cache_aware"

    def __init__(self, config: CacheAwareConfig, context: PolicyContext | None = None) -> None:
        self.config = config
        self._clock = context.clock if context is not None else time.monotonic
        self.index = ApproxIndex(
            ttl=config.ttl_secs or None, capacity=config.max_tree_size, clock=self._clock
        )
        self._next_sweep = self._clock() + config.eviction_interval_secs

    def explain(self, request: RoutingRequest, candidates: Sequence[Worker]) -> list[WorkerScore]:
        c = self.config
        loads = {w.url: in_flight(w) for w in candidates}
        lo, hi = min(loads.values()), max(loads.values())
        imbalanced = hi - lo > c.balance_abs_threshold and hi > c.balance_rel_threshold * lo
        hashes = request.block_hashes
        matched = self.index.match(hashes) if hashes else {}
        n = len(hashes)
        best = max((matched.get(u, 0) for u in loads), default=0)
        cache_mode = not imbalanced and n > 0 and best / n > c.cache_threshold
        order = {w.url: i for i, w in enumerate(candidates)}
        scores = []
        for w in candidates:
            m = matched.get(w.url, 0)
            load = loads[w.url]
            # cache mode: fewest missing blocks, ties by load; balance mode: load, ties by match.
            cost = (n - m) + load * 1e-6 if cache_mode else load + (n - m) * 1e-9
            terms = {
                "matched_blocks": float(m),
                "prompt_blocks": float(n),
                "in_flight": float(load),
                "cache_mode": 1.0 if cache_mode else 0.0,
                "imbalanced": 1.0 if imbalanced else 0.0,
            }
            scores.append(WorkerScore(url=w.url, cost=cost, cached_blocks=m, terms=terms))
        return sorted(scores, key=lambda s: (s.cost, order[s.url]))

    def select(self, request: RoutingRequest, candidates: Sequence[Worker]) -> Decision:
        scores = self.explain(request, candidates)
        t = scores[0].terms
        if t["imbalanced"]:
            reason = "imbalanced: least loaded"
        elif t["cache_mode"]:
            reason = f"cache hit {int(t['matched_blocks'])}/{int(t['prompt_blocks'])} blocks"
        else:
            reason = "low match: least loaded"
        return decision_from_scores(self.name, scores, reason)

    def on_routed(self, request: RoutingRequest, worker: Worker) -> None:
        if request.block_hashes:
            self.index.record(worker.url, request.block_hashes)
        interval = self.config.eviction_interval_secs
        if interval > 0 and self.config.ttl_secs > 0:
            now = self._clock()
            if now >= self._next_sweep:
                self.index.expire(now)
                self._next_sweep = now + interval

    def on_worker_removed(self, url: str) -> None:
        self.index.remove_worker(url)


def make(params: Mapping[str, Any] | None, context: PolicyContext | None = None) -> CacheAwarePolicy:
    return CacheAwarePolicy(config_from_params(CacheAwareConfig, params, "cache_aware"), context)

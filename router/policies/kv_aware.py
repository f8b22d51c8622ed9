"""`kv_aware`: route to the worker where the request costs least, knowing what each worker has cached.

The cost, in KV blocks (finite, lower is better), for worker w and a prompt of P blocks:

    cost(w) = prefill_cost(w) + decode_weight * decode_load(w)   (+ guard_penalty if w is hot)
    prefill_cost(w) = (P - overlap(w)) + pending_prefill_blocks(w)
    decode_load(w)  = active_blocks(w)   [x mean_capacity / capacity(w) when normalize_by_capacity]

- overlap(w): leading prompt blocks w holds = max(event-fed index match, in-flight match). The in-flight
  match counts the prompts routed to w and not finished as held there: in a burst of requests sharing a
  prefix nothing has been prefilled yet, so the event index is empty, but followers queued behind the
  first one will hit its blocks (and a running request's blocks cannot be evicted in SGLang). Off with
  `predict_inflight=False`.
- pending_prefill_blocks(w): uncached prompt tokens routed to w with no first token yet / block_size.
- active_blocks(w): KV blocks of w's running requests (router count, floored by the engine's usage).
- Hot-spot guard: w is hot when its load (pending prefill + active blocks) exceeds
  `guard_factor * fleet_mean + guard_margin_blocks`, or its requests in flight exceed
  `guard_factor * fleet_mean + guard_margin_requests`. Hot workers are ranked after every cool one
  (cost + guard_penalty, the penalty lifting the cheapest hot worker just above the dearest cool one),
  so they are only retried last. The requests test matters for bursts of shared-prefix requests: their uncached work is ~0, so
  only their count shows the pile-up. `guard_factor = 0` disables the guard.
- temperature T: 0 picks the argmin (ties: more cached blocks, then candidate order). T > 0 samples a
  cool worker with probability softmax(-cost / T) (T in blocks), from a seeded RNG when `seed` is set.
"""

from __future__ import annotations

import math
import random as _random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from router.policies.base import OverlapSource, PolicyBase, PolicyContext
from router.policies.common import (
    active_blocks,
    block_load,
    capacity_blocks,
    config_from_params,
    decision_from_scores,
    in_flight,
    pending_prefill_blocks,
    require,
    sort_scores,
)
from router.types import Decision, RoutingRequest, Worker, WorkerScore


@dataclass(frozen=True)
class KvAwareConfig:
    decode_weight: float = 1.0  # cost of one active KV block relative to one block of prefill; 0: ignore decode
    normalize_by_capacity: bool = False  # scale decode load by mean KV capacity / worker's (mixed GPUs)
    guard_factor: float = 1.5  # hot if load > factor * fleet mean + margin; 0 disables the guard
    guard_margin_blocks: float = 256.0  # absolute slack of the block-load test, in blocks
    guard_margin_requests: float = 8.0  # absolute slack of the requests-in-flight test, in requests
    temperature: float = 0.0  # softmax temperature in blocks; 0: deterministic argmin
    seed: int | None = None  # RNG seed for temperature > 0 (tests); None: seeded from the OS
    predict_inflight: bool = True  # count in-flight prompts as held by their worker (bursts)

    def __post_init__(self) -> None:
        for name in ("decode_weight", "guard_factor", "guard_margin_blocks", "guard_margin_requests", "temperature"):
            v = getattr(self, name)
            require(math.isfinite(v) and v >= 0, "kv_aware", f"{name} must be finite and >= 0, got {v}")


class KvAwarePolicy(PolicyBase):
    """Scores on the event-fed RadixIndex (+ in-flight prompts); see the module docstring for the cost.

    Mutable state: the sampling RNG only, advanced by `select` when temperature > 0.
    """

    name = "kv_aware"

    def __init__(self, config: KvAwareConfig, kv_index: OverlapSource, inflight: OverlapSource | None) -> None:
        self.config = config
        self._index = kv_index
        self._inflight = inflight if config.predict_inflight else None
        self._rng = _random.Random(config.seed)

    def _hot(self, candidates: Sequence[Worker], bs: int) -> set[str]:
        c = self.config
        if c.guard_factor == 0 or len(candidates) < 2:
            return set()
        loads = {w.url: block_load(w, bs) for w in candidates}
        reqs = {w.url: float(in_flight(w)) for w in candidates}
        lim_b = c.guard_factor * sum(loads.values()) / len(loads) + c.guard_margin_blocks
        lim_r = c.guard_factor * sum(reqs.values()) / len(reqs) + c.guard_margin_requests
        return {u for u in loads if loads[u] > lim_b or reqs[u] > lim_r}

    def explain(self, request: RoutingRequest, candidates: Sequence[Worker]) -> list[WorkerScore]:
        c = self.config
        bs = request.block_size
        hashes = request.block_hashes
        indexed = self._index.match(hashes) if hashes else {}
        inflight = self._inflight.match(hashes) if (hashes and self._inflight is not None) else {}
        prompt_blocks = request.prompt_tokens / bs
        caps = [cap for w in candidates if (cap := capacity_blocks(w, bs))]
        mean_cap = sum(caps) / len(caps) if caps else None
        hot = self._hot(candidates, bs)
        raw: list[tuple[Worker, float, dict[str, float], int]] = []
        for w in candidates:
            overlap = max(indexed.get(w.url, 0), inflight.get(w.url, 0))
            new_prefill = max(0.0, prompt_blocks - overlap)
            pending = pending_prefill_blocks(w, bs)
            decode = active_blocks(w, bs)
            cap = capacity_blocks(w, bs)
            if c.normalize_by_capacity and cap and mean_cap:
                decode *= mean_cap / cap
            cost = new_prefill + pending + c.decode_weight * decode
            terms = {
                "prompt_blocks": prompt_blocks,
                "indexed_blocks": float(indexed.get(w.url, 0)),
                "inflight_blocks": float(inflight.get(w.url, 0)),
                "new_prefill_blocks": new_prefill,
                "pending_prefill_blocks": pending,
                "decode_load": decode,
                "in_flight": float(in_flight(w)),
                "hot": 1.0 if w.url in hot else 0.0,
            }
            raw.append((w, cost, terms, overlap))
        cool_costs = [cost for w, cost, _, _ in raw if w.url not in hot]
        hot_costs = [cost for w, cost, _, _ in raw if w.url in hot]
        # Lifts the cheapest hot worker just above the dearest cool one: hot ones rank last, in cost order.
        penalty = max(0.0, max(cool_costs) - min(hot_costs)) + 1.0 if hot_costs and cool_costs else 0.0
        scores = []
        for w, cost, terms, overlap in raw:
            if w.url in hot:
                terms["guard_penalty"] = penalty
                cost += penalty
            scores.append(WorkerScore(url=w.url, cost=cost, cached_blocks=overlap, terms=terms))
        return sort_scores(scores, {w.url: i for i, w in enumerate(candidates)})

    def select(self, request: RoutingRequest, candidates: Sequence[Worker]) -> Decision:
        scores = self.explain(request, candidates)
        best = scores[0]
        hot = sum(1 for s in scores if s.terms["hot"])
        reason = f"min cost {best.cost:.1f} (cached {best.cached_blocks} blocks)" + (f", {hot} hot" if hot else "")
        T = self.config.temperature
        cool = [s for s in scores if not s.terms["hot"]]
        if T > 0 and len(cool) > 1:
            lo = cool[0].cost
            weights = [math.exp(-(s.cost - lo) / T) for s in cool]
            pick = self._rng.choices(cool, weights=weights)[0]
            reason = f"softmax T={T:g}: cost {pick.cost:.1f} (cached {pick.cached_blocks} blocks)"
            return decision_from_scores(self.name, scores, reason, chosen=pick.url)
        return decision_from_scores(self.name, scores, reason)


def make(params: Mapping[str, Any] | None, context: PolicyContext | None = None) -> KvAwarePolicy:
    config = config_from_params(KvAwareConfig, params, "kv_aware")
    if context is None or context.kv_index is None:
        raise ValueError("policy 'kv_aware' needs the router's KV index (make_policy(..., context=...))")
    return KvAwarePolicy(config, context.kv_index, context.inflight)

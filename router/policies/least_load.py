"""`least_load`: the worker with the least work, in requests or in KV blocks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from kvroute.router.policies.base import PolicyBase
from kvroute.router.policies.common import (
    block_load,
    config_from_params,
    decision_from_scores,
    in_flight,
    require,
    sort_scores,
)
from kvroute.router.types import Decision, RoutingRequest, Worker, WorkerScore


@dataclass(frozen=True)
class LeastLoadConfig:
    # "blocks": pending prefill + active KV blocks (sees long contexts); "requests": requests in flight
    # (what SGLang's router counts). Ties go to fewer requests in flight, then candidate order.
    metric: Literal["blocks", "requests"] = "blocks"

    def __post_init__(self) -> None:
        require(self.metric in ("blocks", "requests"), "least_load", "metric must be 'blocks' or 'requests'")


def load_scores(
    request: RoutingRequest, candidates: Sequence[Worker], metric: str = "blocks"
) -> list[WorkerScore]:
    """Best first. Shared with the policies that fall back to least load."""
    bs = request.block_size
    scores = []
    for w in candidates:
        blocks = block_load(w, bs)
        requests = float(in_flight(w))
        # The secondary key is folded in at a scale that cannot reorder the primary one.
        cost = blocks + requests * 1e-6 if metric == "blocks" else requests + blocks * 1e-9
        scores.append(WorkerScore(url=w.url, cost=cost, terms={"load_blocks": blocks, "in_flight": requests}))
    return sort_scores(scores, {w.url: i for i, w in enumerate(candidates)})


class LeastLoadPolicy(PolicyBase):
    name = "least_load"

    def __init__(self, config: LeastLoadConfig) -> None:
        self.config = config
        self.needs_blocks = config.metric == "blocks"  # block load counts the uncached prefill only

    def select(self, request: RoutingRequest, candidates: Sequence[Worker]) -> Decision:
        return decision_from_scores(
            self.name, self.explain(request, candidates), f"least {self.config.metric}"
        )

    def explain(self, request: RoutingRequest, candidates: Sequence[Worker]) -> list[WorkerScore]:
        return load_scores(request, candidates, self.config.metric)


def make(params: Mapping[str, Any] | None, context: object = None) -> LeastLoadPolicy:
    return LeastLoadPolicy(config_from_params(LeastLoadConfig, params, "least_load"))

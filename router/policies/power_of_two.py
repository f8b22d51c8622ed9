"""`power_of_two`: sample two workers at random, take the less loaded (near least-load balance at O(1))."""

from __future__ import annotations

import random as _random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from kvroute.router.policies.base import PolicyBase
from kvroute.router.policies.common import config_from_params, decision_from_scores, require
from kvroute.router.policies.least_load import load_scores
from kvroute.router.types import Decision, RoutingRequest, Worker, WorkerScore


@dataclass(frozen=True)
class PowerOfTwoConfig:
    metric: Literal["blocks", "requests"] = "blocks"  # load measure, as in least_load
    seed: int | None = None  # RNG seed, for reproducible tests; None: seeded from the OS

    def __post_init__(self) -> None:
        require(
            self.metric in ("blocks", "requests"), "power_of_two", "metric must be 'blocks' or 'requests'"
        )


class PowerOfTwoPolicy(PolicyBase):
    """Two distinct random candidates; the less loaded wins, the other is second, the rest follow by load.

    Why not plain least-load: with stale load readings (several router replicas, slow polls) every
    replica herds onto the same least-loaded worker; two random choices avoid that herd.
    Mutable state: the RNG only (advanced by `select`, never by `explain`).
    """

    name = "power_of_two"

    def __init__(self, config: PowerOfTwoConfig) -> None:
        self.config = config
        self.needs_blocks = config.metric == "blocks"  # block load counts the uncached prefill only
        self._rng = _random.Random(config.seed)

    def select(self, request: RoutingRequest, candidates: Sequence[Worker]) -> Decision:
        scores = load_scores(request, candidates, self.config.metric)
        if len(candidates) <= 2:
            return decision_from_scores(self.name, scores, "less loaded of the only candidates")
        picked = {candidates[i].url for i in self._rng.sample(range(len(candidates)), 2)}
        # load_scores is best first: the sampled pair keeps its relative order, then everyone else.
        ordered = [s for s in scores if s.url in picked] + [s for s in scores if s.url not in picked]
        return decision_from_scores(self.name, ordered, "less loaded of two sampled")

    def explain(self, request: RoutingRequest, candidates: Sequence[Worker]) -> list[WorkerScore]:
        return load_scores(request, candidates, self.config.metric)


def make(params: Mapping[str, Any] | None, context: object = None) -> PowerOfTwoPolicy:
    return PowerOfTwoPolicy(config_from_params(PowerOfTwoConfig, params, "power_of_two"))

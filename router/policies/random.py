"""`random`: a uniformly random worker; the baseline every other policy must beat."""

from __future__ import annotations

import random as _random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvroute.router.policies.base import PolicyBase
from kvroute.router.policies.common import config_from_params, decision_from_scores
from kvroute.router.types import Decision, RoutingRequest, Worker, WorkerScore


@dataclass(frozen=True)
class RandomConfig:
    seed: int | None = None  # RNG seed, for reproducible tests; None: seeded from the OS


class RandomPolicy(PolicyBase):
    """Picks uniformly; `ranked` is the rest in random order (retries go to another random worker).

    Mutable state: the RNG only (advanced by `select`, never by `explain`).
    """

    name = "random"
    needs_blocks = False  # never reads the prompt

    def __init__(self, config: RandomConfig) -> None:
        self.config = config
        self._rng = _random.Random(config.seed)

    def select(self, request: RoutingRequest, candidates: Sequence[Worker]) -> Decision:
        order = list(candidates)
        self._rng.shuffle(order)
        scores = [WorkerScore(url=w.url, cost=float(i)) for i, w in enumerate(order)]
        return decision_from_scores(self.name, scores, "uniform random")

    def explain(self, request: RoutingRequest, candidates: Sequence[Worker]) -> list[WorkerScore]:
        return [WorkerScore(url=w.url, cost=0.0) for w in candidates]  # every worker equally likely


def make(params: Mapping[str, Any] | None, context: object = None) -> RandomPolicy:
    return RandomPolicy(config_from_params(RandomConfig, params, "random"))

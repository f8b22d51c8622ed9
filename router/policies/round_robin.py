"""`round_robin`: each request to the next worker in turn (by url order, so stable across changes)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvroute.router.policies.base import PolicyBase
from kvroute.router.policies.common import config_from_params, decision_from_scores
from kvroute.router.types import Decision, RoutingRequest, Worker, WorkerScore


@dataclass(frozen=True)
class RoundRobinConfig:
    """No parameters; present so every policy is configured the same way."""


class RoundRobinPolicy(PolicyBase):
    """Worker `counter % n` of the candidates sorted by url; `ranked` continues around the circle.

    Mutable state: `_counter`, the one thing `select` may change (+1 per call; `explain` reads it).
    Sorting by url makes the rotation independent of the order the caller lists candidates in.
    """

    name = "round_robin"
    needs_blocks = False  # never reads the prompt

    def __init__(self, config: RoundRobinConfig) -> None:
        self.config = config
        self._counter = 0

    def _scores(self, candidates: Sequence[Worker]) -> list[WorkerScore]:
        urls = sorted(w.url for w in candidates)
        n = len(urls)
        start = self._counter % n
        return [WorkerScore(url=urls[(start + i) % n], cost=float(i)) for i in range(n)]

    def select(self, request: RoutingRequest, candidates: Sequence[Worker]) -> Decision:
        scores = self._scores(candidates)
        self._counter += 1
        return decision_from_scores(self.name, scores, "next in turn")

    def explain(self, request: RoutingRequest, candidates: Sequence[Worker]) -> list[WorkerScore]:
        return self._scores(candidates)


def make(params: Mapping[str, Any] | None, context: object = None) -> RoundRobinPolicy:
    return RoundRobinPolicy(config_from_params(RoundRobinConfig, params, "round_robin"))

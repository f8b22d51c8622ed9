"""`consistent_hash`: session affinity (same `session_key`, same worker) on a hash ring with virtual nodes."""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import xxhash

from kvroute.router.policies.base import PolicyBase
from kvroute.router.policies.common import config_from_params, decision_from_scores, require
from kvroute.router.policies.least_load import load_scores
from kvroute.router.types import Decision, RoutingRequest, Worker, WorkerScore


@dataclass(frozen=True)
class ConsistentHashConfig:
    virtual_nodes: int = 160  # points per worker on the ring (more: smoother spread, bigger ring); >= 1
    fallback_metric: Literal["blocks", "requests"] = (
        "blocks"  # least_load metric for requests without a session key
    )

    def __post_init__(self) -> None:
        require(self.virtual_nodes >= 1, "consistent_hash", "virtual_nodes must be >= 1")
        require(
            self.fallback_metric in ("blocks", "requests"),
            "consistent_hash",
            "fallback_metric must be 'blocks' or 'requests'",
        )


def _h(s: str) -> int:
    return xxhash.xxh3_64_intdigest(s.encode())


class ConsistentHashPolicy(PolicyBase):
    """The session key's point on the ring; the owner is the first worker clockwise, and `ranked` goes on
    clockwise (distinct workers), so a worker's removal only moves its own sessions, to their next owner.

    Without a key it falls back to least load. The ring is memoised per candidate set (a cache of
    derived data, not behaviour: the same inputs always give the same decision).
    """

    name = "consistent_hash"
    _MEMO = 8  # candidate sets whose rings are kept (health changes make a few distinct sets)

    def __init__(self, config: ConsistentHashConfig) -> None:
        self.config = config
        self.needs_blocks = config.fallback_metric == "blocks"  # block load counts the uncached prefill only
        self._rings: dict[tuple[str, ...], tuple[list[int], list[str]]] = {}

    def _ring(self, urls: tuple[str, ...]) -> tuple[list[int], list[str]]:
        ring = self._rings.get(urls)
        if ring is None:
            points = sorted((_h(f"{u}#{i}"), u) for u in urls for i in range(self.config.virtual_nodes))
            ring = ([p for p, _ in points], [u for _, u in points])
            if len(self._rings) >= self._MEMO:
                self._rings.pop(next(iter(self._rings)))
            self._rings[urls] = ring
        return ring

    def explain(self, request: RoutingRequest, candidates: Sequence[Worker]) -> list[WorkerScore]:
        if request.session_key is None:
            return load_scores(request, candidates, self.config.fallback_metric)
        urls = tuple(sorted({w.url for w in candidates}))
        points, owners = self._ring(urls)
        start = bisect.bisect_right(points, _h(request.session_key))
        walk: list[str] = []
        seen: set[str] = set()
        for i in range(len(points)):
            u = owners[(start + i) % len(points)]
            if u not in seen:
                seen.add(u)
                walk.append(u)
                if len(walk) == len(urls):
                    break
        return [
            WorkerScore(url=u, cost=float(i), terms={"ring_distance": float(i)}) for i, u in enumerate(walk)
        ]

    def select(self, request: RoutingRequest, candidates: Sequence[Worker]) -> Decision:
        scores = self.explain(request, candidates)
        reason = (
            "session owner on the ring" if request.session_key is not None else "no session key: least load"
        )
        return decision_from_scores(self.name, scores, reason)

    def on_worker_removed(self, url: str) -> None:
        self._rings = {k: v for k, v in self._rings.items() if url not in k}


def make(params: Mapping[str, Any] | None, context: object = None) -> ConsistentHashPolicy:
    return ConsistentHashPolicy(config_from_params(ConsistentHashConfig, params, "consistent_hash"))

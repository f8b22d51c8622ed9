"""The policy table: every routing policy by name, and the one factory building them from a params dict."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kvroute.router.policies import (
    cache_aware,
    consistent_hash,
    kv_aware,
    least_load,
    power_of_two,
    random,
    round_robin,
)
from kvroute.router.policies.base import NoWorkerAvailable, Policy, PolicyBase, PolicyContext

__all__ = [
    "POLICIES",
    "NoWorkerAvailable",
    "Policy",
    "PolicyBase",
    "PolicyContext",
    "PolicySpec",
    "make_policy",
]


@dataclass(frozen=True)
class PolicySpec:
    make: Callable[[Mapping[str, Any] | None, PolicyContext | None], Policy]
    config: type  # the frozen config dataclass; its fields are the accepted params
    summary: str


POLICIES: Mapping[str, PolicySpec] = {
    "random": PolicySpec(random.make, random.RandomConfig, "uniformly random worker"),
    "round_robin": PolicySpec(round_robin.make, round_robin.RoundRobinConfig, "each worker in turn"),
    "least_load": PolicySpec(least_load.make, least_load.LeastLoadConfig, "least pending + active KV blocks"),
    "power_of_two": PolicySpec(
        power_of_two.make, power_of_two.PowerOfTwoConfig, "less loaded of two random workers"
    ),
    "consistent_hash": PolicySpec(
        consistent_hash.make, consistent_hash.ConsistentHashConfig, "session affinity on a hash ring"
    ),
    "cache_aware": PolicySpec(
        cache_aware.make, cache_aware.CacheAwareConfig, "SGLang-router compatible, approximate index"
    ),
    "kv_aware": PolicySpec(kv_aware.make, kv_aware.KvAwareConfig, "least cost on the KV-event-fed index"),
}


def make_policy(
    name: str, params: Mapping[str, Any] | None = None, context: PolicyContext | None = None
) -> Policy:
    """Build policy `name` from `params`; ValueError on an unknown name or unknown/ill-typed params.

    `context` carries the router's shared indexes (kv_aware needs its `kv_index`).
    """
    spec = POLICIES.get(name)
    if spec is None:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
    return spec.make(params, context)

"""cache_aware: SGLang router's rule (balance thresholds, then cache threshold) on the learned index."""

from __future__ import annotations

import pytest

from kvroute.router.policies import PolicyContext, make_policy
from tests.router.policies.util import request, worker


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def trained(learned_blocks: int, **params: object):  # noqa: ANN201
    """A policy that routed a prompt sharing the first `learned_blocks` blocks of `request(10)` to w1."""
    clock = Clock()
    p = make_policy("cache_aware", dict(params), PolicyContext(clock=clock))
    if learned_blocks:
        p.on_routed(request(learned_blocks), worker("w1"))
    return p, clock


@pytest.mark.parametrize(
    ("learned", "in_flight", "params", "expected", "why"),
    [
        (10, [0, 5, 0], {}, "w1", "cache"),  # 10/10 matched > 0.3, balanced (5 - 0 <= 64): w1 despite load
        (10, [0, 100, 10], {}, "w0", "imbalanced"),  # 100 - 0 > 64 and 100 > 1.5 * 0: least loaded
        (10, [200, 270, 250], {}, "w1", "cache"),  # 70 > 64 but 270 <= 1.5 * 200: still balanced
        (10, [100, 170, 120], {}, "w0", "imbalanced"),  # 70 > 64 and 170 > 150: least loaded
        (2, [2, 1, 0], {}, "w2", "low match"),  # 2/10 = 0.2 <= 0.3: least loaded, w2
        (4, [2, 1, 0], {}, "w1", "cache"),  # 4/10 = 0.4 > 0.3: the worker with the match
        (10, [3, 1, 2], {"cache_threshold": 1.5}, "w1", "low match"),  # threshold > 1: never cache mode
        (0, [3, 2, 1], {}, "w2", "low match"),  # nothing learned: least loaded
        (10, [0, 65, 0], {"balance_abs_threshold": 100}, "w1", "cache"),  # 65 <= 100: balanced
    ],
)
def test_sglang_rule(
    learned: int, in_flight: list[int], params: dict[str, object], expected: str, why: str
) -> None:
    p, _ = trained(learned, **params)
    ws = [worker(f"w{i}", n) for i, n in enumerate(in_flight)]
    d = p.select(request(10), ws)
    assert d.worker == expected
    assert why in d.reason
    assert sorted(d.ranked) == ["w0", "w1", "w2"]  # every candidate, once


def test_threshold_boundary_is_strict() -> None:
    p, _ = trained(3)
    d = p.select(request(10), [worker("w0", 0), worker("w1", 1), worker("w2", 1)])
    assert d.worker == "w0" and "low match" in d.reason  # 0.3 is not > 0.3: least loaded w0


def test_learns_only_in_on_routed_and_select_is_pure() -> None:
    p, _ = trained(0)
    ws = [worker("w0"), worker("w1"), worker("w2")]
    for _ in range(3):
        assert p.select(request(10, prefix=7), ws).worker == "w0"  # select learns nothing
    p.on_routed(request(10, prefix=7), ws[2])
    d = p.select(request(10, prefix=7), ws)
    assert d.worker == "w2" and d.cached_blocks == 10


def test_text_fallback_hashes_work_the_same() -> None:
    from kvroute.cache_index.hashing import hash_text_blocks
    from kvroute.router.types import RoutingRequest

    def text_req(text: str) -> RoutingRequest:
        return RoutingRequest(
            block_hashes=tuple(hash_text_blocks(text, 64)), prompt_tokens=len(text), block_size=16
        )

    p, _ = trained(0)
    ws = [worker("w0"), worker("w1")]
    system = "You are a helpful assistant. " * 20
    p.on_routed(text_req(system + "first question"), ws[1])
    assert p.select(text_req(system + "another question"), ws).worker == "w1"  # shared system prompt


def test_entries_expire_after_ttl_and_the_sweep_bounds_memory() -> None:
    p, clock = trained(10, ttl_secs=30.0, eviction_interval_secs=10.0)
    ws = [worker("w0"), worker("w1")]
    clock.t += 29
    assert p.select(request(10), ws).worker == "w1"  # 29 s old: still believed cached
    clock.t += 2
    assert p.select(request(10), ws).worker == "w0"  # 31 s: expired, least loaded
    p.on_routed(request(5, prefix=3), ws[0])  # w0 learns another prompt; sweep runs (interval passed)
    assert p.index.block_count("w1") == 0  # type: ignore[attr-defined]
    assert p.index.block_count("w0") == 5  # type: ignore[attr-defined]


def test_max_tree_size_keeps_the_most_recent_blocks_per_worker() -> None:
    p, clock = trained(0, max_tree_size=10)
    w1 = worker("w1")
    p.on_routed(request(10, prefix=1), w1)
    clock.t += 1
    p.on_routed(request(10, prefix=2), w1)  # pushes prefix 1 out
    ws = [worker("w0"), w1]
    assert p.select(request(10, prefix=2), ws).worker == "w1"
    assert p.select(request(10, prefix=1), ws).worker == "w0"
    assert p.index.block_count("w1") <= 10  # type: ignore[attr-defined]


def test_removed_worker_is_forgotten() -> None:
    p, _ = trained(10)
    p.on_worker_removed("w1")
    d = p.select(request(10), [worker("w0", 1), worker("w1", 0)])
    assert d.cached_blocks == 0 and "low match" in d.reason  # re-added w1 starts with nothing

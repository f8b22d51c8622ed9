"""Tables for the load-only policies: random, round_robin, least_load, power_of_two."""

from __future__ import annotations

from collections import Counter

import pytest

from kvroute.router.policies import make_policy
from kvroute.router.types import Worker
from tests.router.policies.util import BS, request, worker


def fleet(*loads: tuple[int, int, int]) -> list[Worker]:
    """Workers w0, w1, ... with (in_flight, pending prefill tokens, active blocks)."""
    return [worker(f"w{i}", *load) for i, load in enumerate(loads)]


@pytest.mark.parametrize(
    ("metric", "loads", "expected"),
    [
        ("blocks", [(0, 0, 0), (0, 0, 0)], ["w0", "w1"]),  # tie: candidate order
        ("blocks", [(1, 0, 10), (5, 0, 2)], ["w1", "w0"]),  # 2 active blocks < 10, despite 5 requests
        ("blocks", [(0, 8 * BS, 0), (0, 0, 5)], ["w1", "w0"]),  # 8 pending prefill blocks > 5 active
        ("blocks", [(3, 0, 4), (1, 0, 4)], ["w1", "w0"]),  # equal blocks: fewer requests first
        ("requests", [(1, 0, 10), (5, 0, 2)], ["w0", "w1"]),  # SGLang's measure: 1 request < 5
        ("requests", [(2, 0, 9), (2, 0, 3)], ["w1", "w0"]),  # equal requests: fewer blocks first
        ("blocks", [(0, 0, 3), (0, 0, 1), (0, 0, 2)], ["w1", "w2", "w0"]),  # ranked is full, ascending
    ],
)
def test_least_load(metric: str, loads: list[tuple[int, int, int]], expected: list[str]) -> None:
    d = make_policy("least_load", {"metric": metric}).select(request(4), fleet(*loads))
    assert list(d.ranked) == expected
    assert d.worker == expected[0]
    assert [s.url for s in d.scores] == expected  # scores follow the ranking


def test_least_load_uses_engine_poll_as_floor() -> None:
    ws = [worker("w0", 1, 0, 0, engine_running=30, engine_queued=5), worker("w1", 2)]
    d = make_policy("least_load", {"metric": "requests"}).select(request(1), ws)
    assert d.worker == "w1"  # w0's engine reports 35 requests (other routers' traffic) > 2


def test_round_robin_cycles_in_url_order_whatever_the_candidate_order() -> None:
    p = make_policy("round_robin", {})
    ws = fleet((0, 0, 0), (0, 0, 0), (0, 0, 0))
    picks = [p.select(request(1), list(reversed(ws)) if i % 2 else ws).worker for i in range(6)]
    assert picks == ["w0", "w1", "w2", "w0", "w1", "w2"]  # candidate order does not matter


def test_round_robin_ranked_continues_the_circle_and_explain_does_not_advance() -> None:
    p = make_policy("round_robin", {})
    ws = fleet((0, 0, 0), (0, 0, 0), (0, 0, 0))
    p.select(request(1), ws)  # counter 0 -> 1
    assert [s.url for s in p.explain(request(1), ws)] == ["w1", "w2", "w0"]
    assert [s.url for s in p.explain(request(1), ws)] == ["w1", "w2", "w0"]  # explain is pure
    assert p.select(request(1), ws).ranked == ("w1", "w2", "w0")


def test_random_seeded_is_reproducible_and_ranked_is_a_permutation() -> None:
    ws = fleet(*[(0, 0, 0)] * 5)
    a = [make_policy("random", {"seed": 3}).select(request(1), ws).ranked for _ in range(1)]
    p1, p2 = make_policy("random", {"seed": 3}), make_policy("random", {"seed": 3})
    seq1 = [p1.select(request(1), ws).ranked for _ in range(20)]
    seq2 = [p2.select(request(1), ws).ranked for _ in range(20)]
    assert seq1 == seq2  # same seed, same sequence
    assert a[0] == seq1[0]
    assert all(sorted(r) == [w.url for w in ws] for r in seq1)  # every candidate once
    firsts = Counter(r[0] for r in seq1)
    assert len(firsts) >= 3  # 20 draws over 5 workers do not all land on one or two


def test_power_of_two_takes_the_less_loaded_of_the_sampled_pair() -> None:
    ws = fleet((0, 0, 40), (0, 0, 10), (0, 0, 30), (0, 0, 20))
    p = make_policy("power_of_two", {"seed": 11})
    loads = {w.url: w.load.active_blocks for w in ws}
    for _ in range(50):
        d = p.select(request(1), ws)
        first, second = d.ranked[0], d.ranked[1]
        assert loads[first] <= loads[second]  # the sampled pair, less loaded first
        rest = [loads[u] for u in d.ranked[2:]]
        assert rest == sorted(rest)  # the others by load
    assert p.select(request(1), ws[:2]).worker == "w1"  # two candidates: simply the less loaded


def test_power_of_two_never_picks_the_most_loaded() -> None:
    ws = fleet((0, 0, 40), (0, 0, 10), (0, 0, 30))
    p = make_policy("power_of_two", {"seed": 5})
    picks = Counter(p.select(request(1), ws).worker for _ in range(60))
    assert picks["w0"] == 0  # w0 loses against whichever worker it is paired with
    assert picks["w1"] > picks["w2"]  # w1 wins both of its pairings, w2 only one

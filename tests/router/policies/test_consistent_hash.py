"""consistent_hash: a session keeps its worker; removing a worker moves only its own sessions."""

from __future__ import annotations

import pytest

from kvroute.router.policies import make_policy
from tests.router.policies.util import request, worker

URLS = [f"http://w{i}:30000" for i in range(5)]


def test_same_session_same_worker_and_spread_over_sessions() -> None:
    p = make_policy("consistent_hash", {})
    ws = [worker(u) for u in URLS]
    owners = {f"user-{i}": p.select(request(1, session=f"user-{i}"), ws).worker for i in range(200)}
    again = {s: p.select(request(3, prefix=9, session=s), ws).worker for s in owners}
    assert again == owners  # affinity ignores the prompt and the candidate order
    shuffled = {s: p.select(request(1, session=s), ws[::-1]).worker for s in owners}
    assert shuffled == owners
    counts = {u: list(owners.values()).count(u) for u in URLS}
    assert min(counts.values()) >= 20  # 200 sessions over 5 workers with 160 vnodes: no starved worker


def test_removal_moves_only_the_removed_workers_sessions_to_their_next_in_ranked() -> None:
    p = make_policy("consistent_hash", {})
    ws = [worker(u) for u in URLS]
    before = {f"s{i}": p.select(request(1, session=f"s{i}"), ws) for i in range(300)}
    p.on_worker_removed(URLS[2])
    rest = [w for w in ws if w.url != URLS[2]]
    for s, d in before.items():
        after = p.select(request(1, session=s), rest).worker
        if d.worker != URLS[2]:
            assert after == d.worker  # untouched sessions stay
        else:
            assert after == d.ranked[1]  # moved to the next worker clockwise, as ranked predicted


@pytest.mark.parametrize(
    ("loads", "expected"),
    [
        ([0, 5, 2], "http://w0:30000"),  # no session key: least load
        ([3, 1, 2], "http://w1:30000"),
    ],
)
def test_no_session_key_falls_back_to_least_load(loads: list[int], expected: str) -> None:
    ws = [worker(u, active=a) for u, a in zip(URLS, loads, strict=False)]
    d = make_policy("consistent_hash", {}).select(request(1), ws)
    assert d.worker == expected
    assert "least load" in d.reason


def test_ranked_lists_every_candidate_once() -> None:
    ws = [worker(u) for u in URLS]
    d = make_policy("consistent_hash", {"virtual_nodes": 1}).select(request(1, session="x"), ws)
    assert sorted(d.ranked) == sorted(URLS)  # even with one point per worker

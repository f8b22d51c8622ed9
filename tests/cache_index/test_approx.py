"""ApproxIndex: TTL and capacity with an injected clock (no sleeps), and a property test vs a model."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvroute.cache_index.approx import ApproxIndex
from kvroute.cache_index.hashing import BlockHash, hash_blocks

A, B = "http://a", "http://b"


def prompt(*tokens: int) -> list[BlockHash]:
    return hash_blocks(list(tokens), 1)


SYSTEM = prompt(7, 7, 7)
CHAT1 = prompt(7, 7, 7, 1, 1)
CHAT2 = prompt(7, 7, 7, 2, 2)


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize(
    ("elapsed", "want"),
    [
        (0.0, {A: 5}),  # just recorded
        (10.0, {A: 5}),  # exactly at the TTL: still alive
        (10.001, {}),  # past it: gone
    ],
)
def test_ttl_expiry_on_match(elapsed: float, want: dict[str, int]) -> None:
    clock = FakeClock()
    idx = ApproxIndex(ttl=10.0, clock=clock)
    idx.record(A, CHAT1)
    clock.t += elapsed
    assert idx.match(CHAT1) == want
    assert idx.block_count(A) == sum(want.values())


def test_rerecording_refreshes_the_shared_prefix_only() -> None:
    idx = ApproxIndex(ttl=10.0)
    idx.record(A, CHAT1, now=0.0)
    idx.record(A, CHAT2, now=8.0)  # refreshes the system prompt, not CHAT1's tail
    assert idx.match(CHAT1, now=15.0) == {A: 3}
    assert idx.match(CHAT2, now=15.0) == {A: 5}
    assert idx.match(CHAT2, now=18.5) == {}


def test_capacity_drops_least_recent_tail_first() -> None:
    idx = ApproxIndex(ttl=None, capacity=7)
    idx.record(A, CHAT1, now=0.0)  # 5 blocks
    idx.record(A, CHAT2, now=1.0)  # +2 = 7: fits
    assert idx.block_count(A) == 7
    idx.record(A, prompt(7, 7, 7, 3), now=2.0)  # +1: CHAT1's last block goes
    assert idx.match(CHAT1, now=3.0) == {A: 4}
    assert idx.match(CHAT2, now=3.0) == {A: 5}


def test_workers_are_independent_and_removable() -> None:
    idx = ApproxIndex(ttl=10.0)
    idx.record(A, CHAT1, now=0.0)
    idx.record(B, SYSTEM, now=5.0)
    assert idx.match(CHAT1, now=12.0) == {B: 3}  # A expired, B not
    assert idx.remove_worker(B) == 3
    assert idx.match(CHAT1, now=12.0) == {} and idx.workers() == [A]
    idx.record(A, CHAT2, now=13.0)
    assert idx.clear(A) == 5 and len(idx) == 0


def test_expire_sweeps_every_worker() -> None:
    idx = ApproxIndex(ttl=10.0)
    idx.record(A, CHAT1, now=0.0)
    idx.record(B, CHAT2, now=4.0)
    assert idx.expire(now=12.0) == 5
    assert (idx.block_count(A), idx.block_count(B)) == (0, 5)


def test_time_going_back_is_clamped() -> None:
    idx = ApproxIndex(ttl=10.0)
    idx.record(A, CHAT1, now=100.0)
    idx.record(A, CHAT2, now=50.0)  # treated as t=100: nothing expires out of order
    assert idx.match(CHAT2, now=109.0) == {A: 5}


def test_bad_ttl_is_rejected() -> None:
    with pytest.raises(ValueError):
        ApproxIndex(ttl=0)


# Property: match equals a model where a block is cached iff recorded within the TTL and among the
# worker's `capacity` most recently used blocks (ancestors always at least as recent as descendants).
TTL = 5.0
CAP = 6
tokens_st = st.lists(st.integers(0, 2), min_size=1, max_size=5)
op_st = st.tuples(st.sampled_from([A, B]), tokens_st, st.floats(0.0, 3.0), st.booleans())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op_st, max_size=25))
def test_approx_matches_model(ops: list[tuple[str, list[int], float, bool]]) -> None:
    idx = ApproxIndex(ttl=TTL, capacity=CAP)
    model: dict[str, dict[tuple[int, ...], float]] = {A: {}, B: {}}  # path -> last use, LRU order
    now = 0.0
    for worker, tokens, dt, is_record in ops:
        now += dt
        paths = [tuple(tokens[: i + 1]) for i in range(len(tokens))]
        hashes = prompt(*tokens)
        if is_record:
            held = model[worker]
            for p in [p for p, t in held.items() if t < now - TTL]:
                del held[p]
            for p in reversed(paths):
                held.pop(p, None)
                held[p] = now
            while len(held) > CAP:
                victim = next(iter(held))
                for p in [p for p in held if p[: len(victim)] == victim]:
                    del held[p]
            idx.record(worker, hashes, now=now)
        else:
            want = {}
            for w, held in model.items():
                n = 0
                while n < len(paths) and held.get(paths[n], -1e9) >= now - TTL:
                    n += 1
                if n:
                    want[w] = n
            assert idx.match(hashes, now=now) == want

"""LoadTracker: the ticket lifecycle, idempotent release, never-negative counters, in-flight prompts."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvroute.cache_index.hashing import BlockHash, hash_blocks
from kvroute.router.load import InflightIndex, LoadTracker
from kvroute.router.types import Worker, WorkerLoad, WorkerState

BS = 16


def tracker(*urls: str) -> tuple[LoadTracker, dict[str, Worker]]:
    ws = {u: Worker(url=u, state=WorkerState.HEALTHY) for u in urls}
    return LoadTracker(ws), ws


def test_lifecycle_moves_pending_prefill_to_active_blocks() -> None:
    lt, ws = tracker("a")
    load = ws["a"].load
    t = lt.on_routed("a", prompt_tokens=100, uncached_tokens=60, block_size=BS)
    assert (load.in_flight, load.pending_prefill_tokens, load.active_blocks) == (1, 60, 0)
    lt.on_first_token(t)
    assert (load.in_flight, load.pending_prefill_tokens, load.active_blocks) == (1, 0, 7)  # ceil(100/16)
    lt.on_tokens(t, 11)  # 111 tokens: still 7 pages
    assert load.active_blocks == 7
    lt.on_tokens(t, 1)  # 112 = 7 * 16: still 7
    assert load.active_blocks == 7
    lt.on_tokens(t, 1)  # 113: an 8th page
    assert load.active_blocks == 8
    lt.on_finished(t)
    assert load == WorkerLoad()  # everything released
    lt.on_finished(t)  # idempotent
    assert load == WorkerLoad()


def test_abort_before_first_token_releases_the_pending_prefill() -> None:
    lt, ws = tracker("a")
    t1 = lt.on_routed("a", 64, 64, BS)
    t2 = lt.on_routed("a", 32, 16, BS)
    lt.on_finished(t1)  # aborted while queued
    assert (ws["a"].load.in_flight, ws["a"].load.pending_prefill_tokens) == (1, 16)
    lt.on_first_token(t1)  # late events on a finished ticket are ignored
    lt.on_tokens(t1, 50)
    assert ws["a"].load.active_blocks == 0
    lt.on_finished(t2)
    assert ws["a"].load == WorkerLoad()


def test_tokens_before_first_token_imply_it_and_uncached_is_clamped() -> None:
    lt, ws = tracker("a")
    t = lt.on_routed("a", prompt_tokens=20, uncached_tokens=500, block_size=BS)  # more uncached than prompt
    assert ws["a"].load.pending_prefill_tokens == 20
    lt.on_tokens(t, 13)  # non-streaming response: all tokens at once
    assert (ws["a"].load.pending_prefill_tokens, ws["a"].load.active_blocks) == (0, 3)  # ceil(33/16)


def test_engine_poll_is_stored_beside_the_counters_and_clamped() -> None:
    lt, ws = tracker("a")
    t = lt.on_routed("a", 16, 16, BS)
    lt.update_engine_load("a", running=7, queued=-3, token_usage=1.7)
    load = ws["a"].load
    assert (load.in_flight, load.engine_running, load.engine_queued) == (1, 7, 0)
    assert load.engine_token_usage == 1.0
    lt.update_engine_load("gone", 1, 1, 0.5)  # unknown worker: ignored
    lt.on_finished(t)
    assert load.in_flight == 0 and load.engine_running == 7  # a poll is never released by a ticket


def test_removed_and_readded_worker_is_not_touched_by_old_tickets() -> None:
    lt, ws = tracker("a")
    hashes = hash_blocks(list(range(64)), BS)
    old = lt.on_routed("a", 64, 64, BS, block_hashes=hashes)
    lt.remove_worker("a")
    assert lt.inflight.match(hashes) == {}  # its in-flight prompts are forgotten at once
    ws["a"] = Worker(url="a", state=WorkerState.HEALTHY)  # re-added: a fresh Worker
    new = lt.on_routed("a", 32, 32, BS, block_hashes=hashes[:2])
    lt.on_finished(old)
    assert (ws["a"].load.in_flight, ws["a"].load.pending_prefill_tokens) == (1, 32)  # untouched
    assert lt.inflight.match(hashes) == {"a": 2}  # the new ticket's prompt is still in flight
    lt.on_finished(new)
    assert lt.inflight.match(hashes) == {} and lt.open_tickets() == 0


def test_inflight_index_is_refcounted_per_worker() -> None:
    idx = InflightIndex()
    long = [BlockHash(h) for h in (1, 2, 3, 4)]
    idx.add("a", long)
    idx.add("a", long[:2])
    idx.add("b", long[:1])
    assert idx.match(long) == {"a": 4, "b": 1}
    idx.discard("a", long)
    assert idx.match(long) == {"a": 2, "b": 1}  # the shorter prompt still holds the first 2
    idx.discard("a", long[:2])
    idx.discard("a", long[:2])  # over-release is harmless
    assert idx.match(long) == {"b": 1}
    assert idx.match([BlockHash(9), *long]) == {}  # the walk starts at the first block
    idx.discard("b", long[:1])
    assert len(idx) == 0


ops = st.lists(
    st.tuples(
        st.sampled_from(["route", "first", "tokens", "finish"]),
        st.integers(0, 3),  # worker
        st.integers(0, 9),  # ticket slot
        st.integers(0, 300),  # size
    ),
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_counters_never_negative_and_return_to_zero(seq: list[tuple[str, int, int, int]]) -> None:
    urls = ["a", "b", "c", "d"]
    now = [0.0]
    ws = {u: Worker(url=u, state=WorkerState.HEALTHY) for u in urls}
    lt = LoadTracker(ws, clock=lambda: now[0])
    slots: dict[int, object] = {}
    every: list[object] = []
    for op, w, slot, n in seq:
        t = slots.get(slot)
        if op == "route" or t is None:
            hashes = hash_blocks([w * 1000 + i for i in range(n)], BS)
            slots[slot] = lt.on_routed(urls[w], n, n // 2, BS, block_hashes=hashes)
            every.append(slots[slot])
        elif op == "first":
            lt.on_first_token(t)  # type: ignore[arg-type]
        elif op == "tokens":
            lt.on_tokens(t, n)  # type: ignore[arg-type]
        else:
            lt.on_finished(t)  # type: ignore[arg-type]
        for wk in ws.values():
            ld = wk.load
            assert ld.in_flight >= 0 and ld.pending_prefill_tokens >= 0 and ld.active_blocks >= 0
        assert sum(wk.load.in_flight for wk in ws.values()) == lt.open_tickets()
    for t in every:
        lt.on_finished(t)  # type: ignore[arg-type]
        lt.on_finished(t)  # type: ignore[arg-type]
    assert all(wk.load == WorkerLoad() for wk in ws.values())  # exactly back to zero
    now[0] += 60.0  # past the grace that prefilled prompts are held for after their request ends
    assert len(lt.inflight) == 0 and lt.open_tickets() == 0


def test_a_finished_prompt_is_held_for_the_grace_then_dropped_and_an_aborted_one_at_once() -> None:
    now = [0.0]
    ws = {u: Worker(url=u, state=WorkerState.HEALTHY) for u in ("a", "b")}
    lt = LoadTracker(ws, clock=lambda: now[0])
    p = hash_blocks(list(range(64)), BS)
    q = hash_blocks(list(range(100, 164)), BS)
    done = lt.on_routed("a", 64, 64, BS, block_hashes=p)
    aborted = lt.on_routed("b", 64, 64, BS, block_hashes=q)
    lt.on_first_token(done)
    lt.on_finished(done)  # prefilled: in a's cache, its BlockStored event maybe not in the index yet
    lt.on_finished(aborted)  # never prefilled: b holds nothing
    assert lt.inflight.match(p) == {"a": 4} and lt.inflight.match(q) == {}
    now[0] = 1.9
    assert lt.inflight.match(p) == {"a": 4}
    now[0] = 2.0  # the default grace (2 s) is over: the event-fed index is the only source again
    assert lt.inflight.match(p) == {} and len(lt.inflight) == 0


def test_a_streams_time_per_token_becomes_the_workers_step_estimate() -> None:
    now = [0.0]
    ws = {"a": Worker(url="a", state=WorkerState.HEALTHY)}
    lt = LoadTracker(ws, clock=lambda: now[0])
    t = lt.on_routed("a", 32, 32, BS)
    lt.on_first_token(t)
    now[0] = 0.9  # 10 tokens, 9 gaps after the first: 0.1 s per step
    lt.on_finished(t, output_tokens=10)
    assert ws["a"].load.step_s == pytest.approx(0.1)
    t = lt.on_routed("a", 32, 32, BS)
    lt.on_first_token(t)
    now[0] += 0.45  # 0.05 s per step: the estimate moves a fifth of the way
    lt.on_finished(t, output_tokens=10)
    assert ws["a"].load.step_s == pytest.approx(0.1 + 0.2 * (0.05 - 0.1))
    t = lt.on_routed("a", 32, 32, BS)
    lt.on_first_token(t)  # a non-streamed answer: every token at once, no step to learn from
    lt.on_finished(t, output_tokens=10)
    assert ws["a"].load.step_s == pytest.approx(0.09)


def test_inflight_prompts_of_other_replicas_expire_and_share_refcounts() -> None:
    now = [100.0]
    idx = InflightIndex(clock=lambda: now[0])
    p = [BlockHash(i) for i in range(1, 7)]
    idx.add_for("a", p, ttl_s=5.0)
    idx.add("a", p[:3])  # our own request with the first half
    assert idx.match(p) == {"a": 6}
    now[0] = 104.9
    assert idx.match(p) == {"a": 6}
    now[0] = 105.0  # the remote prompt expires; our own request still holds its blocks
    assert idx.match(p) == {"a": 3}
    idx.discard("a", p[:3])
    assert idx.match(p) == {} and len(idx) == 0


def test_removed_worker_drops_its_remote_prompts_so_a_re_added_one_keeps_its_counts() -> None:
    now = [0.0]
    idx = InflightIndex(clock=lambda: now[0])
    p = [BlockHash(i) for i in range(1, 4)]
    idx.add_for("a", p, ttl_s=1.0)
    idx.remove_worker("a")
    idx.add("a", p)  # the worker is back; one of our requests holds the prompt
    now[0] = 2.0  # the old remote entry's expiry must not take this request's blocks away
    assert idx.match(p) == {"a": 3}


def test_remote_prompts_are_bounded() -> None:
    idx = InflightIndex(clock=lambda: 0.0, max_expiring=2)
    for i in range(3):
        idx.add_for("a", [BlockHash(10 * i + 1)], ttl_s=60)
    assert idx.match([BlockHash(1)]) == {}  # the oldest was dropped early
    assert idx.match([BlockHash(21)]) == {"a": 1}


def test_the_prefill_queue_head_and_the_workers_prefill_speed_follow_first_tokens() -> None:
    now = [0.0]
    ws = {"a": Worker(url="a", state=WorkerState.HEALTHY)}
    lt = LoadTracker(ws, clock=lambda: now[0])
    load = ws["a"].load
    t1 = lt.on_routed("a", 1600, 1600, BS)  # an empty queue: t1 starts now
    now[0] = 0.1
    t2 = lt.on_routed("a", 800, 800, BS)  # queued behind t1
    assert (load.head_tokens, load.head_started_at, load.prefill_tokens_per_s) == (1600, 0.0, None)
    now[0] = 1.0
    lt.on_first_token(t1)  # 1600 tokens in 1 s; t2 starts now
    assert load.prefill_tokens_per_s == pytest.approx(1600.0)
    assert (load.head_tokens, load.head_started_at) == (800, 1.0)
    now[0] = 1.2
    lt.on_first_token(t2)  # 800 tokens in 0.2 s: decayed sums (0.8 x 1600 + 800) / (0.8 x 1 + 0.2)
    assert load.prefill_tokens_per_s == pytest.approx(2080.0)
    assert load.head_tokens == 0  # nothing queued
    t3 = lt.on_routed("a", 320, 320, BS)
    t4 = lt.on_routed("a", 320, 320, BS)
    now[0] = 1.3
    lt.on_finished(t3)  # the head aborted: the next one starts now
    assert (load.head_tokens, load.head_started_at) == (320, 1.3)
    lt.on_finished(t4)
    assert load.head_tokens == 0 and load.pending_prefill_tokens == 0

"""New-prefix placement on an idle fleet: kv_aware spreads by what workers hold and were recently given."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from kvroute import Router
from kvroute.cache_index.events import BlockStored, KvEventBatch
from kvroute.router.types import Worker, WorkerState

BS = 16


def fleet(n: int, capacity_tokens: int | None = None) -> Router:
    r = Router(block_size=BS, policy="kv_aware")
    for i in range(n):
        r.add_worker(Worker(f"http://w{i}", state=WorkerState.HEALTHY, max_total_tokens=capacity_tokens))
    return r


def engine_stores(r: Router, url: str, tokens: list[int], first_engine_hash: int) -> None:
    """`url`'s engine reports the prompt's full pages as cached (one BlockStored per page)."""
    events, parent = [], None
    for k, off in enumerate(range(0, len(tokens) - BS + 1, BS)):
        h = first_engine_hash + k
        events.append(BlockStored((h,), parent, tuple(tokens[off : off + BS]), BS))
        parent = h
    r.apply_kv_events(url, KvEventBatch(time.time(), tuple(events)))


def send_one_after_another(r: Router, prompts: list[str], with_events: bool = True) -> list[str]:
    """Each request is routed, served (its pages reported by events) and finished before the next."""
    picks = []
    for i, text in enumerate(prompts):
        req = r.routing_request(text=text)
        d = r.select(req)
        ticket = r.on_routed(d, req)
        r.on_first_token(ticket)
        if with_events:
            engine_stores(r, d.worker, list(text.encode()), (i + 1) << 32)
        r.on_finished(ticket, cached_tokens=0)
        picks.append(d.worker)
    return picks


@pytest.mark.parametrize("capacity_tokens", [None, 64 * 1024])
def test_idle_fleet_spreads_unrelated_prompts_over_every_worker(capacity_tokens: int | None) -> None:
    r = fleet(4, capacity_tokens)
    prompts = [f"prompt {i:02d} about topic {i * 7919} " * 12 for i in range(16)]  # ~300 tokens each
    picks = send_one_after_another(r, prompts)
    # Before: every cost tied on an idle fleet and all 16 went to w0.
    assert Counter(picks) == {f"http://w{i}": 4 for i in range(4)}


def test_short_prompts_without_events_spread_by_recent_placements() -> None:
    """Prompts under one block have no block to place: the recent placements break the tie."""
    r = fleet(4)
    picks = send_one_after_another(r, [f"hi {i}" for i in range(8)], with_events=False)
    assert Counter(picks) == {f"http://w{i}": 2 for i in range(4)}
    d = r.select(r.routing_request(text="hello"))
    assert "recent placements" in d.reason  # the explain says which term decided


def test_placement_never_pulls_a_prefix_off_its_holder() -> None:
    """The fuller worker holding the prompt's prefix still wins: its new blocks are few."""
    r = fleet(3)
    shared = "system prompt shared by every request of this tenant. " * 10
    send_one_after_another(r, [shared + "first question"])
    holder = r.select(r.routing_request(text=shared + "first question")).worker
    send_one_after_another(r, [f"filler {i} " * 40 for i in range(4)])  # the others fill up too
    d = r.select(r.routing_request(text=shared + "a second, different question"))
    assert d.worker == holder and d.cached_blocks >= len(shared) // BS


def test_explain_names_the_placement_term() -> None:
    r = fleet(2)
    engine_stores(r, "http://w0", list(("x" * 640).encode()), 1 << 32)  # w0 holds 40 blocks, w1 none
    req = r.routing_request(text="an unrelated prompt " * 10)
    d = r.select(req)
    assert d.worker == "http://w1"
    assert "decided by placement" in d.reason
    by_url = {s.url: s.terms for s in r.explain(req)}
    assert by_url["http://w0"]["placement_penalty"] > 0 == by_url["http://w1"]["placement_penalty"]
    assert by_url["http://w0"]["held_blocks"] == 40


def test_fill_weight_zero_keeps_candidate_order() -> None:
    r = Router(block_size=BS, policy="kv_aware", policy_params={"fill_weight": 0.0})
    for i in range(2):
        r.add_worker(Worker(f"http://w{i}", state=WorkerState.HEALTHY))
    engine_stores(r, "http://w0", list(("x" * 640).encode()), 1 << 32)
    d = r.select(r.routing_request(text="an unrelated prompt " * 10))
    assert d.worker == "http://w1"  # fewer blocks held still breaks the tie
    assert "tie on cost, then fewer blocks held" in d.reason

"""The GPU engine's scheduler without a model (torch-free): admission by pages, chunked prefill, prefix
sharing, eviction returning pool pages, abort, flush; pool and cache accounting checked after every step."""

from __future__ import annotations

from kvroute.engines.gpu.kv_pool import PageAllocator
from kvroute.engines.gpu.scheduler import Req, Scheduler
from kvroute.engines.prefix_cache import PagesRemoved, PageStored, PrefixCache


def make(num_pages: int = 32, ps: int = 4, max_batch_tokens: int = 16, max_running: int = 8) -> Scheduler:
    cache = PrefixCache(ps, num_pages * ps)
    return Scheduler(
        cache,
        PageAllocator(num_pages, ps),
        max_batch_tokens=max_batch_tokens,
        max_running=max_running,
        context_length=10_000,
    )


def run_all(s: Scheduler, max_steps: int = 1000) -> list[tuple[int, int]]:
    """Step with a fake model (token = step number); returns (decodes, prefill tokens) per step."""
    shapes = []
    for n in range(max_steps):
        step, _ = s.schedule()
        if step.empty():
            return shapes
        assert step.num_tokens <= s.max_batch_tokens
        shapes.append((len(step.decodes), sum(c.length for c in step.prefills)))
        sampled = [100 + n] * (len(step.decodes) + sum(c.completes for c in step.prefills))
        s.finish_step(step, sampled)
        s.check_invariants()
    raise AssertionError("did not drain")


def test_chunked_prefill_mixes_with_decodes_and_respects_budget() -> None:
    s = make(max_batch_tokens=16)
    a = Req("a", list(range(1, 11)), max_new_tokens=6)
    b = Req("b", list(range(50, 90)), max_new_tokens=2)  # 40 tokens: 3 chunks of <= 16
    s.add(a)
    s.add(b)
    shapes = run_all(s)
    assert shapes[0] == (0, 16)  # a's 10 + 6 of b's
    assert shapes[1] == (1, 15)  # a decodes while b's prefill continues in the same step
    assert a.finished and b.finished and len(a.output) == 6 and len(b.output) == 2
    assert s.pool.free_pages + len(s.page_of) == s.pool.num_pages


def test_prefix_hit_shares_pages_and_reports_cached_tokens() -> None:
    s = make()
    p = list(range(1, 14))  # 13 tokens: 3 full pages of 4
    first = Req("a", p, max_new_tokens=3)
    s.add(first)
    run_all(s)
    assert first.cached_tokens == 0
    second = Req("b", p + [99], max_new_tokens=1)
    s.add(second)
    step, _ = s.schedule()
    assert second.cached_tokens == 12  # whole pages only
    assert step.prefills[0].start == 12 and step.prefills[0].length == 2
    # Its first three pages are the cached ones, locked while it runs.
    cached = [s.page_of[n.hash_int] for n in second.locked if n.hash_int is not None]
    assert second.pages[:3] == cached and all(n.lock_ref == 1 for n in second.locked)
    s.finish_step(step, [7])
    s.check_invariants()
    assert second.finished and all(n.lock_ref == 0 for n in second.locked)


def test_full_prompt_match_still_computes_last_token() -> None:
    s = make()
    p = list(range(1, 9))  # exactly 2 pages
    s.add(Req("a", p, max_new_tokens=1))
    run_all(s)
    r = Req("b", p, max_new_tokens=1)
    s.add(r)
    step, _ = s.schedule()
    assert r.cached_tokens == 4 and step.prefills[0].length == 4


def test_admission_waits_for_pages_then_evicts_lru_and_frees_pool_pages() -> None:
    s = make(num_pages=8, ps=4, max_batch_tokens=64)
    s.add(Req("a", list(range(1, 17)), max_new_tokens=1))  # 16 tokens + 1 = 5 pages
    run_all(s)
    notes = s.take_events()
    stored = [n for n in notes if isinstance(n, PageStored)]
    assert len(stored) == 4 and stored[0].parent_hash is None
    assert stored[1].parent_hash == stored[0].block_hash
    assert s.pool.free_pages == 4  # 4 cached pages, the rest back in the pool
    big = Req("b", list(range(100, 120)), max_new_tokens=4)  # 24 tokens = 6 pages: must evict 2
    s.add(big)
    step, _ = s.schedule()
    removed = [h for n in s.take_events() if isinstance(n, PagesRemoved) for h in n.block_hashes]
    assert len(removed) == 2 and set(removed) <= {n.block_hash for n in stored}
    assert removed == [stored[3].block_hash, stored[2].block_hash]  # leaves first
    s.check_invariants()
    # A request larger than everything waits rather than failing.
    s.add(Req("c", list(range(200, 228)), max_new_tokens=1))  # 8 pages: only after b leaves
    assert len(s.running) == 1 and len(s.waiting) == 1
    s.finish_step(step, [1])
    run_all(s)
    assert not s.waiting and not s.running


def test_abort_releases_locks_and_pages() -> None:
    s = make()
    p = list(range(1, 14))
    s.add(Req("a", p, max_new_tokens=2))
    run_all(s)
    r = Req("b", p + [5, 6, 7], max_new_tokens=50)
    s.add(r)
    s.add(Req("w", [1, 2, 3], max_new_tokens=1))
    step, _ = s.schedule()
    s.finish_step(step, [1, 2])
    assert s.abort(rid="b") == [r]
    step, gone = s.schedule()
    assert gone == [r] and r.finished and not r.pages
    assert all(n.lock_ref == 0 for n in s.cache.match_prefix(p, touch=False).nodes)
    s.check_invariants()
    assert s.flush() is True
    assert s.pool.free_pages == s.pool.num_pages and not s.page_of


def test_flush_refused_while_running() -> None:
    s = make()
    s.add(Req("a", [1, 2, 3], max_new_tokens=5))
    s.schedule()
    assert s.flush() is False


def test_duplicate_prefix_computed_twice_is_deduplicated() -> None:
    s = make(max_batch_tokens=64)
    p = list(range(1, 13))
    a, b = Req("a", p + [1], max_new_tokens=1), Req("b", p + [2], max_new_tokens=1)
    s.add(a)
    s.add(b)  # admitted in the same step: neither hits, both compute the 3 pages
    step, _ = s.schedule()
    assert a.cached_tokens == b.cached_tokens == 0
    s.finish_step(step, [9, 9])
    s.check_invariants()
    assert len(s.page_of) == 3  # one copy kept; b's duplicates went back to the pool
    assert s.pool.free_pages == s.pool.num_pages - 3

"""PrefixCache: page matching, locking, LRU eviction of unlocked leaves, pool accounting, SGLang hashes."""

from __future__ import annotations

import hashlib
import tracemalloc

import pytest

from kvroute.engines.prefix_cache import CacheCleared, PagesRemoved, PageStored, PrefixCache

PS = 4


def toks(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def sglang_hash(tokens: list[int], prior_hex: str | None) -> tuple[str, int]:
    """hicache_storage.get_hash_str + hash_str_to_int64, written out independently."""
    h = hashlib.sha256()
    if prior_hex:
        h.update(bytes.fromhex(prior_hex))
    for t in tokens:
        h.update(t.to_bytes(4, "little", signed=False))
    hx = h.hexdigest()
    v = int(hx[:16], 16)
    return hx, v - 2**64 if v >= 2**63 else v


def test_match_is_page_aligned_and_counts_only_full_pages() -> None:
    c = PrefixCache(PS, 64)
    c.alloc(10)
    path, added = c.insert(toks(0, 10))  # 2 full pages; the 2 trailing tokens are not cached
    c.free(10)
    assert (len(path), added, c.tree_tokens) == (2, 8, 8)
    assert c.match_prefix(toks(0, 10)).cached_tokens == 8
    assert c.match_prefix(toks(0, 7)).cached_tokens == 4  # second page incomplete in the query
    assert c.match_prefix([0, 1, 2, 99, 4]).cached_tokens == 0  # first page differs


def test_events_carry_sglang_chained_sha256_hashes_and_parents() -> None:
    c = PrefixCache(PS, 64)
    c.alloc(8)
    c.insert(toks(0, 8))
    c.free(8)
    ev = c.take_events()
    h0, i0 = sglang_hash(toks(0, 4), None)
    _, i1 = sglang_hash(toks(4, 4), h0)
    assert ev == [PageStored(i0, None, tuple(toks(0, 4))), PageStored(i1, i0, tuple(toks(4, 4)))]
    assert c.take_events() == []  # drained


def test_evicts_least_recently_used_leaves_first_and_reports_removals() -> None:
    c = PrefixCache(PS, 16)
    a, b = toks(0, 8), toks(100, 8)
    for seq in (a, b):
        assert c.alloc(8)
        c.insert(seq)
        c.free(8)
    c.match_prefix(a)  # a is now more recent than b
    c.take_events()
    assert c.free_tokens == 0 and c.evictable_tokens == 16
    assert c.alloc(4)  # needs one page: b's leaf goes (b's child page, not its parent)
    (ev,) = c.take_events()
    assert isinstance(ev, PagesRemoved) and len(ev.block_hashes) == 1
    assert c.match_prefix(b).cached_tokens == 4 and c.match_prefix(a).cached_tokens == 8


def test_locked_pages_and_their_ancestors_are_never_evicted() -> None:
    c = PrefixCache(PS, 12)
    c.alloc(8)
    path, _ = c.insert(toks(0, 8))
    c.free(8)
    c.lock(path)
    assert c.evictable_tokens == 0 and not c.can_alloc(8) and c.alloc(8) is False
    assert c.alloc(4)  # the one free page
    c.free(4)
    c.unlock(path)
    assert c.alloc(12) and c.tree_tokens == 0


def test_reset_refuses_locked_pages_and_records_clear() -> None:
    c = PrefixCache(PS, 16)
    c.alloc(4)
    path, _ = c.insert(toks(0, 4))
    c.free(4)
    c.lock(path)
    with pytest.raises(ValueError):
        c.reset()
    c.unlock(path)
    c.take_events()
    c.reset()
    assert c.take_events() == [CacheCleared()] and c.tree_tokens == 0


@pytest.mark.parametrize(
    ("page_size", "capacity"),
    [(0, 16), (4, 3)],  # no page size; a pool smaller than one page
)
def test_rejects_bad_sizes(page_size: int, capacity: int) -> None:
    with pytest.raises(ValueError):
        PrefixCache(page_size, capacity)


def test_heap_of_eviction_candidates_stays_bounded_under_repeated_hits() -> None:
    c = PrefixCache(PS, 64)
    c.alloc(8)
    c.insert(toks(0, 8))
    c.free(8)
    for _ in range(5000):  # each touch pushes a candidate; stale ones must be dropped
        c.match_prefix(toks(0, 8))
    assert len(c._heap) <= 2 * c.num_pages() + 1024
    c.alloc(64 - 8)
    assert c.alloc(8) and c.tree_tokens == 0  # the (still correct) heap finds the leaf, then its parent


def test_reset_and_eviction_free_the_pages_memory() -> None:
    # Pages are invisible to the cycle collector, so the cache itself must leave no cycles behind.
    tracemalloc.start()
    try:
        c = PrefixCache(PS, 1 << 20)
        base = tracemalloc.get_traced_memory()[0]
        for i in range(200):
            seq = [i] + toks(1000 * i, 63)
            c.alloc(64)
            c.insert(seq)
            c.free(64)
        c.take_events()
        grown = tracemalloc.get_traced_memory()[0]
        c.reset()
        c.take_events()
        c.alloc(1 << 20)  # nothing to evict now; the pool is just free
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert grown - base > 200 * 16 * 100  # 3200 pages held
    assert after - base < (grown - base) / 10  # and released by reset

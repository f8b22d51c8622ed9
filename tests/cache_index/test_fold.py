"""Engine pages smaller than router blocks: pages folded into blocks (SGLang's default page size 1,
or 16-token pages under 64-token blocks), chains continued or split mid-block, leaf-first removals,
and a property test against the engines' own paged prefix cache with eviction."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvroute.cache_index.apply import KvEventApplier, page_size_problem
from kvroute.cache_index.events import AllBlocksCleared, BlockRemoved, BlockStored, KvEventBatch
from kvroute.cache_index.hashing import hash_blocks
from kvroute.cache_index.radix import RadixIndex
from kvroute.engines.prefix_cache import PrefixCache
from kvroute.engines.sim.kv_notes import notes_to_events

BS = 4
SEED = 7
TOKENS = list(range(200, 216))  # 16 tokens: 4 router blocks


def pages(tokens: list[int], ps: int, first_hash: int, parent: int | None = None) -> list[BlockStored]:
    """One BlockStored per engine page of `ps` tokens (SGLang <= 0.5.10), chained from `parent`."""
    out = []
    for i in range(len(tokens) // ps):
        h = first_hash + i
        out.append(BlockStored((h,), parent, tuple(tokens[i * ps : (i + 1) * ps]), ps))
        parent = h
    return out


def make() -> tuple[RadixIndex, KvEventApplier]:
    index = RadixIndex()
    return index, KvEventApplier(index, block_size=BS, seed=SEED)


def blocks(tokens: list[int]) -> list[int]:
    return hash_blocks(tokens, BS, SEED)


def apply(ap: KvEventApplier, worker: str, *events: object) -> None:
    ap.apply(worker, KvEventBatch(0.0, tuple(events)))  # type: ignore[arg-type]


@pytest.mark.parametrize("ps", [1, 2, 4])
def test_pages_fold_into_the_same_blocks_as_block_sized_pages(ps: int) -> None:
    index, ap = make()
    apply(ap, "w0", *pages(TOKENS, ps, 1000))
    assert index.match(blocks(TOKENS)) == {"w0": 4}
    assert ap.stats.stored == 16 // ps and ap.stats.mismatch == 0
    # the partial pages held aside: every page but the last of each block (none at page = block)
    assert ap.partial_pages("w0") == (16 // ps) - 4


def test_chain_continued_mid_block_in_a_later_batch() -> None:
    index, ap = make()
    evs = pages(TOKENS, 1, 1000)
    apply(ap, "w0", *evs[:6])  # 6 tokens: one block and half of the next
    assert index.match(blocks(TOKENS)) == {"w0": 1}
    apply(ap, "w0", *evs[6:])  # continues from page 6 (the middle of block 2)
    assert index.match(blocks(TOKENS)) == {"w0": 4}


def test_merged_event_split_mid_block_by_another_prompt() -> None:
    """A second prompt shares 6 tokens: the engine's new chain hangs off page 6, inside block 2."""
    index, ap = make()
    apply(ap, "w0", BlockStored(tuple(range(1000, 1016)), None, tuple(TOKENS), 1))  # 0.5.23: one event
    other = TOKENS[:6] + list(range(900, 910))
    apply(ap, "w0", BlockStored(tuple(range(2000, 2010)), 1005, tuple(other[6:]), 1))
    assert index.match(blocks(other)) == {"w0": 4}
    assert index.match(blocks(TOKENS)) == {"w0": 4}


def test_leaf_first_removal_drops_a_block_with_its_last_page() -> None:
    index, ap = make()
    apply(ap, "w0", *pages(TOKENS, 1, 1000))
    apply(ap, "w0", BlockRemoved((1015, 1014)))  # the tail of block 4
    assert index.match(blocks(TOKENS)) == {"w0": 3}
    apply(ap, "w0", BlockRemoved((1013, 1012)))  # the rest of block 4: no block left to drop
    assert index.match(blocks(TOKENS)) == {"w0": 3} and ap.partial_pages("w0") == 9
    assert index.stats()["unknown_removes"] == 0  # partial pages never reach the index
    apply(ap, "w0", AllBlocksCleared())
    assert len(index) == 0 and ap.partial_pages("w0") == 0


def test_mixed_page_sizes_in_one_fleet_hit_the_same_blocks() -> None:
    index, ap = make()
    apply(ap, "p1", *pages(TOKENS, 1, 1000))
    apply(ap, "p4", *pages(TOKENS, 4, 5000))
    apply(ap, "p2", *pages(TOKENS[:10], 2, 8000))  # 10 tokens: 2 whole blocks
    assert index.match(blocks(TOKENS)) == {"p1": 4, "p4": 4, "p2": 2}


@pytest.mark.parametrize(
    ("page", "block", "fits"), [(1, 16, True), (16, 64, True), (64, 16, False), (24, 16, False)]
)
def test_page_size_problem(page: int, block: int, fits: bool) -> None:
    problem = page_size_problem(page, block)
    assert (problem is None) == fits
    if problem:
        assert f"page_size {page}" in problem and f"--block-size {block}" in problem


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ps=st.sampled_from([1, 2, 4]),
    merge=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_index_matches_the_engines_paged_cache_under_eviction(ps: int, merge: bool, seed: int) -> None:
    """Insert prompts sharing prefixes into a paged prefix cache (page `ps`, LRU eviction), publish its
    notes as SGLang events, fold them into router blocks of 4: for every prompt, the router's match is
    exactly the engine's cached tokens in whole blocks."""
    rng = random.Random(seed)
    cache = PrefixCache(ps, capacity_tokens=96)
    index, ap = make()
    stems = [[rng.randrange(50) for _ in range(rng.randrange(3, 14))] for _ in range(4)]
    prompts = []
    for _ in range(30):
        p = list(rng.choice(stems)) + [rng.randrange(50) for _ in range(rng.randrange(0, 12))]
        prompts.append(p)
        need = len(p) - cache.match_prefix(p, touch=False).cached_tokens
        if cache.free_tokens < need:
            cache.evict(need - cache.free_tokens)
        cache.insert(p)
        apply(ap, "w0", *notes_to_events(cache.take_events(), ps, merge))
        for q in prompts:
            held = cache.match_prefix(q, touch=False).cached_tokens
            assert index.match(blocks(q)).get("w0", 0) == held // BS
    assert ap.stats.orphan == 0 and ap.stats.mismatch == 0

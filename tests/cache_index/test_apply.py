"""KvEventApplier against the real RadixIndex: per-page and merged stores, removals, clears, and the
events it must count and skip (orphans, size mismatch, other tiers, LoRA/salt namespaces)."""

from __future__ import annotations

from kvroute.cache_index.apply import KvEventApplier
from kvroute.cache_index.events import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent, KvEventBatch
from kvroute.cache_index.hashing import BlockHash, hash_blocks
from kvroute.cache_index.radix import RadixIndex

BS = 4
SEED = 99
TOKENS = list(range(100, 116))  # 4 pages of 4
ENGINE = [1001, -1002, 1003, -1004]  # opaque engine hashes, one per page


def batch(*events: KvEvent) -> KvEventBatch:
    return KvEventBatch(0.0, tuple(events))


def per_page_events(
    tokens: list[int] = TOKENS, engine: list[int] = ENGINE, medium: str | None = "GPU"
) -> list[BlockStored]:
    """SGLang <= 0.5.10: one BlockStored per page, each linked to the previous page's engine hash."""
    out = []
    parent = None
    for i, e in enumerate(engine):
        out.append(BlockStored((e,), parent, tuple(tokens[i * BS : (i + 1) * BS]), BS, None, medium))
        parent = e
    return out


def make() -> tuple[RadixIndex, KvEventApplier]:
    index = RadixIndex()
    return index, KvEventApplier(index, block_size=BS, seed=SEED)


def ours(tokens: list[int] = TOKENS, seed: int = SEED) -> list[BlockHash]:
    return hash_blocks(tokens, BS, seed)


def test_per_page_chain_is_matched_with_our_hashes() -> None:
    index, ap = make()
    ap.apply("w0", batch(*per_page_events()))
    assert index.match(ours()) == {"w0": 4}
    assert index.our_hash("w0", ENGINE[2]) == ours()[2]
    assert ap.stats.stored == 4 and ap.stats.events == 4


def test_merged_event_gives_same_index_as_per_page() -> None:
    index, ap = make()
    ap.apply("w0", batch(BlockStored(tuple(ENGINE[:3]), None, tuple(TOKENS[:12]), BS, None, "GPU")))
    # continuation in a later batch, parented on the merged event's last hash
    ap.apply("w0", batch(BlockStored((ENGINE[3],), ENGINE[2], tuple(TOKENS[12:]), BS)))
    assert index.match(ours()) == {"w0": 4}
    assert [index.our_hash("w0", e) for e in ENGINE] == ours()


def test_remove_and_clear() -> None:
    index, ap = make()
    ap.apply("w0", batch(*per_page_events()))
    ap.apply("w1", batch(*per_page_events()))
    ap.apply("w0", batch(BlockRemoved((ENGINE[3],), "GPU")))
    assert index.match(ours()) == {"w0": 3, "w1": 4}
    ap.apply("w0", batch(BlockRemoved((ENGINE[1],))))  # medium None counts as GPU; descendants go too
    assert index.match(ours()) == {"w0": 1, "w1": 4}
    ap.apply("w1", batch(AllBlocksCleared()))
    assert index.match(ours()) == {"w0": 1}
    assert ap.stats.clears == 1


def test_unknown_parent_is_orphan_not_error() -> None:
    index, ap = make()
    ap.apply("w0", batch(BlockStored((5, 6), 123456, tuple(TOKENS[:8]), BS)))
    assert len(index) == 0 and ap.stats.orphan == 2


def test_size_mismatch_counted_and_skipped() -> None:
    index, ap = make()
    ap.apply("w0", batch(
        BlockStored((1,), None, tuple(range(8)), 8),  # engine page 8 != router block 4
        BlockStored((2, 3), None, tuple(range(6)), BS),  # tokens not 2 whole pages
        BlockStored((4,), None, (1, 2, 3), 3),  # page 3 does not divide block 4
    ))  # fmt: skip
    assert len(index) == 0 and ap.stats.mismatch == 4
    ap.apply("w0", batch(*per_page_events()))  # a good event after bad ones still applies
    assert index.match(ours()) == {"w0": 4}


def test_cpu_tier_ignored_by_default_or_tracked_separately() -> None:
    index, ap = make()
    ap.apply("w0", batch(*per_page_events(medium="CPU_PINNED")))
    ap.apply("w0", batch(BlockRemoved((ENGINE[0],), "CPU_PINNED")))
    assert len(index) == 0 and ap.stats.other_medium == 5

    gpu, cpu = RadixIndex(), RadixIndex()
    ap2 = KvEventApplier(gpu, block_size=BS, seed=SEED, cpu_index=cpu)
    ap2.apply("w0", batch(*per_page_events(medium="CPU_PINNED")))
    assert cpu.match(ours()) == {"w0": 4} and len(gpu) == 0
    ap2.apply("w0", batch(BlockRemoved((ENGINE[2],), "CPU_PINNED")))
    assert cpu.match(ours()) == {"w0": 2}
    ap2.apply("w0", batch(AllBlocksCleared()))
    assert len(cpu) == 0


def test_lora_and_salt_are_namespaced() -> None:
    index, ap = make()
    ap.apply("w0", batch(BlockStored((1,), None, tuple(TOKENS[:4]), BS, lora_id=7)))
    ap.apply("w0", batch(BlockStored((2,), None, tuple(TOKENS[:4]), BS, lora_name="ad")))
    ap.apply("w0", batch(BlockStored((3,), None, tuple(TOKENS[:4]), BS, cache_salt="s")))
    assert len(index) == 0 and ap.stats.namespaced == 3

    index2 = RadixIndex()
    ap2 = KvEventApplier(index2, block_size=BS, seed=SEED, lora_seeds={7: 555})
    ap2.apply("w0", batch(BlockStored((1,), None, tuple(TOKENS[:4]), BS, lora_id=7)))
    assert index2.match(ours(seed=555)[:1]) == {"w0": 1}
    assert index2.match(ours()[:1]) == {}  # never matches base-model prompts


def test_forget_drops_worker_only() -> None:
    index, ap = make()
    ap.apply("w0", batch(*per_page_events()))
    ap.apply("w1", batch(*per_page_events()))
    ap.forget("w0")
    assert index.match(ours()) == {"w1": 4}
    # after a reset, events parented on pre-reset blocks are orphans; root-anchored ones rebuild
    ap.apply("w0", batch(BlockStored((ENGINE[3],), ENGINE[2], tuple(TOKENS[12:]), BS)))
    assert ap.stats.orphan == 1
    ap.apply("w0", batch(*per_page_events()[:2]))
    assert index.match(ours()) == {"w0": 2, "w1": 4}


def test_chain_runs_in_one_batch_equal_event_by_event() -> None:
    """The applier merges per-page chains within a batch: the index must end exactly as if each
    event came alone, including runs broken by removals, other tiers, bad sizes and orphans."""
    import random

    rng = random.Random(7)
    total_stored = 0
    for trial in range(40):
        events: list[KvEvent] = []
        chains: list[list[int]] = []
        next_hash = 1
        for _ in range(rng.randrange(1, 12)):
            kind = rng.random()
            if kind < 0.6 or not chains:
                parent_chain = rng.choice(chains) if chains and rng.random() < 0.5 else None
                parent = parent_chain[-1] if parent_chain else (123456 if rng.random() < 0.1 else None)
                chain = list(parent_chain or [])
                for _ in range(rng.randrange(1, 5)):
                    size = BS if rng.random() < 0.9 else BS - 1
                    medium = "GPU" if rng.random() < 0.9 else "CPU_PINNED"
                    toks = tuple(rng.randrange(50) for _ in range(size))
                    events.append(BlockStored((next_hash,), parent, toks, size, None, medium))
                    parent = next_hash
                    chain.append(next_hash)
                    next_hash += 1
                chains.append(chain)
            elif kind < 0.8:
                events.append(BlockRemoved((rng.choice(rng.choice(chains)),)))
            elif rng.random() < 0.2:
                events.append(AllBlocksCleared())
        merged_index, merged = make()
        merged.apply("w", batch(*events))
        single_index, single = make()
        for e in events:
            single.apply("w", batch(e))
        assert merged.stats.stored == single.stats.stored, trial
        assert merged.stats.events == single.stats.events == len(events)
        for e in range(1, next_hash):
            assert merged_index.our_hash("w", e) == single_index.our_hash("w", e), (trial, e)
        assert len(merged_index) == len(single_index)
        total_stored += single.stats.stored
    assert total_stored > 100  # the trials did store chains

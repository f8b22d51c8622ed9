"""KV events of the simulated engine, decoded by SGLang's own consumer-side classes."""

from __future__ import annotations

import aiohttp
import msgspec
import pytest

from kvroute.cache_index.hashing import ByteTokenizer
from kvroute.engines.kv_publisher import sglang_page_hash
from kvroute.engines.sim.fleet import SimFleet
from tests.engines.conftest import FAST, generate, tap_events, wait_for
from tests.sglang_ref import load_kv_events


def prompt(i: int) -> str:
    return f"{i:04d} " + "abcdefghij" * 10  # 105 tokens: 6 full pages, distinct from the first page on


async def test_eviction_under_small_capacity_sends_block_removed(session: aiohttp.ClientSession) -> None:
    m = load_kv_events("0.5.10.post1")
    dec = msgspec.msgpack.Decoder(m.KVEventBatch)
    async with SimFleet(1, time_scale=FAST, kv_capacity_tokens=256) as f:
        tap = await tap_events(session, f.urls[0], f.event_endpoints[0] or "")
        try:
            for i in range(4):  # 4 x (6-7 pages) > 16 pages: the oldest prompts' pages are evicted
                status, _ = await generate(session, f.urls[0], prompt(i), max_new_tokens=4)
                assert status == 200

            def removed() -> list[int]:
                return [
                    h
                    for b in tap.decoded(dec)
                    for e in b.events
                    if isinstance(e, m.BlockRemoved)
                    for h in e.block_hashes
                ]

            await wait_for(lambda: len(removed()) > 0, what="BlockRemoved events")
            batches = tap.decoded(dec)
            seqs = [s for _, s, _ in tap.frames]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # one batch per step, no gaps
            stored = [e for b in batches for e in b.events if isinstance(e, m.BlockStored)]
            stored_hashes = {h for e in stored for h in e.block_hashes}
            assert set(removed()) <= stored_hashes  # every removal names a page announced before
            # Page hashes are SGLang's chain over the page tokens, parents link the chain.
            toks = ByteTokenizer().encode(prompt(0))
            hx, first = sglang_page_hash(toks[:16], None)
            _, second = sglang_page_hash(toks[16:32], hx)
            by_hash = {e.block_hashes[0]: e for e in stored}
            assert by_hash[first].parent_block_hash is None and list(by_hash[first].token_ids) == toks[:16]
            assert by_hash[second].parent_block_hash == first and by_hash[second].block_size == 16
            assert by_hash[first].medium == "GPU"
            # The oldest prompt lost pages: its cache hit is now partial at most.
            eng = f.engines[0]
            assert eng.cache.tree_tokens <= 256 and eng.cache.evicted_tokens_total > 0
            _, again = await generate(session, f.urls[0], prompt(0), max_new_tokens=1)
            assert again["meta_info"]["cached_tokens"] < (len(toks) - 1) // 16 * 16
        finally:
            await tap.close()


@pytest.mark.parametrize(("form", "version"), [("array", "0.5.10.post1"), ("map", "0.5.23")])
async def test_flush_sends_all_blocks_cleared_in_both_forms(
    session: aiohttp.ClientSession, form: str, version: str
) -> None:
    m = load_kv_events(version)
    dec = msgspec.msgpack.Decoder(m.KVEventBatch)
    async with SimFleet(1, time_scale=FAST, event_form=form) as f:  # type: ignore[arg-type]
        tap = await tap_events(session, f.urls[0], f.event_endpoints[0] or "")
        try:
            await generate(session, f.urls[0], prompt(1), max_new_tokens=2)
            await wait_for(lambda: len(tap.frames) > 0, what="BlockStored batch")
            stored = [e for b in tap.decoded(dec) for e in b.events if isinstance(e, m.BlockStored)]
            n_pages = sum(len(e.block_hashes) for e in stored)
            assert n_pages == 6
            if form == "map":  # 0.5.23 merges a chain of pages into one event
                assert len(stored) == 1 and len(stored[0].token_ids) == 6 * 16
            else:
                assert len(stored) == 6 and all(len(e.token_ids) == 16 for e in stored)
            tap.frames.clear()
            async with session.post(f.urls[0] + "/flush_cache") as r:
                assert r.status == 200
            await wait_for(lambda: len(tap.frames) > 0, what="AllBlocksCleared batch")
            (batch,) = tap.decoded(dec)
            assert [type(e).__name__ for e in batch.events] == ["AllBlocksCleared"]
        finally:
            await tap.close()

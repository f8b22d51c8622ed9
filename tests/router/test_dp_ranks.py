"""Data-parallel engines (`--dp-size 2`): events from every rank, the index per (worker, rank), and requests
routed to the rank that holds their prefix with SGLang's `routed_dp_rank` (`--dp-aware`)."""

from __future__ import annotations

from typing import Any

import aiohttp

from kvroute.engines.sim.fleet import SimFleet
from kvroute.router.dp import RankFoldedIndex, choose_rank, owner, rank_key
from tests.router.conftest import wait_until


async def _engine_generate(session: aiohttp.ClientSession, url: str, text: str, rank: int) -> dict[str, Any]:
    body = {"text": text, "sampling_params": {"max_new_tokens": 2}, "routed_dp_rank": rank}
    async with session.post(url + "/generate", json=body) as resp:
        assert resp.status == 200
        out: dict[str, Any] = await resp.json()
        return out


async def test_the_simulated_engine_has_ranks_with_their_own_caches() -> None:
    async with SimFleet(workers=1, time_scale=0.01, dp_size=2) as fleet, aiohttp.ClientSession() as s:
        url = fleet.urls[0]
        async with s.get(url + "/server_info") as resp:
            info = await resp.json()
        assert info["dp_size"] == 2 and [x["dp_rank"] for x in info["kv_event_sources"]] == [0, 1]
        text = "rank-local prefix " * 20
        await _engine_generate(s, url, text, 1)
        again = await _engine_generate(s, url, text, 1)
        other = await _engine_generate(s, url, text, 0)
        assert again["meta_info"]["cached_tokens"] > 0  # same rank: its cache has the prefix
        assert other["meta_info"]["cached_tokens"] == 0  # the other rank's cache does not


async def test_dp_aware_routes_each_prompt_to_the_rank_holding_it(start_router: Any) -> None:
    async with SimFleet(workers=1, time_scale=0.01, dp_size=2) as fleet, aiohttp.ClientSession() as s:
        url = fleet.urls[0]
        r = await start_router(worker_urls=(url,), policy="kv_aware", dp_aware=True)
        await r.wait_healthy(1)
        d = r.registry.describe(url)
        assert d["dp_size"] == 2 and d["kv_events_ranks"] == 2 and d["kv_events_subscribed"]
        a, b = "document A " * 30, "document B " * 30
        await _engine_generate(s, url, a, 0)  # warm each rank with its own prompt, behind the router's back
        await _engine_generate(s, url, b, 1)
        idx = r.core.ranked
        await wait_until(
            lambda: (
                idx.index.block_count(rank_key(url, 0)) > 0 and idx.index.block_count(rank_key(url, 1)) > 0
            ),
            5.0,
            "both ranks' events",
        )
        for text, rank in ((b + "and more", 1), (a + "and more", 0), (b + "again", 1)):
            async with r.session.post(r.url + "/generate", json={"text": text}) as resp:
                body = await resp.json()
                assert resp.status == 200 and resp.headers["X-Kvroute-Dp-Rank"] == str(rank)
                assert body["meta_info"]["cached_tokens"] > 0  # served from that rank's cache
        async with r.session.post(r.url + "/v1/completions", json={"prompt": a, "routed_dp_rank": 1}) as resp:
            assert resp.headers["X-Kvroute-Dp-Rank"] == "1"  # a rank the client names is kept
        assert r.core.rank_load.get(url, 0) == 0 and r.core.rank_load.get(url, 1) == 0
        stats = r.core.index_stats()["workers"][url]
        assert stats["blocks"] > 0 and stats["stream"]["ranks"] == 2


async def test_without_dp_aware_one_stream_and_no_rank_field(start_router: Any) -> None:
    async with SimFleet(workers=1, time_scale=0.01, dp_size=2) as fleet:
        r = await start_router(worker_urls=tuple(fleet.urls), policy="kv_aware")
        await r.wait_healthy(1)
        assert r.registry.describe(fleet.urls[0])["kv_events_ranks"] == 1
        async with r.session.post(r.url + "/generate", json={"text": "x " * 40}) as resp:
            assert resp.status == 200 and "X-Kvroute-Dp-Rank" not in resp.headers


def test_rank_keys_fold_and_choice() -> None:
    from kvroute.cache_index.hashing import BlockHash
    from kvroute.cache_index.radix import RadixIndex, StoredBlock

    def chain(n: int) -> list[StoredBlock]:
        return [StoredBlock(BlockHash(i), i) for i in range(1, n + 1)]  # type: ignore[arg-type]

    assert owner(rank_key("http://w:1", 3)) == "http://w:1" and owner("http://w:1") == "http://w:1"
    index = RadixIndex()
    folded = RankFoldedIndex(index)
    index.store(rank_key("http://w:1", 1), None, chain(3))
    index.store(rank_key("http://w:1", 0), None, chain(1))
    index.store("http://v:1", None, chain(2))
    hashes = [BlockHash(i) for i in (1, 2, 3)]
    assert folded.match(hashes) == index.match(hashes)  # no ranked worker yet: the raw answer
    folded.ranks["http://w:1"] = 2
    assert folded.match(hashes) == {"http://w:1": 3, "http://v:1": 2}
    assert folded.rank_overlaps("http://w:1", hashes) == [1, 3]
    assert folded.block_count("http://w:1") == 4
    assert choose_rank([1, 3], [5, 0]) == 1  # most cached
    assert choose_rank([2, 2], [3, 1]) == 1  # then least loaded
    assert choose_rank([0, 0], [0, 0]) == 0  # then the lowest rank

"""Engines of any page size over loopback: simulated SGLang engines with --page-size 1 (SGLang's
default) and a fleet mixing page sizes 1 and 16, routed under --block-size 16 with their real events."""

from __future__ import annotations

import asyncio
import random

from kvroute.engines.sim.fleet import SimFleet
from tests.router.conftest import wait_until
from tests.router.test_app_e2e import blocks_on, generate

_RNG = random.Random(11)
PREFIXES = ["".join(_RNG.choice("abcdefghij ") for _ in range(500)) for _ in range(2)]  # 31 blocks + 4


async def test_page_size_one_engines_are_routed_with_their_events(start_router) -> None:
    async with SimFleet(workers=2, time_scale=0.01, page_size=1) as fleet:
        r = await start_router(worker_urls=tuple(fleet.urls), policy="kv_aware", block_size=16)
        await r.wait_healthy(2, timeout=10)
        assert {d["page_size"] for d in r.registry.describe_all()} == {1}
        holder, _ = await generate(r.session, r.url, PREFIXES[0] + " first question")
        # cached token by token (one BlockStored per page): the prefix's 31 whole router blocks
        await wait_until(lambda: blocks_on(r, holder, PREFIXES[0]) == 31, what="folded blocks indexed")
        for i in range(3):
            w, cached = await generate(r.session, r.url, PREFIXES[0] + f" follow-up {i}")
            assert (w, cached) == (holder, 31)
        assert r.core.worker_stats(holder).cached_tokens >= 3 * 500  # the engine agrees: cache hits


async def test_a_fleet_mixing_page_sizes_1_and_16_hits_the_cache_on_both(start_router) -> None:
    async with (
        SimFleet(workers=1, time_scale=0.01, page_size=1) as small,
        SimFleet(workers=1, time_scale=0.01, page_size=16) as big,
    ):
        (p1,), (p16,) = small.urls, big.urls
        r = await start_router(worker_urls=(p1, p16), policy="kv_aware", block_size=16)
        await r.wait_healthy(2, timeout=10)
        # Two tenants, sent together: the idle fleet places them on different engines.
        first = await asyncio.gather(*(generate(r.session, r.url, p + " first") for p in PREFIXES))
        homes = [w for w, _ in first]
        assert sorted(homes) == sorted([p1, p16])
        for home, prefix in zip(homes, PREFIXES, strict=True):
            await wait_until(lambda h=home, p=prefix: blocks_on(r, h, p) == 31, what="blocks indexed")
        for _ in range(2):
            for home, prefix in zip(homes, PREFIXES, strict=True):
                w, cached = await generate(r.session, r.url, prefix + " again")
                assert (w, cached) == (home, 31)
        for url in (p1, p16):
            st = r.core.worker_stats(url)
            assert st.cached_tokens >= 2 * 496  # each engine reports the hits itself

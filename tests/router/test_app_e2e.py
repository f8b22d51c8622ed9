"""End to end over loopback: the router in front of a simulated SGLang fleet with real KV events."""

from __future__ import annotations

import asyncio
import random

import aiohttp
import pytest

from kvroute.engines.sim.fleet import SimFleet
from tests.router.conftest import wait_until

_RNG = random.Random(7)
PREFIX = "".join(_RNG.choice("abcdefghij ") for _ in range(512))  # 32 blocks of 16 bytes


def blocks_on(r, url: str, text: str) -> int:  # type: ignore[no-untyped-def]
    """Leading blocks of `text` the router's event-fed index places on `url`."""
    rr = r.core.routing_request(text=text)
    return r.core.index.match(rr.block_hashes).get(url, 0)


async def generate(
    session: aiohttp.ClientSession, base: str, text: str, max_tokens: int = 2
) -> tuple[str, int]:
    body = {"text": text, "sampling_params": {"max_new_tokens": max_tokens, "ignore_eos": True}}
    async with session.post(base + "/generate", json=body) as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()
        return resp.headers.get("X-Kvroute-Worker", base), int(resp.headers.get("X-Kvroute-Cached-Blocks", 0))


async def test_kv_aware_follows_the_prefix_and_spreads_unrelated(start_router) -> None:
    async with SimFleet(workers=3, time_scale=0.01) as fleet:
        r = await start_router(worker_urls=tuple(fleet.urls), policy="kv_aware")
        await r.wait_healthy(3, timeout=10)
        assert all(d["kv_events_subscribed"] for d in r.registry.describe_all())
        holder, _ = await generate(r.session, r.url, PREFIX + " first question")
        await wait_until(lambda: blocks_on(r, holder, PREFIX) == 32, what="prefix blocks indexed from events")
        for i in range(5):
            w, cached = await generate(r.session, r.url, PREFIX + f" follow-up {i}")
            assert w == holder and cached == 32
        # Unrelated prompts, sent together: nothing is cached anywhere, load spreads them.
        rng = random.Random(1)
        texts = ["".join(rng.choice("klmnopqrst") for _ in range(512)) for _ in range(6)]
        results = await asyncio.gather(*(generate(r.session, r.url, t, max_tokens=8) for t in texts))
        assert len({w for w, _ in results}) == 3
        assert all(c == 0 for _, c in results)
        # The engines' own cached_tokens agree that the follow-ups hit the cache.
        assert r.core.worker_stats(holder).cached_tokens >= 5 * 512 - 16


async def test_router_started_in_front_of_a_warm_fleet_knows_its_cache_once_healthy(start_router) -> None:
    """A (re)started router replays each engine's buffered KV events while registering it, so the
    first request after readiness already follows the prefix; nothing is learned mid-traffic."""
    async with SimFleet(workers=2, time_scale=0.01) as fleet:
        w0, w1 = fleet.urls
        async with aiohttp.ClientSession() as direct:  # warm w1 before any router exists
            await generate(direct, w1, PREFIX + " seed")
        r = await start_router(worker_urls=tuple(fleet.urls), policy="kv_aware")
        await r.wait_healthy(2, timeout=10)
        assert blocks_on(r, w1, PREFIX) == 32 and blocks_on(r, w0, PREFIX) == 0  # no wait, no live event
        w, cached = await generate(r.session, r.url, PREFIX + " first routed question")
        assert w == w1 and cached == 32


async def test_evicted_prefix_stops_attracting_traffic(start_router) -> None:
    async with SimFleet(workers=2, time_scale=0.01, kv_capacity_tokens=2048) as fleet:
        r = await start_router(worker_urls=tuple(fleet.urls), policy="kv_aware")
        await r.wait_healthy(2, timeout=10)
        w0, w1 = fleet.urls
        # Seed both engines with the prefix, bypassing the router.
        async with aiohttp.ClientSession() as direct:
            for url in (w0, w1):
                await generate(direct, url, PREFIX + " seed")
            await wait_until(
                lambda: blocks_on(r, w0, PREFIX) == 32 and blocks_on(r, w1, PREFIX) == 32,
                what="prefix indexed on both workers",
            )
            w, cached = await generate(r.session, r.url, PREFIX + " q0")
            assert w == w0 and cached == 32  # tie on cost: the first candidate
            # Push the prefix out of w0's cache (LRU): its BlockRemoved events reach the index.
            rng = random.Random(2)
            for _ in range(6):
                await generate(direct, w0, "".join(rng.choice("uvwxyz") for _ in range(512)), max_tokens=1)
            await wait_until(lambda: blocks_on(r, w0, PREFIX) == 0, what="BlockRemoved applied")
        for i in range(3):
            w, cached = await generate(r.session, r.url, PREFIX + f" q{i + 1}")
            assert w == w1 and cached == 32


async def test_refusing_engine_is_routed_around_and_removal_drops_index(start_router) -> None:
    async with SimFleet(workers=2, time_scale=0.01) as fleet:
        r = await start_router(worker_urls=tuple(fleet.urls), policy="round_robin", max_retries=1)
        await r.wait_healthy(2, timeout=10)
        w0, w1 = fleet.urls
        for i in range(2):
            await generate(r.session, r.url, PREFIX + str(i))
        await wait_until(lambda: r.core.index.block_count(w0) > 0, what="w0 indexed")
        await fleet.servers[0].close()  # w0 dies: its pooled connections drop, new ones are refused
        for i in range(4):
            w, _ = await generate(r.session, r.url, f"other prompt {i}" * 8)
            assert w == w1
        async with r.session.delete(r.url + "/admin/workers", params={"url": w0}) as resp:
            assert resp.status == 200
        assert r.core.index.block_count(w0) == 0 and r.core.get_worker(w0) is None


@pytest.mark.slow
async def test_demo_runs_both_policies() -> None:
    from kvroute.router.demo import DemoConfig, run_demo

    lines: list[str] = []
    cfg = DemoConfig(
        workers=2,
        duration_s=1.5,
        rate=10,
        groups=4,
        prefix_tokens=256,
        output_tokens=4,
        kv_capacity_tokens=0,
        profile="tiny",
        time_scale=0.05,
    )
    results = await run_demo(cfg, out=lines.append)
    assert [r.policy for r in results] == ["round_robin", "kv_aware"]
    assert all(r.ttft_s and r.errors == 0 for r in results)
    kv = results[1]
    assert kv.cached_tokens / kv.prompt_tokens > 0.3  # repeated prefixes hit the cache
    assert any(line.startswith("kv_aware") for line in lines)

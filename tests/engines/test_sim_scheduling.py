"""Waiting-queue scheduling as SGLang 0.5.10 does it: fcfs | lpm, in-batch caching, re-match at admission.

The tiny profile prefills at most 1024 tokens per step (chunked_prefill_size) with 16-token pages.
Each test holds the scheduler (the stall fault) while it queues a burst, so the whole burst is waiting
when the first batch is formed, as when a burst lands on a busy SGLang server.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from kvroute.engines.core import GenerateRequest
from kvroute.engines.prefix_cache import PrefixCache
from kvroute.engines.sim.engine import SimConfig, SimEngine
from kvroute.engines.sim.faults import FaultConfig
from kvroute.engines.sim.fleet import build_parser, fleet_from_args
from kvroute.engines.sim.schedule_policy import LPM_MAX_WAITING, SchedulePolicy
from tests.engines.conftest import FAST, wait_for


def prompt(tenant: int, prefix: int, i: int, suffix: int = 32) -> list[int]:
    """`prefix` tokens shared by a tenant, then `suffix` tokens of this request only."""
    return [tenant * 100_000 + t for t in range(prefix)] + [5_000_000 + i * 1000 + t for t in range(suffix)]


async def run_burst(policy: str, prompts: dict[str, list[int]]) -> dict[str, int]:
    """Queue every prompt on a held engine, release it, return cached_tokens per rid."""
    eng = SimEngine(
        SimConfig(time_scale=FAST, kv_events=False, schedule_policy=policy, faults=FaultConfig(stall=True))  # type: ignore[arg-type]
    )
    await eng.start()

    async def one(rid: str, ids: list[int]) -> None:
        async for _ in eng.generate(GenerateRequest(rid=rid, input_ids=ids, max_new_tokens=2)):
            pass

    try:
        tasks = [asyncio.create_task(one(rid, ids)) for rid, ids in prompts.items()]
        await wait_for(lambda: len(eng.waiting) == len(prompts), what="the burst queued")
        eng.set_faults({"stall": False})
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        return {rid: eng.records_by_rid[rid].cached_tokens for rid in prompts}
    finally:
        await eng.close()


@pytest.mark.parametrize("policy", ["fcfs", "lpm"])
async def test_burst_sharing_a_long_prefix_is_cached_for_all_but_the_first(policy: str) -> None:
    # 2048 shared + 32 own tokens: the first request prefills over three steps; the others are admitted
    # in its last step, re-matched against the 2048 tokens its first two chunks put in the tree.
    cached = await run_burst(policy, {f"r{i}": prompt(1, 2048, i) for i in range(6)})
    assert cached == {"r0": 0, **{f"r{i}": 2048 for i in range(1, 6)}}


@pytest.mark.parametrize("policy", ["fcfs", "lpm"])
async def test_burst_that_fits_one_step_is_computed_cold_as_in_sglang(policy: str) -> None:
    # 3 x 288 tokens fit one 1024-token step: SGLang's PrefillAdder admits deprioritised requests too
    # while the budget lasts, so nobody finds the prefix cached (the limit of in-batch caching).
    cached = await run_burst(policy, {f"r{i}": prompt(1, 256, i) for i in range(3)})
    assert cached == {"r0": 0, "r1": 0, "r2": 0}


async def test_lpm_deprioritises_in_batch_sharers_so_later_ones_hit() -> None:
    # Two tenants, 448 shared + 32 own tokens each, queued a1 a2 a3 b1 b2 b3; two prompts fill a step.
    burst = {f"{t}{i}": prompt(n, 448, i) for n, t in ((1, "a"), (2, "b")) for i in range(1, 4)}
    fcfs = await run_burst("fcfs", burst)
    lpm = await run_burst("lpm", burst)
    # fcfs: step 1 takes a1, a2 and 64 tokens of a3 (all cold); step 2 b1 and 128 tokens of b2 (cold);
    # only b3 comes after b1 was cached.
    assert {r for r, c in fcfs.items() if c} == {"b3"}
    # lpm: a2, a3, b2, b3 are deprioritised behind b1, so step 1 runs a1, b1 and 64 tokens of a2;
    # in step 2 a3, b2 and b3 find their tenant's 448 tokens cached.
    assert {r for r, c in lpm.items() if c} == {"a3", "b2", "b3"}
    assert lpm["a3"] == lpm["b2"] == lpm["b3"] == 448
    assert sum(lpm.values()) > sum(fcfs.values())


def _order(policy: SchedulePolicy, cache: PrefixCache, prompts: list[list[int]]) -> list[int] | None:
    return policy.order(
        list(range(len(prompts))),
        lambda i: prompts[i],
        lambda i: cache.match_prefix(prompts[i]).cached_tokens,
    )


def test_policy_order_table() -> None:
    cache = PrefixCache(16, 10_000)
    cache.insert(prompt(9, 160, 0))  # tenant 9 has 160 tokens cached
    a1, a2, b1, c9 = prompt(1, 64, 1), prompt(1, 64, 2), prompt(2, 64, 3), prompt(9, 160, 4)
    lpm = SchedulePolicy("lpm")
    # fcfs never reorders
    assert _order(SchedulePolicy("fcfs"), cache, [a1, a2, b1, c9]) is None
    # lpm: the cached tenant first (160 matched), a2 deprioritised behind b1 (shares a1's first 32 tokens)
    assert _order(lpm, cache, [a1, a2, b1, c9]) == [3, 0, 2, 1]
    # in-batch caching off (check threshold -1): a longest-match sort only, stable among equals
    assert _order(SchedulePolicy("lpm", in_batch_check_threshold=-1), cache, [a1, a2, b1, c9]) == [3, 0, 1, 2]
    # sharing fewer than 32 leading tokens does not deprioritise
    short = [[7] * 31 + [1] * 40, [7] * 31 + [2] * 40]
    assert _order(lpm, cache, short) == [0, 1]
    # a request with a long cache match skips the in-batch check even if others share its head
    assert _order(lpm, cache, [c9, prompt(9, 160, 5), a1]) == [0, 1, 2]
    # over 128 waiting, SGLang turns lpm off for the round
    assert _order(lpm, cache, [a1] * (LPM_MAX_WAITING + 1)) is None


def test_unknown_policy_is_rejected() -> None:
    with pytest.raises(ValueError, match="fcfs, lpm"):
        SchedulePolicy("dfs-weight")  # type: ignore[arg-type]


async def test_fleet_lpm_burst_over_http_reports_cached_tokens(session: aiohttp.ClientSession) -> None:
    argv = ["--schedule-policy", "lpm", "--profile", "tiny", "--base-port", "0", "--time-scale", str(FAST)]
    args = build_parser().parse_args(argv)
    args.stall = True  # hold the scheduler until the whole burst is queued
    async with fleet_from_args(args) as f:
        eng = f.engines[0]
        assert eng.policy.name == "lpm"
        sampling = {"max_new_tokens": 2}
        bodies = [{"input_ids": prompt(3, 2048, i), "sampling_params": sampling} for i in range(4)]
        tasks = [asyncio.create_task(session.post(f.urls[0] + "/generate", json=b)) for b in bodies]
        try:
            await wait_for(lambda: len(eng.waiting) == 4, what="the burst queued")
            await f.set_faults(0, stall=False)
            resps = await asyncio.gather(*tasks)
            metas = []
            for r in resps:
                assert r.status == 200
                metas.append((await r.json())["meta_info"])
                r.release()
        finally:
            for t in tasks:
                t.cancel()
        cached = sorted(m["cached_tokens"] for m in metas)
        assert cached == [0, 2048, 2048, 2048]


def test_extend_match_resumes_and_restarts_after_eviction() -> None:
    cache = PrefixCache(16, 256)
    ids = list(range(160))
    keys = cache.page_keys(ids)
    cache.insert(ids[:64])
    node, pages = cache.extend_match(keys, None, 0)
    assert pages == 4 and node is not None
    cache.insert(ids[:128])  # the prompt grew in the tree: the match resumes from page 4
    node, pages = cache.extend_match(keys, node, pages)
    assert pages == 8 and node is not None and node.alive
    assert cache.alloc(256)  # evicts every page: the old node is dead, the match restarts from the root
    node, pages = cache.extend_match(keys, node, pages)
    assert (node, pages) == (None, 0)


@pytest.mark.parametrize("enabled", [True, False])
async def test_priority_scheduling_admits_larger_priority_first(enabled: bool) -> None:
    """SGLang's --enable-priority-scheduling (fcfs): by priority, larger first, then arrival; a request
    without a priority goes last. Off, the queue stays in arrival order. One 1024-token step each."""
    eng = SimEngine(
        SimConfig(
            time_scale=FAST,
            kv_events=False,
            enable_priority_scheduling=enabled,
            faults=FaultConfig(stall=True),
        )  # fmt: skip
    )
    await eng.start()
    order: list[str] = []

    async def one(rid: str, prio: int | None, i: int) -> None:
        req = GenerateRequest(rid=rid, input_ids=prompt(i, 1000, i), max_new_tokens=1, priority=prio)
        async for _ in eng.generate(req):
            pass
        order.append(rid)

    try:
        arrivals = [("none", None), ("low", 0), ("high", 2), ("mid", 1), ("high2", 2)]
        tasks = []
        for i, (rid, prio) in enumerate(arrivals):
            tasks.append(asyncio.create_task(one(rid, prio, i)))
            await wait_for(lambda n=i + 1: len(eng.waiting) == n, what=f"{rid} queued")
        eng.set_faults({"stall": False})
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
    finally:
        await eng.close()
    assert order == (["high", "high2", "mid", "low", "none"] if enabled else [a[0] for a in arrivals])


def test_priority_scheduling_needs_fcfs() -> None:
    with pytest.raises(ValueError, match="fcfs"):
        SimEngine(SimConfig(schedule_policy="lpm", enable_priority_scheduling=True))

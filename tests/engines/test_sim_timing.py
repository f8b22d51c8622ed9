"""Timing model: measured points, growth with load, cache hits, chunked prefill, KV-limited admission."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from kvroute.engines.sim.fleet import SimFleet
from kvroute.engines.sim.profiles import get_profile, h100_llama3_8b
from tests.engines.conftest import FAST, generate, wait_for


def test_profile_reproduces_measured_points_and_readme_sanity_figures() -> None:
    p = h100_llama3_8b()
    assert p.linear(4096) == pytest.approx(83.4886, abs=1e-3)  # a measured point, exactly
    assert p.decode_attn(64, 4096) == pytest.approx(12.3484, abs=1e-3)
    assert p.prefill_attn(2048, 8192) == pytest.approx(33.9364, abs=1e-3)
    # README: 64 sequences at 4k context ~ 6.1 + 12.3 ms; an 8k cold prefill ~ 0.21 s
    assert p.step_ms([], 64, 64 * 4096) == pytest.approx(18.5 + p.step_overhead_ms, abs=0.2)
    assert p.step_ms([(8192, 0)], 0, 0) == pytest.approx(210, abs=2)
    assert get_profile("tiny").step_ms([(8192, 0)], 0, 0) == pytest.approx(21.0, abs=0.3)


@pytest.mark.parametrize(
    ("smaller", "larger"),
    [
        (([], 16, 16 * 1024), ([], 64, 64 * 1024)),  # more sequences in the batch
        (([], 64, 64 * 1024), ([], 64, 64 * 8192)),  # longer contexts
        (([(1024, 0)], 0, 0), ([(4096, 0)], 0, 0)),  # more new prompt tokens
        (([(1024, 0)], 0, 0), ([(1024, 16384)], 0, 0)),  # the same chunk over a longer cached prefix
        (([], 256, 256 * 4096), ([], 256, 256 * 9000)),  # extrapolated past the table grows too
    ],
)
def test_step_cost_grows_with_load(smaller: tuple, larger: tuple) -> None:  # type: ignore[type-arg]
    p = h100_llama3_8b()
    assert p.step_ms(*smaller) < p.step_ms(*larger)


async def test_cached_prompt_has_lower_ttft_in_simulated_time(session: aiohttp.ClientSession) -> None:
    text = "0123456789abcdef" * 250  # 4000 tokens: 4 chunks of 1024 when cold
    async with SimFleet(1, time_scale=FAST) as f:
        eng = f.engines[0]
        steps0 = eng.steps
        _, cold = await generate(session, f.urls[0], text, max_new_tokens=1, rid="cold")
        assert eng.steps - steps0 == 4  # chunked prefill: one step per 1024-token chunk
        _, warm = await generate(session, f.urls[0], text, max_new_tokens=1, rid="warm")
        assert warm["meta_info"]["cached_tokens"] == 3984
        ttft_cold, ttft_warm = eng.records_by_rid["cold"].ttft, eng.records_by_rid["warm"].ttft
        assert ttft_cold is not None and ttft_warm is not None
        assert ttft_warm < ttft_cold / 4  # one short chunk against four full ones
        # An idle engine starts at the arrival: TTFT is exactly the step costs, whatever the host did.
        prof = eng.profile
        assert ttft_warm == pytest.approx(prof.step_ms([(16, 3984)], 0, 0) / 1000, rel=1e-6)
        cold_steps = [(1024, 0), (1024, 1024), (1024, 2048), (928, 3072)]
        assert ttft_cold == pytest.approx(sum(prof.step_ms([c], 0, 0) for c in cold_steps) / 1000, rel=1e-6)


async def test_kv_capacity_limits_admission(session: aiohttp.ClientSession) -> None:
    # Each request reserves prompt + max_new = 100 + 400 tokens of a 1024-token pool: two fit, a third waits.
    async with SimFleet(1, time_scale=1.0, kv_capacity_tokens=1024) as f:
        eng = f.engines[0]
        texts = [f"{i}" * 100 for i in range(3)]
        tasks = [asyncio.create_task(generate(session, f.urls[0], t, max_new_tokens=400)) for t in texts]
        try:
            await wait_for(lambda: eng.load().num_waiting_reqs == 1, what="a request queued for KV")
            assert eng.load().num_running_reqs == 2
            results = await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
        assert [s for s, _ in results] == [200, 200, 200]
        assert eng.cache.private_tokens == 0 and eng.cache.tree_tokens <= 1024

"""The comparison report's TTFT phase breakdown: engine-reported queue and prefill, and the rest."""

from __future__ import annotations

import math

import pytest

from kvroute.bench.compare import phase_table, ttft_phases
from kvroute.bench.loadgen import RequestResult


def _r(ttft: float, queue: float | None, prefill: float | None) -> RequestResult:
    return RequestResult(
        "r", "x", True, 100, 0.0, ttft_s=ttft, engine_queue_s=queue, engine_prefill_s=prefill
    )


def test_means_add_up_and_clamp_to_the_ttft() -> None:
    p = ttft_phases([_r(1.0, 0.6, 0.3), _r(0.5, 0.1, 0.2), _r(0.2, 0.5, 0.1)])
    # third: the engine's queue (0.5) exceeds what the client saw (0.2): clamped, prefill gets 0
    assert p["ttft_queue_mean"] == pytest.approx((0.6 + 0.1 + 0.2) / 3)
    assert p["ttft_prefill_mean"] == pytest.approx((0.3 + 0.2 + 0.0) / 3)
    assert p["ttft_rest_mean"] == pytest.approx((0.1 + 0.2 + 0.0) / 3)
    assert ttft_phases([_r(1.0, None, None)]) == {}  # no engine timings (OpenAI APIs)


def test_phase_table_names_the_dominant_phase() -> None:
    from kvroute.bench.compare import Summary

    base = dict(rate=1.0, requests=1, ok=1, ttft_p50=0, ttft_p99=0, itl_p50=0, itl_p99=0, e2e_mean=0,
                throughput_tok_s=0, req_s=0, hit_ratio=0, ceiling=0, hit_share_of_ceiling=0, per_worker=[1],
                worker_max_over_mean=1, ttft_lower_bound_mean=0, goodput_req_s=0, goodput_fraction=0,
                wall_s=0, host_overhead_s=0, owner_affinity=math.nan)  # fmt: skip
    rr = Summary(
        router="rr", ttft_mean=3.0, ttft_queue_mean=2.4, ttft_prefill_mean=0.5, ttft_rest_mean=0.1, **base
    )
    kv = Summary(
        router="kv", ttft_mean=0.5, ttft_queue_mean=0.1, ttft_prefill_mean=0.3, ttft_rest_mean=0.1, **base
    )
    blind = Summary(router="sg", ttft_mean=1.0, **base)
    table = phase_table([rr, kv, blind]).splitlines()
    assert (
        table[2].startswith("| rr |") and table[2].endswith("| engine queue |") and "2.400 (80%)" in table[2]
    )
    assert table[3].endswith("| prefill |")
    assert "(no engine timings)" in table[4]

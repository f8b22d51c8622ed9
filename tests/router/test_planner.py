"""Planner maths: queueing, decode batch under an ITL target, worker counts, feedback, CLI and hook."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace

import pytest

from kvroute.engines.sim.profiles import h100_llama3_8b
from kvroute.router import planner
from kvroute.router.planner import ObservedLoad, PlanError, PlanTargets, plan

PROFILE = h100_llama3_8b()


def test_md1_wait_matches_pollaczek_khinchine() -> None:
    # rho = 0.5, S = 0.1 s: W = rho S / (2 (1 - rho)) = 0.05 s
    assert planner.md1_wait_s(5.0, 0.1) == pytest.approx(0.05)
    assert planner.md1_wait_s(0.0, 0.1) == 0.0
    assert planner.md1_wait_s(10.0, 0.1) == math.inf  # saturated


def test_prefill_service_is_sum_of_chunks_and_grows_with_cached_prefix() -> None:
    chunk = PROFILE.chunked_prefill_size
    one = planner.prefill_service_s(PROFILE, chunk, 0)
    assert one == pytest.approx(PROFILE.step_ms([(chunk, 0)], 0, 0) / 1000)
    two = planner.prefill_service_s(PROFILE, 2 * chunk, 0)
    # the second chunk attends over the first: strictly more than twice the first
    assert two > 2 * one
    assert planner.prefill_service_s(PROFILE, 1000, 8000) > planner.prefill_service_s(PROFILE, 1000, 0)
    assert planner.prefill_service_s(PROFILE, 0, 5000) == 0.0


@pytest.mark.parametrize("itl", [0.01, 0.02, 0.05])
def test_max_decode_batch_is_the_largest_meeting_the_itl(itl: float) -> None:
    b = planner.max_decode_batch(PROFILE, itl, context=2000, kv_per_seq=2200)
    assert b >= 1
    assert planner.decode_step_s(PROFILE, b, 2000) <= itl
    cap = min(PROFILE.max_running_requests, PROFILE.max_total_tokens // 2200)
    assert b == cap or planner.decode_step_s(PROFILE, b + 1, 2000) > itl


def test_max_decode_batch_is_bounded_by_kv_capacity() -> None:
    # 100k-token sequences: the 400k-token pool holds 4 whatever the ITL target
    assert planner.max_decode_batch(PROFILE, 10.0, context=90_000, kv_per_seq=100_000) == 4


def test_decode_count_covers_token_demand() -> None:
    targets = PlanTargets(ttft_slo_s=5.0, itl_slo_s=0.03)
    low = plan(ObservedLoad(1.0, 1000, 200), targets, PROFILE)
    high = plan(ObservedLoad(200.0, 1000, 200), targets, PROFILE)
    assert low.decode_workers == 1
    tps = high.figures["decode_tokens_per_s_per_worker"]
    # exactly ceil(demand / per-worker rate)
    assert high.decode_workers == math.ceil(200.0 * 200 / tps)
    assert high.decode_workers > 1


def test_prefill_count_meets_ttft_target_and_is_minimal() -> None:
    load = ObservedLoad(20.0, 6000, 100)
    targets = PlanTargets(ttft_slo_s=0.5, itl_slo_s=0.05)
    p = plan(load, targets, PROFILE)
    assert p.feasible
    assert p.figures["modelled_ttft_s"] <= 0.5
    assert p.figures["prefill_utilization"] <= targets.max_utilization
    service = p.figures["prefill_service_s"]
    tail = p.figures["transfer_s"] + planner.decode_step_s(PROFILE, 1, 6050)
    fewer = p.prefill_workers - 1
    # one worker fewer breaks the TTFT target or the utilisation ceiling
    assert fewer == 0 or (
        planner.prefill_ttft_s(20.0, fewer, service, tail) > 0.5
        or 20.0 * service / fewer > targets.max_utilization
    )


def test_cache_hits_reduce_prefill_workers() -> None:
    targets = PlanTargets(ttft_slo_s=0.4, itl_slo_s=0.05)
    cold = plan(ObservedLoad(30.0, 8000, 100, cache_hit_ratio=0.0), targets, PROFILE)
    warm = plan(ObservedLoad(30.0, 8000, 100, cache_hit_ratio=0.9), targets, PROFILE)
    assert warm.prefill_workers < cold.prefill_workers


def test_infeasible_targets_are_reported() -> None:
    # one 8k-token prefill takes far more than 10 ms on an H100
    p = plan(ObservedLoad(1.0, 8000, 10), PlanTargets(ttft_slo_s=0.01, itl_slo_s=0.05), PROFILE)
    assert not p.feasible
    assert any("TTFT target" in line for line in p.reasoning)
    q = plan(ObservedLoad(1.0, 1000, 10), PlanTargets(ttft_slo_s=5.0, itl_slo_s=0.0001), PROFILE)
    assert not q.feasible and any("ITL target" in line for line in q.reasoning)


def test_measured_latency_above_model_scales_the_plan_up() -> None:
    targets = PlanTargets(ttft_slo_s=0.6, itl_slo_s=0.03)
    base = ObservedLoad(10.0, 4000, 300, 0.3, current_prefill=2, current_decode=2)
    modelled = plan(base, targets, PROFILE)
    slow = plan(replace(base, measured_ttft_s=1.5, measured_itl_s=0.045), targets, PROFILE)
    assert slow.figures["prefill_correction"] > 1.0 and slow.figures["decode_correction"] > 1.0
    assert slow.prefill_workers > modelled.prefill_workers
    assert slow.decode_workers > modelled.decode_workers
    assert any("change: prefill 2 ->" in line for line in slow.reasoning)


def test_correction_is_clamped() -> None:
    p = plan(
        ObservedLoad(1.0, 1000, 100, measured_itl_s=100.0, current_decode=1),
        PlanTargets(ttft_slo_s=5.0, itl_slo_s=1000.0),
        PROFILE,
    )
    assert p.figures["decode_correction"] == planner.CORRECTION_BOUNDS[1]


def test_zero_load_plans_one_of_each() -> None:
    p = plan(ObservedLoad(0.0, 0.0, 0.0), PlanTargets(), PROFILE)
    assert (p.prefill_workers, p.decode_workers, p.feasible) == (1, 1, True)


@pytest.mark.parametrize("kwargs", [dict(ttft_slo_s=0), dict(itl_slo_s=-1), dict(max_utilization=1.0)])
def test_bad_targets_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(PlanError):
        PlanTargets(**kwargs)


def test_bad_load_rejected() -> None:
    with pytest.raises(PlanError):
        ObservedLoad(1.0, 100, 10, cache_hit_ratio=1.5)


def test_cli_json_output(capsys: pytest.CaptureFixture[str]) -> None:
    rc = planner.main(
        [
            "--request-rate",
            "10",
            "--prompt-tokens",
            "4000",
            "--output-tokens",
            "300",
            "--ttft-slo",
            "0.5",
            "--itl-slo",
            "0.03",
            "--json",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out["prefill_workers"] >= 1 and out["decode_workers"] >= 1 and out["feasible"] is True
    assert out["reasoning"]


def test_cli_bad_input_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    rc = planner.main(
        ["--request-rate", "1", "--prompt-tokens", "10", "--output-tokens", "1", "--cache-hit", "2"]
    )
    assert rc == 2
    assert "cache_hit_ratio" in capsys.readouterr().err


def test_scale_hook_receives_the_plan_on_stdin(tmp_path: pytest.TempPathFactory) -> None:
    out = tmp_path / "plan.json"  # type: ignore[operator]
    script = f"import sys, pathlib; pathlib.Path({str(out)!r}).write_text(sys.stdin.read())"
    cmd = f"{sys.executable} -c {json.dumps(script)}"
    rc = planner.main(
        ["--request-rate", "5", "--prompt-tokens", "2000", "--output-tokens", "100", "--scale-hook", cmd]
    )
    assert rc == 0
    got = json.loads(out.read_text())
    assert set(got) >= {"prefill_workers", "decode_workers", "reasoning", "figures"}


def test_scale_hook_failure_is_the_exit_status() -> None:
    cmd = f"{sys.executable} -c 'import sys; sys.exit(3)'"
    rc = planner.main(
        ["--request-rate", "5", "--prompt-tokens", "2000", "--output-tokens", "100", "--scale-hook", cmd]
    )
    assert rc == 3


def test_plan_from_query_parses_targets_and_rejects_garbage() -> None:
    load = ObservedLoad(5.0, 2000, 100, 0.5, current_prefill=1, current_decode=1)
    out = planner.plan_from_query(load, {"ttft_slo": "0.4", "itl_slo": "0.02"})
    assert out["targets"]["ttft_slo_s"] == 0.4 and out["targets"]["itl_slo_s"] == 0.02
    assert out["observed"]["request_rate"] == 5.0 and out["plan"]["prefill_workers"] >= 1
    json.dumps(out)  # JSON-ready
    with pytest.raises(PlanError):
        planner.plan_from_query(load, {"ttft_slo": "fast"})
    with pytest.raises(PlanError):
        planner.plan_from_query(load, {"profile": "no-such-gpu"})


def test_spread_of_prompt_lengths_needs_more_prefill_than_the_mean_prompt() -> None:
    """Heavy-tailed prompts (most 4k, a few 100k) cost more than their mean's cost (attention grows
    faster than linearly) and queue longer (M/G/1): the plan with samples asks for more prefill."""
    samples = tuple([(4000, 0)] * 95 + [(100_000, 0)] * 5)
    mean = sum(p for p, _ in samples) / len(samples)
    targets = PlanTargets(ttft_slo_s=2.0, itl_slo_s=0.1)
    flat = plan(ObservedLoad(6.0, mean, 100), targets, PROFILE)
    spread = plan(ObservedLoad(6.0, mean, 100, prompt_samples=samples), targets, PROFILE)
    assert spread.figures["prefill_service_spread"] > 2.0
    assert spread.prefill_workers > flat.prefill_workers
    assert spread.figures["prefill_service_s"] > flat.figures["prefill_service_s"]

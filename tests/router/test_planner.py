"""Planner maths: queueing, decode batch under an ITL target, worker counts, feedback, CLI and hook."""

from __future__ import annotations

import heapq
import json
import math
import random
import sys
from dataclasses import replace

import pytest

from kvroute.engines.sim.profiles import h100_llama3_8b
from kvroute.router import planner
from kvroute.router.planner import ObservedLoad, PlanError, PlanTargets, plan

PROFILE = h100_llama3_8b()


def test_erlang_c_matches_known_values() -> None:
    assert planner.erlang_c(1, 0.7) == pytest.approx(0.7)  # M/M/1: P(wait) = rho
    assert planner.erlang_c(2, 1.0) == pytest.approx(1 / 3)  # M/M/2 at rho 0.5
    assert planner.erlang_c(4, 0.0) == 0.0
    assert planner.erlang_c(3, 3.0) == 1.0  # saturated


def test_wait_tail_is_exact_for_mm1() -> None:
    # M/M/1, rate 5, mean 0.1 s: P(W > t) = rho exp(-(mu - rate) t)
    tail = planner.mgc_wait_tail(5.0, 1, 0.1, scv=1.0)
    for t in (0.0, 0.1, 0.5):
        assert 1 - tail.within(t) == pytest.approx(0.5 * math.exp(-5.0 * t))
    assert tail.mean_s == pytest.approx(0.1)  # rho / (mu - rate)
    assert planner.mgc_wait_tail(20.0, 1, 0.1, 1.0).within(100.0) == 0.0  # saturated


def _mgc_fcfs(rate: float, c: int, services: list[float], tails: list[float], slo: float) -> float:
    """Discrete-event M/G/c, one FIFO line: the share of feasible requests within `slo`."""
    rng = random.Random(1)
    free = [0.0] * c
    t, ok, feasible = 0.0, 0, 0
    for _ in range(100_000):
        t += rng.expovariate(rate)
        j = rng.randrange(len(services))
        start = max(t, heapq.heappop(free))
        heapq.heappush(free, start + services[j])
        if services[j] + tails[j] <= slo:
            feasible += 1
            ok += start - t + services[j] + tails[j] <= slo
    return ok / feasible


@pytest.mark.parametrize(("c", "rho"), [(2, 0.6), (4, 0.8), (8, 0.85)])
def test_attainment_model_agrees_with_a_simulated_mgc_queue(c: int, rho: float) -> None:
    rng = random.Random(7)
    services = [min(12.0, rng.lognormvariate(-1.2, 1.2)) for _ in range(500)]  # heavy-tailed, cs^2 ~3
    tails = [0.02] * len(services)
    rate = rho * c / (sum(services) / len(services))
    model = planner.ttft_attainment(rate, c, services, tails, 5.0)
    assert model.infeasible_share > 0  # a few samples cannot make 5 s at all
    assert model.attainment == pytest.approx(_mgc_fcfs(rate, c, services, tails, 5.0), abs=0.01)


def test_attainment_grows_with_the_pool() -> None:
    services = [0.2] * 90 + [3.0] * 10
    tails = [0.01] * 100
    rate = 3.2 / 0.48  # more than 3 workers serve (E[S] = 0.48 s)
    got = [planner.ttft_attainment(rate, c, services, tails, 4.0).attainment for c in range(3, 12)]
    assert got[0] == 0.0  # saturated: nothing is promised
    assert all(b >= a for a, b in zip(got, got[1:], strict=False)) and got[-1] > 0.999


def test_prefill_pool_is_the_least_meeting_the_attainment_target() -> None:
    samples = tuple([(4000, 0)] * 90 + [(40_000, 0)] * 10)
    mean = sum(p for p, _ in samples) / len(samples)
    for want in (0.9, 0.99):
        targets = PlanTargets(ttft_slo_s=3.0, itl_slo_s=0.1, ttft_attainment=want)
        p = plan(ObservedLoad(8.0, mean, 100, prompt_samples=samples), targets, PROFILE)
        assert p.feasible and p.figures["modelled_ttft_attainment"] >= want
        services = [planner.prefill_service_s(PROFILE, pt, 0) for pt, _ in samples]
        tails = [
            PROFILE.transfer_ms(pt) / 1000 + planner.decode_step_s(PROFILE, 1, mean + 50) for pt, _ in samples
        ]
        fewer = p.prefill_workers - 1
        # one worker fewer misses the attainment target or the utilisation ceiling
        assert fewer == 0 or (
            planner.ttft_attainment(8.0, fewer, services, tails, 3.0).attainment < want
            or 8.0 * p.figures["prefill_service_s"] / fewer > targets.max_utilization
        )
    loose = plan(ObservedLoad(8.0, mean, 100, prompt_samples=samples),
                 PlanTargets(3.0, 0.1, ttft_attainment=0.9), PROFILE)  # fmt: skip
    assert p.prefill_workers > loose.prefill_workers  # the tighter target costs workers


def test_requests_that_cannot_make_the_target_do_not_grow_the_pool() -> None:
    """A 120k-token prompt takes longer than 5 s on an idle worker: it counts as infeasible (reported),
    and the pool is sized for the others, not grown to the search bound chasing it."""
    samples = tuple([(3000, 0)] * 95 + [(120_000, 0)] * 5)
    assert planner.prefill_service_s(PROFILE, 120_000, 0) > 5.0
    mean = sum(p for p, _ in samples) / len(samples)
    p = plan(ObservedLoad(4.0, mean, 100, prompt_samples=samples),
             PlanTargets(5.0, 0.1, ttft_attainment=0.99), PROFILE)  # fmt: skip
    assert p.feasible and p.prefill_workers < 10
    assert p.figures["ttft_infeasible_share"] == pytest.approx(0.05)
    assert p.figures["modelled_ttft_attainment_all"] == pytest.approx(
        p.figures["modelled_ttft_attainment"] * 0.95
    )
    assert any("5.0% of the requests cannot meet the TTFT target" in line for line in p.reasoning)


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
    samples = ((4000, 1200),) * 50
    base = ObservedLoad(10.0, 4000, 300, 0.3, current_prefill=2, current_decode=2, prompt_samples=samples)
    modelled = plan(base, targets, PROFILE)
    service = modelled.figures["prefill_service_s"]
    slow = plan(replace(base, measured_prefill_s=2.25 * service, measured_itl_s=0.045), targets, PROFILE)
    assert slow.figures["prefill_correction"] == pytest.approx(2.25 / planner.PREFILL_AGREEMENT[1])
    assert slow.figures["decode_correction"] > 1.0
    assert slow.prefill_workers > modelled.prefill_workers
    assert slow.decode_workers > modelled.decode_workers
    assert any("change: prefill 2 ->" in line for line in slow.reasoning)


def test_a_backlog_in_the_measured_ttft_does_not_grow_the_plan() -> None:
    """A surge's queue makes the measured TTFT huge while the engines' own prefill speed is as modelled:
    the plan follows the rate, never the backlog (correcting by TTFT had taken the pool to its cap)."""
    targets = PlanTargets(ttft_slo_s=5.0, itl_slo_s=0.1)
    samples = ((8000, 1000),) * 50
    base = ObservedLoad(6.0, 8000, 200, 0.125, current_prefill=3, current_decode=1, prompt_samples=samples)
    calm = plan(base, targets, PROFILE)
    service = calm.figures["prefill_service_s"]
    backlog = plan(replace(base, measured_ttft_s=40.0, measured_prefill_s=service), targets, PROFILE)
    assert backlog.prefill_workers == calm.prefill_workers
    assert backlog.figures["prefill_correction"] == pytest.approx(1.0)
    assert backlog.figures["measured_ttft_s"] == 40.0  # reported
    # shared steps under load read ~1.3x: agreement, no correction; a wildly slow measurement is bounded
    shared = plan(replace(base, measured_prefill_s=1.35 * service), targets, PROFILE)
    assert shared.figures["prefill_correction"] == 1.0 and shared.prefill_workers == calm.prefill_workers
    slow = plan(replace(base, measured_prefill_s=50 * service), targets, PROFILE)
    assert slow.figures["prefill_correction"] == planner.PREFILL_CORRECTION_BOUNDS[1]
    fast = plan(replace(base, measured_prefill_s=0.5 * service), targets, PROFILE)
    assert fast.figures["prefill_correction"] == pytest.approx(0.5 / planner.PREFILL_AGREEMENT[0])


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


@pytest.mark.parametrize(
    "kwargs",
    [dict(ttft_slo_s=0), dict(itl_slo_s=-1), dict(max_utilization=1.0), dict(ttft_attainment=1.0)],
)
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
    out = planner.plan_from_query(load, {"ttft_slo": "0.4", "itl_slo": "0.02", "ttft_attainment": "0.99"})
    assert out["targets"]["ttft_slo_s"] == 0.4 and out["targets"]["itl_slo_s"] == 0.02
    assert out["targets"]["ttft_attainment"] == 0.99
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


def test_burstiness_reads_bursts_of_arrivals() -> None:
    alone = [i * 1.0 for i in range(100)]
    assert planner.burstiness(alone, 0.05) == 1.0
    bursts = [float(i // 10) * 6.0 for i in range(100)]  # 10 at once every 6 s
    assert planner.burstiness(bursts, 0.05) == pytest.approx(10.0)
    assert planner.burstiness([], 0.05) == 1.0


def test_bursty_arrivals_need_a_larger_prefill_pool() -> None:
    """Ten requests at one instant queue behind each other even on an idle pool: the same rate in
    bursts needs more prefill workers than Poisson arrivals."""
    samples = tuple([(8000, 0)] * 90 + [(40_000, 0)] * 10)
    mean = sum(p for p, _ in samples) / len(samples)
    targets = PlanTargets(5.0, 0.1, ttft_attainment=0.98)
    poisson = plan(ObservedLoad(3.0, mean, 100, prompt_samples=samples), targets, PROFILE)
    bursty = plan(
        ObservedLoad(3.0, mean, 100, prompt_samples=samples, arrival_burstiness=10.0), targets, PROFILE
    )
    assert bursty.prefill_workers > poisson.prefill_workers
    assert bursty.figures["modelled_ttft_attainment"] >= 0.98


def test_attainment_model_with_bursts_is_close_to_simulation() -> None:
    """Bursts of 8 at once arriving as a Poisson stream: Allen-Cunneen with ca^2 = E[X^2]/E[X] (Erlang C
    for P(wait)) is within 4 points of a simulated G/G/c (it errs high here: a burst larger than the idle
    servers always waits, which Erlang C does not see)."""
    rng = random.Random(3)
    services = [min(12.0, rng.lognormvariate(-1.2, 1.2)) for _ in range(500)]
    tails = [0.02] * len(services)
    mean = sum(services) / len(services)
    for c, rho in ((4, 0.6), (6, 0.7)):
        rate = rho * c / mean
        sim = random.Random(5)
        free = [0.0] * c
        t, ok, feasible = 0.0, 0, 0
        for _ in range(10_000):
            t += sim.expovariate(rate / 8)
            for _ in range(8):
                j = sim.randrange(len(services))
                start = max(t, heapq.heappop(free))
                heapq.heappush(free, start + services[j])
                if services[j] + tails[j] <= 5.0:
                    feasible += 1
                    ok += start - t + services[j] + tails[j] <= 5.0
        model = planner.ttft_attainment(rate, c, services, tails, 5.0, arrival_scv=8.0).attainment
        assert model == pytest.approx(ok / feasible, abs=0.04)

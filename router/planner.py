"""The PD planner: how many prefill and decode workers a load needs to meet TTFT and ITL targets.

Capacity model: the simulator's GPU cost profile (`engines/sim/profiles.py`, measured on an H100).
- Prefill: one request's service time `S` is the sum of its chunked-prefill steps over its uncached
  tokens `U = prompt x (1 - hit)`, each chunk attending over the cached prefix and earlier chunks.
  Requests spread over `n` prefill workers form `n` M/G/1 queues at utilisation `rho = rate x E[S] / n`,
  whose mean wait is `(rate / n) E[S^2] / (2 (1 - rho))` (Pollaczek-Khinchine); E[S] and E[S^2] come
  from recent prompts' lengths when given (`prompt_samples`), else every prompt has the mean length
  (M/D/1). TTFT = wait + S + KV transfer + one
  decode step. The count is the least `n` whose TTFT meets the target and whose `rho` stays under
  `max_utilization`.
- Decode: the largest batch `B` whose step (B sequences at the mean context) fits the ITL target, the
  KV pool (`B x (prompt + output) <= max_total_tokens`) and `max_running_requests`, gives a worker's
  decode rate `B / step(B)` tokens/s; the count covers `rate x output` tokens/s.
- Feedback: when the fleet's current counts and measured TTFT/ITL are known, the model is corrected
  by the measurement (clamped to [0.5, 4]), as Dynamo's planner corrects its profile with observed
  latencies: decode by the ratio of measured to modelled ITL; prefill by the ratio of the service time
  that makes the queue model give the measured TTFT at the current rate and count to the modelled one
  (a long queue after a surge then scales the plan by what it says about capacity, not by its length).

Pure functions plus `main(argv)` for `kvroute plan`; `--scale-hook CMD` runs CMD only when given.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from kvroute.engines.sim.profiles import GpuProfile, get_profile

CORRECTION_BOUNDS = (0.5, 4.0)


class PlanError(ValueError):
    """The inputs cannot be planned for (non-positive lengths, bad targets, unknown profile)."""


@dataclass(frozen=True)
class ObservedLoad:
    """The load to plan for. Rates per second, lengths in tokens, latencies in seconds (None = unknown)."""

    request_rate: float
    prompt_tokens: float
    output_tokens: float
    cache_hit_ratio: float = 0.0
    measured_ttft_s: float | None = None
    measured_itl_s: float | None = None
    current_prefill: int | None = None
    current_decode: int | None = None
    prompt_samples: tuple[tuple[int, int], ...] = ()
    """(prompt tokens, cached tokens) of recent requests: with them the prefill queue is modelled with the
    spread of service times (M/G/1), not as if every prompt had the mean length (M/D/1). Long prompts cost
    more than linearly (attention), so the mean prompt's cost underestimates the mean cost."""

    def __post_init__(self) -> None:
        if self.request_rate < 0 or self.prompt_tokens < 0 or self.output_tokens < 0:
            raise PlanError("request rate and token lengths must be >= 0")
        if not 0.0 <= self.cache_hit_ratio <= 1.0:
            raise PlanError(f"cache_hit_ratio must be in [0, 1], got {self.cache_hit_ratio}")


@dataclass(frozen=True)
class PlanTargets:
    """SLA targets in seconds, and the headroom kept on each pool."""

    ttft_slo_s: float = 1.0
    itl_slo_s: float = 0.05
    max_utilization: float = 0.8
    """Highest prefill utilisation planned for (queues grow without bound as it nears 1)."""
    max_workers: int = 1024
    """Search bound per pool; a plan needing more reports the target infeasible."""

    def __post_init__(self) -> None:
        if self.ttft_slo_s <= 0 or self.itl_slo_s <= 0:
            raise PlanError("SLO targets must be positive seconds")
        if not 0.0 < self.max_utilization < 1.0:
            raise PlanError("max_utilization must be in (0, 1)")


@dataclass(frozen=True)
class Plan:
    """The recommendation and the figures behind it (JSON-ready via `as_dict`)."""

    prefill_workers: int
    decode_workers: int
    feasible: bool
    reasoning: tuple[str, ...]
    figures: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["reasoning"] = list(self.reasoning)
        return d


def prefill_service_s(profile: GpuProfile, uncached: float, cached: float) -> float:
    """Seconds one worker spends prefilling `uncached` tokens after `cached` ones, chunk by chunk."""
    remaining = int(math.ceil(uncached))
    prior = int(cached)
    chunk = max(1, profile.chunked_prefill_size)
    ms = 0.0
    while remaining > 0:
        n = min(chunk, remaining)
        ms += profile.step_ms([(n, prior)], 0, 0)
        prior += n
        remaining -= n
    return ms / 1000.0


def md1_wait_s(rate: float, service_s: float, second_moment: float | None = None) -> float:
    """Mean wait of an M/G/1 queue (Pollaczek-Khinchine: rate x E[S^2] / (2 (1 - rho))); with no second
    moment, E[S^2] = E[S]^2 (M/D/1). inf when saturated."""
    rho = rate * service_s
    if rho >= 1.0:
        return math.inf
    es2 = service_s * service_s if second_moment is None else second_moment
    return rate * es2 / (2.0 * (1.0 - rho))


def prefill_ttft_s(
    rate: float, n: int, service_s: float, tail_s: float, second_moment: float | None = None
) -> float:
    """Modelled mean TTFT with `n` prefill workers: queue wait + service + transfer and first decode step."""
    if n <= 0:
        return math.inf
    return md1_wait_s(rate / n, service_s, second_moment) + service_s + tail_s


def service_moments(profile: GpuProfile, samples: Sequence[tuple[int, int]]) -> tuple[float, float]:
    """E[S] and E[S^2] of the prefill service time over (prompt, cached) samples."""
    times = [prefill_service_s(profile, max(0, p - c), min(c, p)) for p, c in samples]
    return sum(times) / len(times), sum(t * t for t in times) / len(times)


def service_for_ttft(rate: float, n: int, ttft_s: float, tail_s: float, spread: float = 1.0) -> float:
    """The prefill service time S for which `prefill_ttft_s(rate, n, S, tail_s, spread x S^2)` equals
    `ttft_s` (bisection: the modelled TTFT grows with S up to saturation at S = n / rate). `spread`:
    E[S^2] / E[S]^2 of the service times (1: all alike)."""
    hi = n / rate
    lo = 0.0
    want = ttft_s - tail_s
    if want <= 0:
        return 1e-9
    for _ in range(60):
        mid = (lo + hi) / 2
        if md1_wait_s(rate / n, mid, spread * mid * mid) + mid < want:
            lo = mid
        else:
            hi = mid
    return max(lo, 1e-9)


def decode_step_s(profile: GpuProfile, batch: int, context: float) -> float:
    return profile.step_ms([], batch, int(batch * context)) / 1000.0


def max_decode_batch(
    profile: GpuProfile, itl_slo_s: float, context: float, kv_per_seq: float, scale: float = 1.0
) -> int:
    """Largest batch whose step (scaled by `scale`) meets the ITL target and fits KV and running limits."""
    kv_cap = int(profile.max_total_tokens // max(kv_per_seq, 1.0))
    hi = max(0, min(profile.max_running_requests, kv_cap))
    lo = 0
    while lo < hi:  # the step time grows with the batch: binary search the last batch that fits
        mid = (lo + hi + 1) // 2
        if decode_step_s(profile, mid, context) * scale <= itl_slo_s:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _clamp_ratio(x: float) -> float:
    lo, hi = CORRECTION_BOUNDS
    return min(max(x, lo), hi)


def plan(load: ObservedLoad, targets: PlanTargets, profile: GpuProfile) -> Plan:
    """Recommend worker counts for `load` under `targets`, with the reasoning in words and figures."""
    why: list[str] = []
    fig: dict[str, float] = {}
    feasible = True
    hit = load.cache_hit_ratio
    uncached = load.prompt_tokens * (1.0 - hit)
    cached = load.prompt_tokens * hit
    context = load.prompt_tokens + load.output_tokens / 2.0
    kv_per_seq = load.prompt_tokens + load.output_tokens

    # --- decode: batch that meets the ITL target, then the workers the token rate needs
    d_scale = 1.0
    if load.measured_itl_s and load.current_decode and load.request_rate > 0:
        in_decode = load.request_rate * load.output_tokens * load.measured_itl_s / load.current_decode
        b_now = max(1, round(in_decode))
        predicted = decode_step_s(profile, b_now, context)
        d_scale = _clamp_ratio(load.measured_itl_s / predicted)
        why.append(
            f"decode correction x{d_scale:.2f}: measured ITL {load.measured_itl_s * 1e3:.1f} ms vs "
            f"modelled {predicted * 1e3:.1f} ms at batch ~{b_now} per worker"
        )
    b_max = max_decode_batch(profile, targets.itl_slo_s, context, kv_per_seq, d_scale)
    step_one = decode_step_s(profile, 1, context) * d_scale
    if b_max == 0:
        feasible = False
        b_max = 1
        why.append(
            f"ITL target {targets.itl_slo_s * 1e3:.1f} ms is below one sequence's decode step "
            f"({step_one * 1e3:.1f} ms at context {context:.0f}): infeasible; planning for batch 1"
        )
    step_b = decode_step_s(profile, b_max, context) * d_scale
    decode_tps = b_max / step_b
    decode_demand = load.request_rate * load.output_tokens
    n_decode = max(1, math.ceil(decode_demand / decode_tps)) if decode_demand > 0 else 1
    if n_decode > targets.max_workers:
        feasible = False
        n_decode = targets.max_workers
    why.append(
        f"decode: batch <= {b_max} per worker keeps a step at {step_b * 1e3:.1f} ms "
        f"(<= ITL {targets.itl_slo_s * 1e3:.1f} ms, KV {kv_per_seq:.0f} tokens/seq), "
        f"{decode_tps:.0f} tokens/s per worker; demand {decode_demand:.0f} tokens/s "
        f"-> {n_decode} decode worker(s)"
    )
    fig.update(
        decode_batch_max=b_max,
        decode_step_s=step_b,
        decode_tokens_per_s_per_worker=decode_tps,
        decode_demand_tokens_per_s=decode_demand,
        decode_correction=d_scale,
    )

    # --- prefill: service time, then the least n whose modelled TTFT meets the target
    service = prefill_service_s(profile, uncached, cached)
    spread = 1.0  # E[S^2] / E[S]^2
    if load.prompt_samples:
        service, second = service_moments(profile, load.prompt_samples)
        spread = second / (service * service) if service > 0 else 1.0
        fig.update(prefill_service_spread=spread)
        why.append(
            f"prefill service over {len(load.prompt_samples)} recent prompts: mean {service * 1e3:.0f} ms, "
            f"E[S^2]/E[S]^2 {spread:.2f} (M/G/1 queue)"
        )
    transfer = profile.transfer_ms(int(load.prompt_tokens)) / 1000.0
    tail = transfer + step_one
    p_scale = 1.0
    if load.measured_ttft_s and load.current_prefill and load.request_rate > 0 and service > 0:
        predicted = prefill_ttft_s(
            load.request_rate, load.current_prefill, service, tail, spread * service * service
        )
        if math.isfinite(predicted) and predicted > 0:
            # The service time that makes the queue model give the measured TTFT: a queue grown long
            # (a surge, heavy-tailed prompts) raises the wait steeply near saturation, so this scales the
            # service by far less than measured/modelled TTFT would (no over-reaction to a transient).
            effective = service_for_ttft(
                load.request_rate, load.current_prefill, load.measured_ttft_s, tail, spread
            )
            # Never below the model: a TTFT measured early in a surge (queue not built yet) read as
            # "faster than modelled" halved the plan just as the load tripled.
            p_scale = min(max(1.0, effective / service), CORRECTION_BOUNDS[1])
            why.append(
                f"prefill correction x{p_scale:.2f}: measured TTFT "
                f"{load.measured_ttft_s * 1e3:.0f} ms vs modelled {predicted * 1e3:.0f} ms "
                f"with {load.current_prefill} prefill worker(s)"
            )
        else:  # the load outruns the current pool: the rate already asks for more; the TTFT measured
            # while a queue builds says nothing about the service time (scaling it 4x overshot 6-fold)
            why.append(
                "prefill correction: none, the model says the current prefill pool is saturated "
                "(the plan grows it from the rate)"
            )
    service *= p_scale
    second = spread * service * service
    n_prefill = 1
    if load.request_rate > 0 and service > 0:
        n_prefill = max(1, math.ceil(load.request_rate * service / targets.max_utilization))
        while (
            prefill_ttft_s(load.request_rate, n_prefill, service, tail, second) > targets.ttft_slo_s
            and n_prefill < targets.max_workers
        ):
            n_prefill += 1
    ttft = prefill_ttft_s(load.request_rate, n_prefill, service, tail, second)
    floor = service + tail
    if floor > targets.ttft_slo_s:
        feasible = False
        why.append(
            f"TTFT target {targets.ttft_slo_s * 1e3:.0f} ms is below an idle worker's prefill "
            f"({service * 1e3:.0f} ms) plus transfer ({transfer * 1e3:.1f} ms): infeasible "
            f"by adding workers; planning for utilisation <= {targets.max_utilization:.0%}"
        )
        n_prefill = max(1, math.ceil(load.request_rate * service / targets.max_utilization))
        ttft = prefill_ttft_s(load.request_rate, n_prefill, service, tail, second)
    why.append(
        f"prefill: {uncached:.0f} uncached tokens/request (hit {hit:.0%}) take {service * 1e3:.1f} ms "
        f"per request; at {load.request_rate:.2f} req/s, {n_prefill} prefill worker(s) run at "
        f"{load.request_rate * service / n_prefill:.0%} with modelled TTFT {ttft * 1e3:.0f} ms "
        f"(target {targets.ttft_slo_s * 1e3:.0f} ms)"
    )
    fig.update(
        prefill_service_s=service,
        transfer_s=transfer,
        modelled_ttft_s=ttft,
        prefill_utilization=load.request_rate * service / n_prefill,
        prefill_correction=p_scale,
    )
    if load.current_prefill is not None and load.current_decode is not None:
        why.append(
            f"change: prefill {load.current_prefill} -> {n_prefill}, "
            f"decode {load.current_decode} -> {n_decode}"
        )
    return Plan(n_prefill, n_decode, feasible, tuple(why), fig)


def plan_from_query(
    load: ObservedLoad, query: Mapping[str, str], defaults: PlanTargets | None = None
) -> dict[str, Any]:
    """`GET /admin/plan?ttft_slo=0.5&itl_slo=0.03&profile=NAME`: the observed load, the targets and the
    plan, JSON-ready. PlanError (a 400) on a malformed parameter."""
    base = defaults if defaults is not None else PlanTargets()
    try:
        targets = PlanTargets(
            ttft_slo_s=float(query.get("ttft_slo", base.ttft_slo_s)),
            itl_slo_s=float(query.get("itl_slo", base.itl_slo_s)),
            max_utilization=float(query.get("max_utilization", base.max_utilization)),
        )
        profile = get_profile(query.get("profile", "h100-llama3-8b"))
    except ValueError as exc:  # PlanError is a ValueError too
        raise PlanError(str(exc)) from exc
    result = plan(load, targets, profile)
    observed = asdict(load)
    observed["prompt_samples"] = len(load.prompt_samples)  # how many; the pairs themselves stay out
    return {
        "observed": observed,
        "targets": asdict(targets),
        "profile": profile.name,
        "plan": result.as_dict(),
    }


def run_scale_hook(command: str, result: Plan, timeout_s: float = 60.0) -> int:
    """Run the operator's hook with the plan as JSON on stdin (no shell); returns its exit status."""
    argv = shlex.split(command)
    if not argv:
        raise PlanError("--scale-hook is empty")
    payload = json.dumps(result.as_dict()).encode()
    proc = subprocess.run(argv, input=payload, timeout=timeout_s, check=False)
    return proc.returncode


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvroute plan", description="Recommend prefill/decode worker counts.")
    p.add_argument("--request-rate", type=float, required=True, help="requests per second")
    p.add_argument("--prompt-tokens", type=float, required=True, help="mean prompt length (tokens)")
    p.add_argument("--output-tokens", type=float, required=True, help="mean output length (tokens)")
    p.add_argument("--cache-hit", type=float, default=0.0, help="fraction of prompt tokens cached, 0..1")
    p.add_argument("--measured-ttft", type=float, default=None, help="observed mean TTFT (s)")
    p.add_argument("--measured-itl", type=float, default=None, help="observed mean ITL (s)")
    p.add_argument("--current-prefill", type=int, default=None, help="prefill workers serving now")
    p.add_argument("--current-decode", type=int, default=None, help="decode workers serving now")
    p.add_argument("--ttft-slo", type=float, default=1.0, help="TTFT target (s)")
    p.add_argument("--itl-slo", type=float, default=0.05, help="inter-token latency target (s)")
    p.add_argument("--max-utilization", type=float, default=0.8, help="prefill utilisation ceiling")
    p.add_argument("--profile", default="h100-llama3-8b", help="GPU cost profile name or calibration JSON")
    p.add_argument("--scale-hook", default=None, help="command run with the plan as JSON on stdin")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`kvroute plan ...`: 0 on a feasible plan, 1 when a target cannot be met, 2 on bad input."""
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    try:
        profile = get_profile(args.profile)
        load = ObservedLoad(
            args.request_rate,
            args.prompt_tokens,
            args.output_tokens,
            args.cache_hit,
            args.measured_ttft,
            args.measured_itl,
            args.current_prefill,
            args.current_decode,
        )
        targets = PlanTargets(args.ttft_slo, args.itl_slo, args.max_utilization)
        result = plan(load, targets, profile)
    except (PlanError, ValueError) as exc:
        print(f"kvroute plan: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.as_dict(), indent=1))
    else:
        print(
            f"prefill workers: {result.prefill_workers}\ndecode workers:  {result.decode_workers}"
            f"\nfeasible: {'yes' if result.feasible else 'no'} (profile {profile.name})"
        )
        for line in result.reasoning:
            print(f"- {line}")
    if args.scale_hook:
        rc = run_scale_hook(args.scale_hook, result)
        if rc != 0:
            print(f"kvroute plan: scale hook exited with {rc}", file=sys.stderr)
            return rc
    return 0 if result.feasible else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""The PD planner: how many prefill and decode workers a load needs to meet TTFT and ITL targets.

Capacity model: the simulator's GPU cost profile (`engines/sim/profiles.py`, measured on an H100).
- Prefill: one request's service time `S` is the sum of its chunked-prefill steps over its uncached
  tokens `U = prompt x (1 - hit)`, each chunk attending over the cached prefix and earlier chunks.
  kv_aware routing sends a prefill to the worker with the least queued prefill work, so the pool
  behaves as one G/G/c queue (one FIFO line, `c` servers), not `c` separate M/G/1 queues. Its waiting
  time has the tail P(W > t) ~= C(c, a) exp(-theta t), C the Erlang-C probability of waiting at offered
  load `a = rate x E[S]`, theta = (c / E[S] - rate) x 2 / (ca^2 + cs^2), cs^2 = Var[S] / E[S]^2 (the
  Allen-Cunneen correction of the M/M/c tail for the spread of service times) and ca^2 the arrivals'
  burstiness (`arrival_burstiness`: 1 for Poisson arrivals; E[X^2] / E[X] when requests arrive in
  bursts of X at once, as a compound Poisson stream's index of dispersion). A request meets the TTFT
  target when its wait + its own S + KV transfer + one decode step fits it; the pool's modelled TTFT
  attainment is that probability averaged over recent prompts (`prompt_samples`; without them every
  prompt has the mean length). Prompts whose own unqueued prefill already misses the target can never
  make it: the attainment target (`PlanTargets.ttft_attainment`) applies to the others, and their share
  is reported as infeasible (planning for them would grow the pool without bound). The count is the least
  `c` whose attainment meets the target and whose utilisation stays under `max_utilization`. Sizing for the
  share of requests within the target, not for the mean TTFT, matters for heavy-tailed prompts: a fleet
  whose mean TTFT is well within a 5 s target can have a fifth of its requests over it.
- Decode: the largest batch `B` whose step (B sequences at the mean context) fits the ITL target, the
  KV pool (`B x (prompt + output) <= max_total_tokens`) and `max_running_requests`, gives a worker's
  decode rate `B / step(B)` tokens/s; the count covers `rate x output` tokens/s.
- Feedback: when the fleet's measurements are known, the model is corrected by them, as Dynamo's planner
  corrects its profile with observed latencies: decode by the ratio of measured to modelled ITL (clamped
  to [0.5, 4]); prefill by the ratio of the measured queue-free prefill time (`measured_prefill_s`, the
  engine's queue time taken out) to the modelled service time of the same requests, beyond an agreement
  band (`prefill_correction`). The measured TTFT is reported, never used: while a surge builds a queue
  it measures the backlog, not capacity, and correcting by it ratchets the pool up on a transient.

Pure functions plus `main(argv)` for `kvroute plan`; `--scale-hook CMD` runs CMD only when given.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from kvroute.engines.sim.profiles import GpuProfile, get_profile

CORRECTION_BOUNDS = (0.5, 4.0)  # decode: measured / modelled ITL
PREFILL_CORRECTION_BOUNDS = (0.5, 2.0)  # prefill: measured / modelled queue-free service time, ...
PREFILL_AGREEMENT = (0.75, 1.5)  # ... of which this band counts as agreement: under load, requests admitted
# together share prefill steps (each one's measured prefill holds the others' chunks) and the router's
# clock adds its own delays: 1.27-1.40 measured against an exact simulator while the pool grew


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
    arrival_burstiness: float = 1.0
    """ca^2 of the arrival stream for the prefill queue: 1 = Poisson; E[X^2] / E[X] over the sizes X of
    the bursts requests arrive in (`burstiness`). Bursts queue behind each other even on an idle pool."""
    measured_prefill_s: float | None = None
    """Mean measured prefill time of the requests in `prompt_samples`, without their queueing (the
    engine's reported queue time taken out): corrects the modelled service time, never by the backlog."""

    def __post_init__(self) -> None:
        if self.request_rate < 0 or self.prompt_tokens < 0 or self.output_tokens < 0:
            raise PlanError("request rate and token lengths must be >= 0")
        if not 0.0 <= self.cache_hit_ratio <= 1.0:
            raise PlanError(f"cache_hit_ratio must be in [0, 1], got {self.cache_hit_ratio}")
        if self.arrival_burstiness <= 0:
            raise PlanError("arrival_burstiness must be > 0")


@dataclass(frozen=True)
class PlanTargets:
    """SLA targets in seconds, and the headroom kept on each pool."""

    ttft_slo_s: float = 1.0
    itl_slo_s: float = 0.05
    max_utilization: float = 0.8
    """Highest prefill utilisation planned for (queues grow without bound as it nears 1)."""
    max_workers: int = 1024
    """Search bound per pool; a plan needing more reports the target infeasible."""
    ttft_attainment: float = 0.95
    """Share of the requests that can meet the TTFT target (those whose own unqueued prefill fits it)
    that the prefill pool is sized to bring within it, in (0, 1)."""

    def __post_init__(self) -> None:
        if self.ttft_slo_s <= 0 or self.itl_slo_s <= 0:
            raise PlanError("SLO targets must be positive seconds")
        if not 0.0 < self.max_utilization < 1.0:
            raise PlanError("max_utilization must be in (0, 1)")
        if not 0.0 < self.ttft_attainment < 1.0:
            raise PlanError("ttft_attainment must be in (0, 1)")


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


def erlang_c(c: int, offered: float) -> float:
    """P(an arrival waits) in an M/M/c queue at offered load `offered` = rate x E[S] (1 when >= c)."""
    if offered <= 0:
        return 0.0
    if c <= 0 or offered >= c:
        return 1.0
    b = 1.0  # Erlang B by its recurrence (stable for large c)
    for k in range(1, c + 1):
        b = offered * b / (k + offered * b)
    rho = offered / c
    return b / (1.0 - rho + rho * b)


@dataclass(frozen=True)
class WaitTail:
    """An M/G/c queue's waiting time: P(W > t) ~= `p_wait` x exp(-`decay` t) (t >= 0)."""

    p_wait: float
    decay: float  # 1/s; 0 when saturated (every wait unbounded)

    def within(self, t: float) -> float:
        """P(W <= t)."""
        if t < 0:
            return 0.0
        if self.decay <= 0:
            return 1.0 - self.p_wait if self.p_wait < 1.0 else 0.0
        return 1.0 - self.p_wait * math.exp(-self.decay * t)

    @property
    def mean_s(self) -> float:
        return math.inf if self.decay <= 0 else self.p_wait / self.decay


def mgc_wait_tail(rate: float, c: int, mean_s: float, scv: float, arrival_scv: float = 1.0) -> WaitTail:
    """The waiting-time tail of `c` servers fed at `rate` with service times of mean `mean_s` and squared
    coefficient of variation `scv`: P(wait) times an exponential of rate (c / E[S] - rate) scaled by
    2 / (arrival_scv + scv) (Allen-Cunneen: the M/M/c wait stretched by the arrivals' burstiness and the
    service times' spread; arrival_scv 1 = Poisson). With bursts, P(wait) stays Erlang C: for bursts
    arriving as a Poisson stream the attainment comes out a few points high (tests/router/test_planner.py),
    for bursts at a steady period (this trace) a few points low; the burst sizes alone cannot tell them
    apart."""
    if rate <= 0 or mean_s <= 0:
        return WaitTail(0.0, math.inf)
    offered = rate * mean_s
    if c <= 0 or offered >= c:
        return WaitTail(1.0, 0.0)
    stretch = 2.0 / max(1e-9, arrival_scv + max(0.0, scv))
    return WaitTail(erlang_c(c, offered), (c / mean_s - rate) * stretch)


def burstiness(arrivals: Sequence[float], together_s: float) -> float:
    """E[X^2] / E[X] over the bursts in sorted arrival times (a burst: arrivals less than `together_s`
    apart): 1 when every request arrives alone (Poisson), ~X for bursts of X at once."""
    sizes: list[int] = []
    prev: float | None = None
    for t in arrivals:
        if prev is not None and t - prev < together_s:
            sizes[-1] += 1
        else:
            sizes.append(1)
        prev = t
    total = sum(sizes)
    return sum(x * x for x in sizes) / total if total else 1.0


@dataclass(frozen=True)
class TtftAttainment:
    """Modelled share of requests within the TTFT target, among those that can make it unqueued."""

    attainment: float
    infeasible_share: float  # requests whose own prefill + transfer + first step exceeds the target
    wait: WaitTail


def ttft_attainment(
    rate: float,
    c: int,
    services: Sequence[float],
    tails: Sequence[float],
    slo_s: float,
    arrival_scv: float = 1.0,
) -> TtftAttainment:
    """P(wait <= slo - S_i - tail_i) averaged over the samples whose `S_i + tail_i` fits `slo_s`
    (`services`: the samples' prefill service times; `tails`: their transfer + first decode step;
    `arrival_scv`: the arrivals' burstiness, 1 = Poisson)."""
    n = len(services)
    mean = sum(services) / n if n else 0.0
    scv = (sum(x * x for x in services) / n) / (mean * mean) - 1.0 if mean > 0 else 0.0
    wait = mgc_wait_tail(rate, c, mean, scv, arrival_scv)
    slack = [slo_s - s - t for s, t in zip(services, tails, strict=True)]
    ok = [x for x in slack if x >= 0]
    infeasible = (n - len(ok)) / n if n else 0.0
    att = sum(wait.within(x) for x in ok) / len(ok) if ok else 0.0
    return TtftAttainment(att, infeasible, wait)


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


def least_pool(
    model: Callable[[int], TtftAttainment], want: float, lo: int, most: int
) -> tuple[int, TtftAttainment]:
    """The least count in [lo, most] whose modelled attainment reaches `want` (it grows with the count:
    doubling, then bisection), with its figures; `most` and its figures when none does."""
    hi, at_hi = lo, model(lo)
    while at_hi.attainment < want and hi < most:
        lo, hi = hi + 1, min(most, hi * 2)
        at_hi = model(hi)
    if at_hi.attainment < want:
        return hi, at_hi
    while lo < hi:
        mid = (lo + hi) // 2
        at_mid = model(mid)
        if at_mid.attainment >= want:
            hi, at_hi = mid, at_mid
        else:
            lo = mid + 1
    return hi, at_hi


def prefill_correction(ratio: float) -> float:
    """The prefill model's correction from measured / modelled queue-free prefill: 1 inside the agreement
    band, else the excess beyond it (continuous), bounded: the model is corrected only when it is wrong
    by more than load and the router's clock explain, and never so that a transient ratchets the pool."""
    lo, hi = PREFILL_AGREEMENT
    scale = ratio / hi if ratio > hi else ratio / lo if ratio < lo else 1.0
    return min(max(scale, PREFILL_CORRECTION_BOUNDS[0]), PREFILL_CORRECTION_BOUNDS[1])


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

    # --- prefill: service times, then the least n whose modelled TTFT attainment meets the target
    slo = targets.ttft_slo_s
    pairs: list[tuple[float, float, float]]  # (uncached, cached, prompt) tokens
    if load.prompt_samples:
        pairs = [(max(0, p - c), min(c, p), p) for p, c in load.prompt_samples]
    else:  # no samples: every prompt has the mean length (M/D/c)
        pairs = [(uncached, cached, load.prompt_tokens)]
    services = [prefill_service_s(profile, u, c) for u, c, _ in pairs]
    modelled_mean = sum(services) / len(services)
    p_scale = 1.0
    if load.measured_prefill_s and load.prompt_samples and modelled_mean > 0:
        ratio = load.measured_prefill_s / modelled_mean
        p_scale = prefill_correction(ratio)
        lo_b, hi_b = PREFILL_CORRECTION_BOUNDS
        why.append(
            f"prefill correction x{p_scale:.2f}: measured queue-free prefill "
            f"{load.measured_prefill_s * 1e3:.0f} ms vs modelled {modelled_mean * 1e3:.0f} ms per request "
            f"(x{ratio:.2f}; {PREFILL_AGREEMENT[0]:g}..{PREFILL_AGREEMENT[1]:g} counts as agreement, "
            f"only the excess corrects, within {lo_b:g}..{hi_b:g})"
        )
        fig.update(measured_prefill_ratio=ratio)
    services = [x * p_scale for x in services]
    tails = [profile.transfer_ms(int(pt)) / 1000.0 + step_one for _, _, pt in pairs]
    service = sum(services) / len(services)
    spread = sum(x * x for x in services) / len(services) / (service * service) if service > 0 else 1.0
    transfer = profile.transfer_ms(int(load.prompt_tokens)) / 1000.0
    if load.prompt_samples:
        fig.update(prefill_service_spread=spread)
        why.append(
            f"prefill service over {len(load.prompt_samples)} recent prompts: mean {service * 1e3:.0f} ms, "
            f"E[S^2]/E[S]^2 {spread:.2f}, arrival burstiness {load.arrival_burstiness:.2f} (one G/G/c "
            "queue: requests go to the least queued prefill)"
        )
    fig.update(arrival_burstiness=load.arrival_burstiness)
    rate = load.request_rate
    ca2 = load.arrival_burstiness
    want = targets.ttft_attainment
    n_prefill = max(1, math.ceil(rate * service / targets.max_utilization)) if rate > 0 else 1
    att = ttft_attainment(rate, n_prefill, services, tails, slo, ca2)
    if att.infeasible_share >= 1.0:
        feasible = False
        why.append(
            f"TTFT target {slo * 1e3:.0f} ms is below every request's unqueued prefill ({service * 1e3:.0f} "
            f"ms mean) plus transfer ({transfer * 1e3:.1f} ms): infeasible by adding workers; planning "
            f"for utilisation <= {targets.max_utilization:.0%}"
        )
    else:
        if att.attainment < want:
            n_prefill, att = least_pool(
                lambda c: ttft_attainment(rate, c, services, tails, slo, ca2), want, n_prefill,
                targets.max_workers,
            )  # fmt: skip
        if att.attainment < want:
            feasible = False
            why.append(
                f"TTFT attainment {want:.1%} is not reached with {targets.max_workers} prefill workers: "
                "infeasible"
            )
        if att.infeasible_share > 0:
            why.append(
                f"{att.infeasible_share:.1%} of the requests cannot meet the TTFT target even unqueued "
                f"(own prefill + transfer > {slo * 1e3:.0f} ms): the attainment target applies to the rest"
            )
    ttft = att.wait.mean_s + service + transfer + step_one
    util = rate * service / n_prefill
    overall = att.attainment * (1.0 - att.infeasible_share)
    why.append(
        f"prefill: {uncached:.0f} uncached tokens/request (hit {hit:.0%}) take {service * 1e3:.1f} ms "
        f"per request on average; at {rate:.2f} req/s, {n_prefill} prefill worker(s) run at {util:.0%}, "
        f"P(wait) {att.wait.p_wait:.1%}, modelled {att.attainment:.1%} of the feasible requests within "
        f"TTFT {slo * 1e3:.0f} ms (target {want:.1%}; {overall:.1%} of all), mean TTFT {ttft * 1e3:.0f} ms"
    )
    fig.update(
        prefill_service_s=service,
        transfer_s=transfer,
        modelled_ttft_s=ttft,
        modelled_ttft_attainment=att.attainment,
        modelled_ttft_attainment_all=overall,
        ttft_infeasible_share=att.infeasible_share,
        prefill_wait_probability=att.wait.p_wait,
        prefill_utilization=util,
        prefill_correction=p_scale,
    )
    if load.measured_ttft_s is not None:
        fig.update(measured_ttft_s=load.measured_ttft_s)
    if load.current_prefill is not None and load.current_decode is not None:
        why.append(
            f"change: prefill {load.current_prefill} -> {n_prefill}, "
            f"decode {load.current_decode} -> {n_decode}"
        )
    return Plan(n_prefill, n_decode, feasible, tuple(why), fig)


def plan_from_query(
    load: ObservedLoad, query: Mapping[str, str], defaults: PlanTargets | None = None
) -> dict[str, Any]:
    """`GET /admin/plan?ttft_slo=0.5&itl_slo=0.03&ttft_attainment=0.99&profile=NAME`: the observed load,
    the targets and the plan, JSON-ready. PlanError (a 400) on a malformed parameter."""
    base = defaults if defaults is not None else PlanTargets()
    try:
        targets = PlanTargets(
            ttft_slo_s=float(query.get("ttft_slo", base.ttft_slo_s)),
            itl_slo_s=float(query.get("itl_slo", base.itl_slo_s)),
            max_utilization=float(query.get("max_utilization", base.max_utilization)),
            max_workers=base.max_workers,
            ttft_attainment=float(query.get("ttft_attainment", base.ttft_attainment)),
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
    p.add_argument("--measured-ttft", type=float, default=None, help="observed mean TTFT (s), reported")
    p.add_argument(
        "--measured-prefill", type=float, default=None, help="observed mean prefill time without queueing (s)"
    )
    p.add_argument("--measured-itl", type=float, default=None, help="observed mean ITL (s)")
    p.add_argument("--current-prefill", type=int, default=None, help="prefill workers serving now")
    p.add_argument("--current-decode", type=int, default=None, help="decode workers serving now")
    p.add_argument("--ttft-slo", type=float, default=1.0, help="TTFT target (s)")
    p.add_argument("--itl-slo", type=float, default=0.05, help="inter-token latency target (s)")
    p.add_argument("--max-utilization", type=float, default=0.8, help="prefill utilisation ceiling")
    p.add_argument(
        "--ttft-attainment",
        type=float,
        default=PlanTargets.ttft_attainment,
        help="share of requests (of those that can) to bring within the TTFT target (default 0.95)",
    )
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
            measured_prefill_s=args.measured_prefill,
        )
        targets = PlanTargets(
            args.ttft_slo, args.itl_slo, args.max_utilization, ttft_attainment=args.ttft_attainment
        )
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

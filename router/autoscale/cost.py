"""GPU-seconds and cost per million output tokens served within the SLA (goodput tokens).

An operator pays for every GPU a worker holds from the moment it is started (booting and draining
included) until it is stopped, whether it serves or not; what they get is output tokens of requests
that met both the TTFT and the ITL target. `cost_per_million_goodput` is the one number that compares
a static fleet with an autoscaled one. Money is in whatever currency `gpu_hour_cost` is given in.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CostModel:
    """`gpu_hour_cost`: price of one GPU-hour (0 = unknown: GPU-seconds only); `gpus_per_worker`: GPUs one
    worker of each pool holds (e.g. {"prefill": 1, "decode": 2} for TP-2 decode engines)."""

    gpu_hour_cost: float = 0.0
    gpus_per_worker: Mapping[str, int] = field(
        default_factory=lambda: {"regular": 1, "prefill": 1, "decode": 1}
    )
    ttft_slo_s: float = 1.0
    itl_slo_s: float = 0.05

    def gpus(self, pool: str) -> int:
        return int(self.gpus_per_worker.get(pool, 1))


def within_sla(ttft_s: float | None, itls: list[float] | None, model: CostModel) -> bool:
    """A request meets the SLA when its TTFT and its mean inter-token gap are within the targets."""
    if ttft_s is None or ttft_s > model.ttft_slo_s:
        return False
    if itls:
        return sum(itls) / len(itls) <= model.itl_slo_s
    return True


def cost_per_million_goodput(gpu_seconds: float, gpu_hour_cost: float, goodput_tokens: int) -> float:
    """Cost of the GPU time divided by millions of goodput tokens (inf when none met the SLA; NaN when the
    GPU price is unknown)."""
    if gpu_hour_cost <= 0:
        return math.nan
    if goodput_tokens <= 0:
        return math.inf
    return gpu_seconds / 3600.0 * gpu_hour_cost / (goodput_tokens / 1e6)


def cost_figures(
    gpu_seconds: float, model: CostModel, output_tokens: int, goodput_tokens: int, requests: int, good: int
) -> dict[str, Any]:
    """The figures every report prints, JSON-ready (None where unknown or infinite)."""
    per_m = cost_per_million_goodput(gpu_seconds, model.gpu_hour_cost, goodput_tokens)
    return {
        "gpu_seconds": round(gpu_seconds, 3),
        "gpu_hour_cost": model.gpu_hour_cost or None,
        "cost": round(gpu_seconds / 3600.0 * model.gpu_hour_cost, 6) if model.gpu_hour_cost > 0 else None,
        "output_tokens": output_tokens,
        "goodput_tokens": goodput_tokens,
        "requests": requests,
        "requests_within_sla": good,
        "sla_attainment": good / requests if requests else None,
        "cost_per_million_goodput_tokens": per_m if math.isfinite(per_m) else None,
        "ttft_slo_s": model.ttft_slo_s,
        "itl_slo_s": model.itl_slo_s,
    }


class CostMeter:
    """GPU-seconds integrated over the pools' sizes, and goodput counted from served requests.

    `update(counts)` closes the span since the last update at the previous counts and starts a new one at
    `counts` (workers per pool); call it whenever a pool changes and before reading."""

    def __init__(self, model: CostModel, clock: Callable[[], float] = time.monotonic) -> None:
        self.model = model
        self.clock = clock
        self.started_at = clock()
        self._at = self.started_at
        self._counts: dict[str, int] = {}
        self.gpu_seconds_by_pool: dict[str, float] = {}
        self.requests = 0
        self.good = 0
        self.output_tokens = 0
        self.goodput_tokens = 0

    def update(self, counts: Mapping[str, int]) -> None:
        now = self.clock()
        dt = max(0.0, now - self._at)
        for pool, n in self._counts.items():
            self.gpu_seconds_by_pool[pool] = self.gpu_seconds_by_pool.get(pool, 0.0) + (
                dt * n * self.model.gpus(pool)
            )
        self._at = now
        self._counts = {k: int(v) for k, v in counts.items()}

    def record(self, ok: bool, ttft_s: float | None, itls: list[float] | None, output_tokens: int) -> None:
        """One finished request (failed ones count against attainment, and give no goodput)."""
        self.requests += 1
        if not ok:
            return
        self.output_tokens += output_tokens
        if within_sla(ttft_s, itls, self.model):
            self.good += 1
            self.goodput_tokens += output_tokens

    @property
    def counts(self) -> dict[str, int]:
        """Workers per pool since the last `update`."""
        return dict(self._counts)

    @property
    def gpu_seconds(self) -> float:
        return sum(self.gpu_seconds_by_pool.values())

    def report(self) -> dict[str, Any]:
        out = cost_figures(
            self.gpu_seconds, self.model, self.output_tokens, self.goodput_tokens, self.requests, self.good
        )
        out["gpu_seconds_by_pool"] = {k: round(v, 3) for k, v in self.gpu_seconds_by_pool.items()}
        out["gpus_now"] = {k: n * self.model.gpus(k) for k, n in self._counts.items()}
        out["since_s"] = round(self.clock() - self.started_at, 3)
        return out

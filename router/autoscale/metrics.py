"""The autoscaler's and the cost meter's Prometheus series, on the app's registry (prefix `kvroute_`).

Labels (bounded): `pool` (`prefill`, `decode`; `all` for a failure not tied to one pool), `action`
(`up`, `down`, `hold`), `scaler` (`sim`, `command`, `kubernetes`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from kvroute.router.autoscale.decide import Decision
from kvroute.router.metrics import LATEST


class AutoscaleMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.decisions = Counter(
            "kvroute_autoscale_decisions",
            "Autoscaler decisions by pool and action (hold included).",
            ["pool", "action"],
            registry=r,
        )
        self.pool_workers = Gauge(
            "kvroute_autoscale_pool_workers",
            "Workers in each pool at the last decision (starting ones included, leaving ones not).",
            ["pool"],
            registry=r,
            multiprocess_mode=LATEST,
        )
        self.pool_target = Gauge(
            "kvroute_autoscale_pool_target",
            "Each pool's size the last decision set (equal to pool_workers on a hold).",
            ["pool"],
            registry=r,
            multiprocess_mode=LATEST,
        )
        self.scaler_failures = Counter(
            "kvroute_autoscale_scaler_failures",
            "Failed scaler calls (each is retried with backoff).",
            ["pool", "scaler"],
            registry=r,
        )
        self.leader = Gauge(
            "kvroute_autoscale_leader",
            "1 on the replica that holds the autoscaler lease and acts (always 1 without replicas).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.gpu_seconds = Gauge(
            "kvroute_gpu_seconds",
            "GPU-seconds held by each pool since the router started (workers x GPUs per worker x time).",
            ["pool"],
            registry=r,
            multiprocess_mode=LATEST,
        )
        self.cost_per_million = Gauge(
            "kvroute_cost_per_million_goodput_tokens",
            "GPU cost per million output tokens of requests within the TTFT and ITL targets "
            "(NaN without --gpu-hour-cost or before any).",
            registry=r,
            multiprocess_mode=LATEST,
        )
        self.sla_attainment = Gauge(
            "kvroute_sla_attainment",
            "Fraction of finished requests within the TTFT and ITL targets, since the router started.",
            registry=r,
            multiprocess_mode=LATEST,
        )

    def observe_decision(self, d: Decision) -> None:
        self.decisions.labels(d.pool.value, d.action).inc()
        self.pool_workers.labels(d.pool.value).set(d.current)
        self.pool_target.labels(d.pool.value).set(d.target)

    def refresh_cost(self, report: Mapping[str, Any]) -> None:
        """From `CostMeter.report()` (called at scrape time)."""
        for pool, s in report.get("gpu_seconds_by_pool", {}).items():
            self.gpu_seconds.labels(pool).set(s)
        per_m = report.get("cost_per_million_goodput_tokens")
        self.cost_per_million.set(float("nan") if per_m is None else per_m)
        att = report.get("sla_attainment")
        self.sla_attainment.set(float("nan") if att is None else att)

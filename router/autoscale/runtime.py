"""The autoscaler and the cost meter of one router app, built from `RouterConfig` and run as a unit."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from kvroute.engines.sim.profiles import get_profile
from kvroute.router.autoscale.base import Scaler
from kvroute.router.autoscale.cost import CostMeter, CostModel
from kvroute.router.autoscale.decide import DecisionRules, PoolLimits
from kvroute.router.autoscale.lease import RedisLease
from kvroute.router.autoscale.loop import Autoscaler, AutoscaleSettings, paid_workers
from kvroute.router.autoscale.metrics import AutoscaleMetrics
from kvroute.router.autoscale.share import ObservationShare
from kvroute.router.config import ConfigError, RouterConfig
from kvroute.router.planner import PlanTargets
from kvroute.router.types import WorkerRole

log = logging.getLogger("kvroute.autoscale")

# Set before the app starts to run the loop over a scaler built elsewhere (tests, benches: a SimScaler
# over a fleet they hold); otherwise one is built from the configuration.
SCALER = web.AppKey("autoscale_scaler", object)


def settings_from_config(c: RouterConfig) -> AutoscaleSettings:
    return AutoscaleSettings(
        interval_s=c.autoscale_interval_s,
        window_s=c.autoscale_window_s,
        up_window_s=c.autoscale_up_window_s,
        shrink_min_samples=c.autoscale_shrink_min_samples,
        limits={
            WorkerRole.PREFILL: PoolLimits(c.autoscale_min_prefill, c.autoscale_max_prefill),
            WorkerRole.DECODE: PoolLimits(c.autoscale_min_decode, c.autoscale_max_decode),
        },
        rules=DecisionRules(
            up_cooldown_s=c.autoscale_up_cooldown_s,
            down_cooldown_s=c.autoscale_down_cooldown_s,
            hysteresis=c.autoscale_hysteresis,
            down_intervals=c.autoscale_down_intervals,
            max_step_down=c.autoscale_max_step_down,
        ),
        targets=plan_targets(c),
        drain_settle_s=2 * c.replica_ttl_s if c.redis_url else 0.0,
        time_scale=c.autoscale_sim_time_scale if c.autoscale_scaler == "sim" else 1.0,
    )


def plan_targets(c: RouterConfig) -> PlanTargets:
    """The planner's targets from the configuration (the autoscaler's, and `GET /admin/plan`'s defaults)."""
    return PlanTargets(
        c.slo_ttft_s, c.slo_itl_s, c.autoscale_max_utilization, ttft_attainment=c.autoscale_ttft_attainment
    )


def cost_model(c: RouterConfig) -> CostModel:
    return CostModel(
        gpu_hour_cost=c.gpu_hour_cost,
        gpus_per_worker={
            "regular": c.gpus_per_worker,
            "prefill": c.gpus_per_prefill_worker,
            "decode": c.gpus_per_decode_worker,
        },
        ttft_slo_s=c.slo_ttft_s,
        itl_slo_s=c.slo_itl_s,
    )


def build_scaler(c: RouterConfig) -> Scaler:
    """The scaler `autoscale_scaler` names (ConfigError when it cannot be built: no kubernetes_asyncio)."""
    if c.autoscale_scaler == "command":
        from kvroute.router.autoscale.command import CommandScaler

        return CommandScaler(c.autoscale_command or "", c.autoscale_command_timeout_s)
    if c.autoscale_scaler == "kubernetes":
        from kvroute.router.autoscale.kubernetes import KubernetesScaler

        return KubernetesScaler(
            c.autoscale_k8s_namespace,
            {
                WorkerRole.PREFILL: c.autoscale_k8s_prefill_deployment,
                WorkerRole.DECODE: c.autoscale_k8s_decode_deployment,
            },
        )
    from kvroute.router.autoscale.sim import SimScaler

    return SimScaler.create(
        profile=c.autoscale_profile,
        page_size=c.block_size,
        time_scale=c.autoscale_sim_time_scale,
        startup_s=c.autoscale_sim_startup_s,
    )


class AutoscaleRuntime:
    """The cost meter (always, in PD mode) and the autoscaler (with `--autoscale`) of one app."""

    def __init__(
        self,
        meter: CostMeter,
        autoscaler: Autoscaler | None,
        metrics: AutoscaleMetrics,
        targets: PlanTargets | None = None,
    ) -> None:
        self.meter = meter
        self.autoscaler = autoscaler
        self.metrics = metrics
        self.targets = targets if targets is not None else PlanTargets()

    def cost(self, workers: list[Any]) -> dict[str, Any]:
        """The cost report now; without the autoscaler the registered workers are the paid ones."""
        if self.autoscaler is None:
            self.meter.update(paid_workers(None, workers))
        else:
            self.meter.update(self.meter.counts)
        report = self.meter.report()
        self.metrics.refresh_cost(report)
        return report

    def status(self) -> dict[str, Any]:
        return self.autoscaler.status() if self.autoscaler is not None else {"enabled": False}


@contextlib.asynccontextmanager
async def autoscale_context(
    config: RouterConfig,
    app: web.Application,
    router: Any,
    registry: Any,
    pd_metrics: Any,
    registry_metrics: Any,
    replicas: Callable[[], Any],
) -> AsyncIterator[AutoscaleRuntime]:
    """Yields the runtime; starts the loop when `config.autoscale`, stops it (and an owned scaler) after."""
    metrics = AutoscaleMetrics(registry_metrics)
    meter = CostMeter(cost_model(config))

    def on_record(rec: Any) -> None:
        meter.record(rec.outcome == "ok", rec.ttft_s, rec.itls, rec.output_tokens)

    pd_metrics.listeners.append(on_record)
    if not config.autoscale:
        metrics.leader.set(0)
        try:
            yield AutoscaleRuntime(meter, None, metrics, plan_targets(config))
        finally:
            pd_metrics.listeners.remove(on_record)
        return
    given = app.get(SCALER)
    scaler: Scaler = given if given is not None else build_scaler(config)  # type: ignore[assignment]
    try:
        profile = get_profile(config.autoscale_profile)
    except ValueError as exc:
        raise ConfigError(f"autoscale_profile: {exc}") from exc
    rep = replicas()
    lease = share = None
    if rep is not None:
        share = ObservationShare(
            rep.client,
            f"{config.redis_key_prefix}:autoscale:observations",
            rep.replica_id,
            max_age_s=3 * config.autoscale_interval_s,
        )
        lease = RedisLease(
            rep.client,
            f"{config.redis_key_prefix}:autoscale:leader",
            rep.replica_id,
            ttl_s=max(3 * config.autoscale_interval_s, 3 * config.replica_ttl_s),
        )
    loop = Autoscaler(
        settings_from_config(config),
        scaler,
        registry,
        router.workers,
        pd_metrics.window,
        profile,
        meter=meter,
        metrics=metrics,
        leadership=lease,
        share=share,
        replicas=replicas,
    )
    loop.start()
    log.info(
        "autoscale on: scaler %s, every %.0fs, prefill %d..%d, decode %d..%d",
        scaler.name,
        config.autoscale_interval_s,
        config.autoscale_min_prefill,
        config.autoscale_max_prefill,
        config.autoscale_min_decode,
        config.autoscale_max_decode,
    )
    try:
        yield AutoscaleRuntime(meter, loop, metrics, plan_targets(config))
    finally:
        pd_metrics.listeners.remove(on_record)
        await loop.close()
        if given is None:
            await scaler.close()

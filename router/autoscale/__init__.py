"""Autoscaling of the PD pools from live demand (DESIGN.md round 2; docs/autoscale.md).

Map: `base` (the `Scaler` protocol and its request/result types), `decide` (min/max, cooldowns,
hysteresis: pure), `loop` (the `Autoscaler`: observe -> plan -> decide -> act through the registry),
`cost` (GPU-seconds and cost per million goodput tokens), `lease` (one acting replica through Redis),
`metrics` (Prometheus series), `runtime` (built from `RouterConfig`, run by the app), `flags` (CLI);
scalers: `sim` (in-process simulated engines), `command` (an operator's hook), `kubernetes`.
"""

from kvroute.router.autoscale.base import POOLS, NewWorker, Scaler, ScaleRequest, ScalerError
from kvroute.router.autoscale.cost import CostMeter, CostModel, cost_per_million_goodput

__all__ = [
    "POOLS",
    "CostMeter",
    "CostModel",
    "NewWorker",
    "ScaleRequest",
    "Scaler",
    "ScalerError",
    "cost_per_million_goodput",
]

"""The simulated fleet's scaler: engines started and stopped in this process, so the whole loop runs on
one machine (`kvroute serve --autoscale --autoscale-scaler sim`, tests, `bench/autoscale.py`).

A started engine answers `/health` with 503 for `startup_s` wall seconds, as a real engine loads its
weights and captures its CUDA graphs: the router registers it at once and routes to it once healthy,
and its GPU is paid for from the start. Role change: a simulated engine's disaggregation mode is fixed
at start (as SGLang's `--disaggregation-mode`), so moving a GPU between pools is a stop and a start;
`scale` reuses nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from kvroute.engines.sim.faults import FaultConfig
from kvroute.engines.sim.fleet import SimFleet
from kvroute.router.autoscale.base import NewWorker, ScaleRequest, ScalerError
from kvroute.router.types import WorkerRole

_MODE: dict[WorkerRole, Literal["prefill", "decode"]] = {
    WorkerRole.PREFILL: "prefill",
    WorkerRole.DECODE: "decode",
}


class SimScaler:
    """Grows and shrinks the prefill and decode pools of a `SimFleet` (owned when `own_fleet`)."""

    name = "sim"

    def __init__(self, fleet: SimFleet, startup_s: float = 0.0, own_fleet: bool = False) -> None:
        if startup_s < 0:
            raise ValueError("startup_s must be >= 0")
        self.fleet = fleet
        self.startup_s = startup_s
        self.own_fleet = own_fleet
        self.started = 0
        self.stopped = 0

    @classmethod
    def create(
        cls,
        profile: str = "h100-llama3-8b",
        page_size: int = 16,
        time_scale: float = 1.0,
        startup_s: float = 0.0,
        seed: int = 0,
    ) -> SimScaler:
        """A scaler over a fleet of its own that starts empty (the loop grows it to the pools' minimums)."""
        fleet = SimFleet(
            0, profile=profile, page_size=page_size, time_scale=time_scale, seed=seed, empty_ok=True
        )
        return cls(fleet, startup_s, own_fleet=True)

    async def sizes(self) -> Mapping[WorkerRole, int]:
        roles = self.fleet.roles
        return {pool: sum(1 for r in roles if r == mode) for pool, mode in _MODE.items()}

    async def scale(self, request: ScaleRequest) -> Sequence[NewWorker]:
        mode = _MODE.get(request.pool)
        if mode is None:
            raise ScalerError(f"the sim scaler has no {request.pool.value} pool", retryable=False)
        urls = {w.url for w in self.fleet.workers() if w.role == mode}
        unknown = [u for u in request.remove if u not in urls]
        if unknown:
            raise ScalerError(f"not {mode} engines of this fleet: {', '.join(unknown)}", retryable=False)
        for url in request.remove:
            await self.fleet.remove(url)
            self.stopped += 1
        added: list[NewWorker] = []
        now = len(urls) - len(request.remove)
        faults = FaultConfig(slow_start_s=self.startup_s)
        for _ in range(max(0, request.target - now)):
            try:
                info = await self.fleet.add(mode, faults)
            except OSError as exc:  # a port taken meanwhile, too many open files: retried later
                if added:  # the ones started are reported (the loop asks for the rest next time)
                    break
                raise ScalerError(f"cannot start a simulated {mode} engine: {exc}") from exc
            self.started += 1
            added.append(NewWorker(info.url, request.pool, info.bootstrap_port, info.event_endpoint))
        return added

    async def close(self) -> None:
        if self.own_fleet:
            await self.fleet.close()

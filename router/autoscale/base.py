"""The `Scaler` interface: how the autoscaler changes a pool's size on whatever runs the engines.

A scaler only starts and stops engines. The router does the rest around it (`kvroute.router.autoscale.loop`):
it registers the workers a scale-up reports, and before a scale-down it drains the workers it chose,
waits until none has a request in flight, and names them in the request so the platform stops those.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from kvroute.router.types import WorkerRole

POOLS: tuple[WorkerRole, ...] = (WorkerRole.PREFILL, WorkerRole.DECODE)


class ScalerError(RuntimeError):
    """One scaling attempt failed (hook exit status, API error, timeout). The loop retries it with backoff;
    `retryable` False means retrying the same request cannot help (bad configuration), it is reported."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class NewWorker:
    """An engine a scale-up started, for the router to register (None fields: read from /server_info)."""

    url: str
    role: WorkerRole
    bootstrap_port: int | None = None
    kv_events: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "role": self.role.value,
            "bootstrap_port": self.bootstrap_port,
            "kv_events": self.kv_events,
        }


@dataclass(frozen=True)
class ScaleRequest:
    """Set `pool` from `current` to `target` workers. `remove`: on a scale-down, the workers the router
    drained (no request in flight) and wants stopped, `current - target` of them."""

    pool: WorkerRole
    current: int
    target: int
    remove: tuple[str, ...] = ()
    reason: str = ""
    plan: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "pool": self.pool.value,
            "current": self.current,
            "target": self.target,
            "remove": list(self.remove),
            "reason": self.reason,
            "plan": dict(self.plan),
        }


@runtime_checkable
class Scaler(Protocol):
    """Changes pool sizes on a platform. Implementations: `sim` (in-process simulated engines), `command`
    (an operator's hook), `kubernetes` (Deployments' scale subresource)."""

    name: str

    async def sizes(self) -> Mapping[WorkerRole, int] | None:
        """Each pool's size as the platform sees it, or None when it cannot say (the registry counts)."""
        ...

    async def scale(self, request: ScaleRequest) -> Sequence[NewWorker]:
        """Apply `request`; returns the workers started for the router to register (empty when the
        platform's discovery registers them). Raises `ScalerError` on failure."""
        ...

    async def close(self) -> None:
        """Release what the scaler holds (clients; the sim scaler stops its engines)."""
        ...

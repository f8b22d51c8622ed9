"""Per-worker circuit breaker on request outcomes, and the fleet-wide cap on how many may be open at once.

The proxy records outcomes through the registry. Two rules keep a partial failure from becoming an
outage (issue #18: with 30% of responses failing everywhere, every breaker opened and 65% of requests
got 503 `no_worker`):
- half-open admits a bounded number of probe requests at once (`max_probes`), not all traffic;
- `EjectionCap` (Envoy's `max_ejection_percent`, plus a minimum kept in rotation) vetoes opening a
  breaker when too much of the fleet is already out: failures spread evenly over the fleet then stay
  failures of single attempts, which the proxy retries on another worker.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Admission = Literal["no", "yes", "probe"]


class CircuitBreaker:
    """Per-worker breaker on request outcomes.

    closed --N consecutive failures (unless vetoed)--> open --cooldown--> half_open --M successes-->
    closed; any failure in half_open opens it again. While half_open at most `max_probes` requests are
    admitted at once (`begin` / `end`). `failure_threshold == 0` disables it (always closed).
    """

    def __init__(
        self,
        failure_threshold: int,
        cooldown_s: float,
        success_threshold: int,
        clock: Callable[[], float] = time.monotonic,
        max_probes: int = 1,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.success_threshold = max(1, success_threshold)
        self.max_probes = max(1, max_probes)
        self._clock = clock
        self.state = "closed"
        self.failures = 0
        self.successes = 0
        self.opened_at = 0.0
        self.probes = 0  # probe requests in flight (half_open only)
        self.vetoed = 0  # times opening was refused by the fleet-wide cap

    def poll(self) -> str:
        """Advance open -> half_open once the cooldown has passed; returns the state."""
        if self.state == "open" and self._clock() - self.opened_at >= self.cooldown_s:
            self.state = "half_open"
            self.successes = 0
            self.probes = 0
        return self.state

    def allows(self) -> bool:
        """Whether a request could be admitted now (no side effect)."""
        state = self.poll()
        return state == "closed" or (state == "half_open" and self.probes < self.max_probes)

    def begin(self) -> Admission:
        """Admit one request: "yes" (closed), "probe" (half_open, a probe slot taken: call `end`), "no"."""
        state = self.poll()
        if state == "closed":
            return "yes"
        if state == "half_open" and self.probes < self.max_probes:
            self.probes += 1
            return "probe"
        return "no"

    def end(self) -> None:
        """A probe admitted by `begin` finished (whatever its outcome)."""
        if self.probes > 0:
            self.probes -= 1

    def record_success(self) -> bool:
        """Returns True when this success closed the breaker."""
        self.failures = 0
        if self.poll() == "half_open":
            self.successes += 1
            if self.successes >= self.success_threshold:
                self.state = "closed"
                self.probes = 0
                return True
        return False

    def record_failure(self, may_open: bool = True) -> bool:
        """Returns True when this failure opened the breaker. `may_open=False`: the fleet-wide cap
        refuses an opening from closed (counted in `vetoed`); a failed half-open probe always reopens."""
        if self.failure_threshold <= 0:
            return False
        state = self.poll()
        if state == "open":
            return False
        self.failures += 1
        if state == "half_open" or self.failures >= self.failure_threshold:
            if state == "closed" and not may_open:
                self.vetoed += 1
                return False
            self.state = "open"
            self.opened_at = self._clock()
            self.successes = 0
            self.probes = 0
            return True
        return False


@dataclass(frozen=True)
class EjectionCap:
    """How much of the fleet breakers may take out. `max_percent`: open breakers as a share of the
    workers in rotation or ejected (100 = no cap; at least one may always open, as in Envoy, unless that
    breaks `min_in_rotation`); `min_in_rotation`: workers that must stay routable (0 = none)."""

    max_percent: float = 50.0
    min_in_rotation: int = 1

    def may_eject(self, ejected: int, in_rotation: int) -> bool:
        """`ejected`: breakers open or half-open now; `in_rotation`: routable workers, this one included."""
        if in_rotation - 1 < self.min_in_rotation:
            return False
        total = ejected + in_rotation
        allowed = max(1, math.floor(total * self.max_percent / 100.0))
        return ejected + 1 <= allowed

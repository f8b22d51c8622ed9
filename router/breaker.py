"""Per-worker circuit breaker on request outcomes (the proxy records them through the registry)."""

from __future__ import annotations

import time
from collections.abc import Callable


class CircuitBreaker:
    """Per-worker breaker on request outcomes.

    closed --N consecutive failures--> open --cooldown--> half_open --M successes--> closed;
    any failure in half_open opens it again. `failure_threshold == 0` disables it (always closed).
    """

    def __init__(
        self,
        failure_threshold: int,
        cooldown_s: float,
        success_threshold: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.success_threshold = max(1, success_threshold)
        self._clock = clock
        self.state = "closed"
        self.failures = 0
        self.successes = 0
        self.opened_at = 0.0

    def poll(self) -> str:
        """Advance open -> half_open once the cooldown has passed; returns the state."""
        if self.state == "open" and self._clock() - self.opened_at >= self.cooldown_s:
            self.state = "half_open"
            self.successes = 0
        return self.state

    def record_success(self) -> bool:
        """Returns True when this success closed the breaker."""
        self.failures = 0
        if self.poll() == "half_open":
            self.successes += 1
            if self.successes >= self.success_threshold:
                self.state = "closed"
                return True
        return False

    def record_failure(self) -> bool:
        """Returns True when this failure opened the breaker."""
        if self.failure_threshold <= 0:
            return False
        state = self.poll()
        self.failures += 1
        if state == "half_open" or (state == "closed" and self.failures >= self.failure_threshold):
            self.state = "open"
            self.opened_at = self._clock()
            self.successes = 0
            return True
        return False

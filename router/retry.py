"""The pause before a retry: exponential backoff with jitter, as SGLang's router (`--retry-*` flags).

kvroute's default initial pause is 0 (the retry goes at once to the next-ranked worker, which is not
the one that failed); with `--retry-initial-backoff-ms` the n-th retry waits
`min(max, initial * multiplier**(n-1))`, varied by up to +/- `jitter` of itself.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from kvroute.router.config import RouterConfig


@dataclass(frozen=True)
class RetryBackoff:
    initial_ms: float = 0.0  # pause before the first retry; 0 = none (then no pause at all)
    max_ms: float = 30000.0  # cap of one pause
    multiplier: float = 1.5  # growth per retry, >= 1
    jitter: float = 0.2  # share of the pause drawn at random (+/-), 0..1

    @staticmethod
    def from_config(config: RouterConfig) -> RetryBackoff:
        return RetryBackoff(
            config.retry_initial_backoff_ms,
            config.retry_max_backoff_ms,
            config.retry_backoff_multiplier,
            config.retry_jitter_factor,
        )

    def delay_s(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number `retry` (1 = the first retry)."""
        if self.initial_ms <= 0 or retry < 1:
            return 0.0
        base = min(self.max_ms, self.initial_ms * self.multiplier ** (retry - 1))
        spread = base * self.jitter * (2 * (rng or random).random() - 1)
        return max(0.0, base + spread) / 1000.0

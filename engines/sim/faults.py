"""Fault knobs of a simulated engine: set at construction, by CLI flag, or at run time (POST /sim/faults)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class FaultConfig:
    """What can go wrong. Every field's default disables it.

    error_rate: probability in [0, 1] that a generation request fails at once with HTTP 500.
    die_after_tokens: drop the connection after this many streamed output tokens (None: never).
    stall: the scheduler stops stepping; requests are accepted but produce nothing until cleared.
    slow_start_s: `/health` answers 503 (and generation 503) for this many wall seconds after start.
    refuse_connections: close the listening socket (connect() is refused) until cleared.
    """

    error_rate: float = 0.0
    die_after_tokens: int | None = None
    stall: bool = False
    slow_start_s: float = 0.0
    refuse_connections: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"error_rate must be in [0, 1], got {self.error_rate}")
        if self.die_after_tokens is not None and self.die_after_tokens < 0:
            raise ValueError("die_after_tokens must be >= 0 or null")
        if not (self.slow_start_s >= 0.0 and math.isfinite(self.slow_start_s)):
            raise ValueError("slow_start_s must be a finite number >= 0")

    def update(self, changes: dict[str, Any]) -> None:
        """Apply a partial update; unknown keys or bad values raise ValueError and change nothing."""
        known = {f.name: f for f in fields(self)}
        unknown = set(changes) - set(known)
        if unknown:
            raise ValueError(f"unknown fault knobs: {sorted(unknown)}; known: {sorted(known)}")
        trial = FaultConfig(**{**asdict(self), **changes})
        for name in known:
            setattr(self, name, getattr(trial, name))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

"""SLA classes: a priority, latency objectives and the longest wait in the router's queue.

A class is what admission promises a request: `interactive` is served first and kept within a 1 s
TTFT; `batch` only wants throughput and waits behind everything else. Operators add or override
classes in the `[classes.NAME]` tables of the config file (docs/tenants.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class TenantConfigError(ValueError):
    """A tenant or class definition is malformed; the message names the table and the field."""


@dataclass(frozen=True)
class SlaClass:
    """One service class. Invariant: every number is finite and >= 0.

    `priority`: higher is served first, in the router's queue and by SGLang (forwarded as the request's
    `priority` field; SGLang's default order with `--enable-priority-scheduling` is larger first).
    """

    name: str
    priority: int = 1
    ttft_slo_s: float = 0.0  # time-to-first-token objective in seconds; 0 = none (never saturates on it)
    itl_slo_s: float = 0.0  # inter-token latency objective in seconds; 0 = none (reported only)
    max_queue_wait_s: float = 30.0  # longest wait in the router queue before 429; 0 = never queued

    def __post_init__(self) -> None:
        for f in ("ttft_slo_s", "itl_slo_s", "max_queue_wait_s"):
            v = getattr(self, f)
            if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise TenantConfigError(f"class {self.name!r}: {f} must be a number >= 0 seconds, got {v!r}")
        if not isinstance(self.priority, int) or isinstance(self.priority, bool):
            raise TenantConfigError(
                f"class {self.name!r}: priority must be an integer, got {self.priority!r}"
            )

    def as_dict(self) -> dict[str, Any]:
        return {
            "priority": self.priority,
            "ttft_slo_s": self.ttft_slo_s,
            "itl_slo_s": self.itl_slo_s,
            "max_queue_wait_s": self.max_queue_wait_s,
        }


BUILTIN_CLASSES: Mapping[str, SlaClass] = {
    c.name: c
    for c in (
        SlaClass("interactive", priority=2, ttft_slo_s=1.0, itl_slo_s=0.0, max_queue_wait_s=5.0),
        SlaClass("standard", priority=1, ttft_slo_s=5.0, itl_slo_s=0.0, max_queue_wait_s=30.0),
        SlaClass("batch", priority=0, ttft_slo_s=0.0, itl_slo_s=0.0, max_queue_wait_s=60.0),
    )
}

_CLASS_FIELDS = {"priority", "ttft_slo_s", "itl_slo_s", "max_queue_wait_s"}


def parse_class(name: str, raw: Any, base: SlaClass | None = None) -> SlaClass:
    """`[classes.NAME]` table -> SlaClass; fields left out keep the built-in's (or the defaults)."""
    if not isinstance(raw, Mapping):
        raise TenantConfigError(f"class {name!r} must be a table/object, got {type(raw).__name__}")
    unknown = set(raw) - _CLASS_FIELDS
    if unknown:
        raise TenantConfigError(
            f"class {name!r}: unknown field(s) {sorted(unknown)}; allowed: {sorted(_CLASS_FIELDS)}"
        )
    start = base.as_dict() if base is not None else {}
    start.update(raw)
    return SlaClass(name, **start)


def parse_classes(raw: Mapping[str, Any] | None) -> dict[str, SlaClass]:
    """The built-in classes, overridden and extended by the config's `[classes.*]` tables."""
    out = dict(BUILTIN_CLASSES)
    for name, table in (raw or {}).items():
        if not isinstance(name, str) or not name:
            raise TenantConfigError(f"class names must be non-empty strings, got {name!r}")
        out[name] = parse_class(name, table, BUILTIN_CLASSES.get(name))
    return out

"""Live usage per tenant and class (for `GET /admin/tenants`) and their Prometheus series.

Label cardinality is bounded: the first `label_limit` tenants seen keep their name as the `tenant`
label, later ones are reported as `other` (their usage in the admin API stays per tenant).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

OTHER = "other"


class Outcome(enum.Enum):
    ADMITTED = "admitted"  # routed (at once or out of the queue)
    REJECTED = "rejected"  # 429: quota, queue full, waited too long
    DISCONNECTED = "disconnected"  # the client left while queued
    UNAUTHORIZED = "unauthorized"  # 401 (no tenant matched with --require-api-key)


class TenantSink(Protocol):
    """Where per-tenant observations go (router.metrics.Metrics implements it)."""

    def tenant_outcome(self, tenant: str, sla_class: str, outcome: str, reason: str) -> None: ...

    def tenant_finished(
        self,
        tenant: str,
        sla_class: str,
        *,
        queue_wait_s: float,
        ttft_s: float | None,
        itl_gaps: list[tuple[float, int]],
        slo_met: bool | None,
        prompt_tokens: int,
        output_tokens: int,
        ok: bool,
    ) -> None: ...


@dataclass
class Usage:
    """One (tenant, class)'s counters since start. `queued` and `in_flight` are live."""

    tenant: str
    sla_class: str
    label: str
    sink: TenantSink | None = field(default=None, repr=False)
    queued: int = 0
    in_flight: int = 0
    admitted_total: int = 0
    completed: int = 0
    failed: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    disconnected: int = 0
    slo_met: int = 0
    slo_missed: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    queue_wait_s_total: float = 0.0

    def count(self, outcome: Outcome, reason: str) -> None:
        if outcome is Outcome.REJECTED:
            self.rejected[reason] = self.rejected.get(reason, 0) + 1
        elif outcome is Outcome.DISCONNECTED:
            self.disconnected += 1
        if self.sink is not None:
            self.sink.tenant_outcome(self.label, self.sla_class, outcome.value, reason)

    def admitted(self, wait_s: float) -> None:
        self.admitted_total += 1
        self.in_flight += 1
        self.queue_wait_s_total += wait_s
        if self.sink is not None:
            self.sink.tenant_outcome(self.label, self.sla_class, Outcome.ADMITTED.value, "")

    def finished(self, grant: Any) -> None:
        """`grant`: a router.admission.Grant whose `observe` ran (status 0: never answered)."""
        self.in_flight = max(0, self.in_flight - 1)
        ok = 0 < grant.status < 400
        slo = grant.sla_class.ttft_slo_s
        met: bool | None = None
        if ok:
            self.completed += 1
            self.prompt_tokens += grant.prompt_tokens
            self.output_tokens += grant.output_tokens
            if slo > 0 and grant.ttft_s is not None:
                met = grant.ttft_s <= slo
                if met:
                    self.slo_met += 1
                else:
                    self.slo_missed += 1
        else:
            self.failed += 1
        if self.sink is not None:
            self.sink.tenant_finished(
                self.label,
                self.sla_class,
                queue_wait_s=grant.queue_wait_s,
                ttft_s=grant.ttft_s if ok else None,
                itl_gaps=grant.itl_s if ok else [],
                slo_met=met,
                prompt_tokens=grant.prompt_tokens if ok else 0,
                output_tokens=grant.output_tokens if ok else 0,
                ok=ok,
            )

    def as_dict(self) -> dict[str, Any]:
        judged = self.slo_met + self.slo_missed
        return {
            "queued": self.queued,
            "in_flight": self.in_flight,
            "admitted": self.admitted_total,
            "completed": self.completed,
            "failed": self.failed,
            "rejected": dict(self.rejected),
            "disconnected": self.disconnected,
            "slo_attainment": round(self.slo_met / judged, 4) if judged else None,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "mean_queue_wait_s": round(self.queue_wait_s_total / self.admitted_total, 4)
            if self.admitted_total
            else 0.0,
        }


class UsageBook:
    """Usage by (tenant, class); maps tenants to bounded metric labels."""

    def __init__(self, sink: TenantSink | None = None, label_limit: int = 20) -> None:
        self.sink = sink
        self.label_limit = label_limit
        self._labels: dict[str, str] = {}
        self._usage: dict[tuple[str, str], Usage] = {}

    def label(self, tenant: str) -> str:
        lab = self._labels.get(tenant)
        if lab is None:
            named = sum(1 for v in self._labels.values() if v != OTHER)
            lab = tenant if named < self.label_limit else OTHER
            if len(self._labels) < 10 * max(1, self.label_limit) + 1000:  # bound the map itself
                self._labels[tenant] = lab
        return lab

    def of(self, tenant: str, sla_class: str) -> Usage:
        key = (tenant, sla_class)
        u = self._usage.get(key)
        if u is None:
            u = self._usage[key] = Usage(tenant, sla_class, self.label(tenant), self.sink)
        return u

    def by_tenant(self) -> Mapping[str, dict[str, Any]]:
        """{tenant: {class: usage dict}}."""
        out: dict[str, dict[str, Any]] = {}
        for (t, c), u in self._usage.items():
            out.setdefault(t, {})[c] = u.as_dict()
        return out

    def forget(self, tenant: str) -> None:
        """Drop an idle deleted tenant's usage (kept while it still has requests queued or in flight)."""
        for key in [k for k, u in self._usage.items() if k[0] == tenant and not (u.queued or u.in_flight)]:
            del self._usage[key]

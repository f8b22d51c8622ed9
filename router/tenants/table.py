"""Tenants: who a request belongs to, its class, its fair-share weight and its quotas.

`TenantTable` is an immutable snapshot (a change through the admin API builds a new one and swaps
it in), so a request reads one consistent view from identification to release.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kvroute.router.tenants.classes import SlaClass, TenantConfigError, parse_classes

DEFAULT_TENANT = "default"
_TENANT_FIELDS = {"class", "api_keys", "weight", "max_concurrent", "tokens_per_s", "burst_tokens"}


@dataclass(frozen=True)
class Tenant:
    """One tenant. Invariant: `sla_class` names a class of its table; limits are >= 0 (0 = unlimited)."""

    name: str
    sla_class: str = "standard"
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    weight: float = 1.0  # fair share within its class (weighted fair queueing); > 0
    max_concurrent: int = 0  # requests in flight across every replica; 0 = unlimited
    tokens_per_s: float = 0.0  # prompt + max_tokens per second across every replica; 0 = unlimited
    burst_tokens: int = 0  # token bucket size; 0 = one second of tokens_per_s

    def __post_init__(self) -> None:
        w = self.weight
        if not isinstance(w, int | float) or isinstance(w, bool) or not math.isfinite(w) or w <= 0:
            raise TenantConfigError(f"tenant {self.name!r}: weight must be a number > 0, got {w!r}")
        for f in ("max_concurrent", "burst_tokens"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise TenantConfigError(f"tenant {self.name!r}: {f} must be an integer >= 0, got {v!r}")
        t = self.tokens_per_s
        if not isinstance(t, int | float) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
            raise TenantConfigError(f"tenant {self.name!r}: tokens_per_s must be a number >= 0, got {t!r}")
        for k in self.api_keys:
            if not isinstance(k, str) or not k.strip():
                raise TenantConfigError(f"tenant {self.name!r}: api_keys must be non-empty strings")

    @property
    def bucket_tokens(self) -> float:
        return float(self.burst_tokens) if self.burst_tokens else self.tokens_per_s

    def as_dict(self, *, with_keys: bool = False) -> dict[str, Any]:
        """The tenant as config (`with_keys`: the keys themselves, for Redis; else masked, for the API)."""
        keys: list[str] = list(self.api_keys) if with_keys else [_mask(k) for k in self.api_keys]
        return {
            "class": self.sla_class,
            "api_keys": keys,
            "weight": self.weight,
            "max_concurrent": self.max_concurrent,
            "tokens_per_s": self.tokens_per_s,
            "burst_tokens": self.burst_tokens,
        }


def _mask(key: str) -> str:
    return "..." + key[-4:] if len(key) > 8 else "..."


def parse_tenant(name: str, raw: Any) -> Tenant:
    """`[tenants.NAME]` table -> Tenant (the class is checked by the table)."""
    if not isinstance(name, str) or not name or len(name) > 64 or not name.replace("-", "_").isidentifier():
        raise TenantConfigError(
            f"tenant name {name!r}: use 1-64 letters, digits, '_' or '-' (not starting with a digit)"
        )
    if not isinstance(raw, Mapping):
        raise TenantConfigError(f"tenant {name!r} must be a table/object, got {type(raw).__name__}")
    unknown = set(raw) - _TENANT_FIELDS
    if unknown:
        raise TenantConfigError(
            f"tenant {name!r}: unknown field(s) {sorted(unknown)}; allowed: {sorted(_TENANT_FIELDS)}"
        )
    keys = raw.get("api_keys", ())
    if isinstance(keys, str):
        keys = (keys,)
    if not isinstance(keys, list | tuple):
        raise TenantConfigError(f"tenant {name!r}: api_keys must be a list of strings")
    cls = raw.get("class", "standard")
    if not isinstance(cls, str):
        raise TenantConfigError(f"tenant {name!r}: class must be a class name, got {cls!r}")
    return Tenant(
        name=name,
        sla_class=cls,
        api_keys=tuple(keys),
        weight=raw.get("weight", 1.0),
        max_concurrent=raw.get("max_concurrent", 0),
        tokens_per_s=raw.get("tokens_per_s", 0.0),
        burst_tokens=raw.get("burst_tokens", 0),
    )


@dataclass(frozen=True)
class TenantTable:
    """Tenants and classes, with the api-key index. Always holds the `default` tenant."""

    classes: Mapping[str, SlaClass]
    tenants: Mapping[str, Tenant]
    by_key: Mapping[str, Tenant] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, classes: Mapping[str, SlaClass], tenants: Mapping[str, Tenant]) -> TenantTable:
        """Check classes and keys; TenantConfigError naming the offending tenant."""
        all_tenants = dict(tenants)
        all_tenants.setdefault(DEFAULT_TENANT, Tenant(DEFAULT_TENANT))
        by_key: dict[str, Tenant] = {}
        for t in all_tenants.values():
            if t.sla_class not in classes:
                raise TenantConfigError(
                    f"tenant {t.name!r}: unknown class {t.sla_class!r}; known: {sorted(classes)}"
                )
            for k in t.api_keys:
                other = by_key.get(k)
                if other is not None and other.name != t.name:
                    raise TenantConfigError(f"tenants {other.name!r} and {t.name!r} share an api key")
                by_key[k] = t
        return cls(dict(classes), all_tenants, by_key)

    @classmethod
    def from_config(
        cls, tenants: Mapping[str, Any] | None, classes: Mapping[str, Any] | None = None
    ) -> TenantTable:
        """From the config file's `[tenants.*]` and `[classes.*]` tables."""
        if tenants is not None and not isinstance(tenants, Mapping):
            raise TenantConfigError("tenants must be a table of tables ([tenants.NAME])")
        if classes is not None and not isinstance(classes, Mapping):
            raise TenantConfigError("classes must be a table of tables ([classes.NAME])")
        parsed = {name: parse_tenant(name, raw) for name, raw in (tenants or {}).items()}
        return cls.build(parse_classes(classes), parsed)

    def with_tenant(self, tenant: Tenant) -> TenantTable:
        return TenantTable.build(self.classes, {**self.tenants, tenant.name: tenant})

    def without(self, name: str) -> TenantTable:
        """The table minus `name` (`default` comes back with its defaults: it always exists)."""
        return TenantTable.build(self.classes, {k: v for k, v in self.tenants.items() if k != name})

    def class_of(self, tenant: Tenant) -> SlaClass:
        return self.classes[tenant.sla_class]

    def effective_class(self, tenant: Tenant, requested: str | None) -> SlaClass:
        """The tenant's class, or a lower one it asked for (a request may lower its class, never raise
        it: a higher requested class is capped at the tenant's). KeyError for an unknown name."""
        own = self.classes[tenant.sla_class]
        if not requested:
            return own
        want = self.classes[requested]
        return want if want.priority <= own.priority else own

"""The tenants' HTTP glue for one router process: identify, admit (quota + queue), tag the engine
request with its priority, and change tenants at run time (admin API, shared through Redis)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson

from kvroute.router.admission import Admission, AdmissionConfig, Grant
from kvroute.router.errors import ApiError, bad_request, too_many_requests
from kvroute.router.policies.base import NoWorkerAvailable
from kvroute.router.tenants.classes import TenantConfigError
from kvroute.router.tenants.errors import Rejected
from kvroute.router.tenants.identity import CLASS_HEADER, UnknownClass, UnknownClient, identify
from kvroute.router.tenants.quotas import LocalQuotas, RedisQuotas
from kvroute.router.tenants.saturation import SaturationConfig
from kvroute.router.tenants.shared import SharedTenants
from kvroute.router.tenants.table import DEFAULT_TENANT, TenantTable, parse_tenant
from kvroute.router.tenants.usage import Outcome, UsageBook
from kvroute.router.types import RoutingRequest

log = logging.getLogger("kvroute.tenants")


class TenantRuntime:
    """Owns the tenant table, the `Admission` over the router, the quotas and the shared config."""

    def __init__(self, router: Any, config: Any, metrics: Any = None) -> None:
        """`config`: the RouterConfig (its tenant fields); `metrics`: a `TenantSink` (Metrics) or None."""
        self.config = config
        self.metrics = metrics
        self.usage = UsageBook(sink=metrics, label_limit=config.tenant_metrics_limit)
        self.local_quotas = LocalQuotas()
        self.redis_quotas: RedisQuotas | None = None
        sat = SaturationConfig(
            prefill_tokens_per_s=config.admission_prefill_tokens_per_s,
            max_queued_prefill_tokens=config.admission_max_queued_prefill_tokens,
            engine_priority=config.engine_priority,
        )
        self.admission = Admission(
            router,
            config.tenant_table(),
            AdmissionConfig(saturation=sat, max_queue=config.admission_max_queue),
            quotas=self.local_quotas,
            usage=self.usage,
        )
        router.admission = self.admission
        self.shared: SharedTenants | None = None

    @property
    def table(self) -> TenantTable:
        return self.admission.table

    # --- the request path ---------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def admit(
        self, headers: Mapping[str, str], request: RoutingRequest, request_id: str
    ) -> AsyncIterator[Grant]:
        """Identify the request's tenant and admit it; ApiError 400/401/429/503 in the API's format."""
        cfg = self.config
        try:
            ident = identify(
                self.table,
                authorization=headers.get("Authorization"),
                tenant_header_value=headers.get(cfg.tenant_header) if cfg.tenant_header else None,
                requested_class=headers.get(CLASS_HEADER),
                require_api_key=cfg.require_api_key,
            )
        except UnknownClient as exc:
            self.usage.of("unknown", "none").count(Outcome.UNAUTHORIZED, "")
            raise ApiError(401, str(exc), "authentication_error", "invalid_api_key") from exc
        except UnknownClass as exc:
            raise bad_request(str(exc), "invalid_class") from exc
        try:
            grant = await self.admission.acquire(request, ident, request_id)
        except Rejected as exc:
            raise too_many_requests(exc.message, exc.reason, exc.retry_after_s) from exc
        except NoWorkerAvailable as exc:
            raise ApiError(503, f"no worker available: {exc}", "service_unavailable", "no_worker") from exc
        try:
            yield grant
        finally:
            self.admission.release(grant)

    def with_priority(self, body: bytes, data: dict[str, Any], grant: Grant, kind: str = "generate") -> bytes:
        """The body with SGLang's `priority` set to the class's (int, higher first with the engines'
        `--enable-priority-scheduling`); a client's own value is replaced (a class is never raised).
        Appended before the closing brace, so the client's bytes are otherwise kept as sent. Only
        generation routes (`kind` generate | completions | chat) carry it: SGLang's other request
        types (embeddings, rerank, ...) do not all accept the field."""
        if not self.config.engine_priority or kind not in ("generate", "completions", "chat"):
            return body
        prio = grant.priority
        if "priority" in data or not data:
            return orjson.dumps({**data, "priority": prio})
        end = body.rstrip()
        if not end.endswith(b"}"):
            return orjson.dumps({**data, "priority": prio})
        return end[:-1] + b',"priority":' + str(prio).encode() + b"}"

    # --- changes at run time ---------------------------------------------------------------------

    def put(self, name: str, raw: Mapping[str, Any], *, share: bool = True) -> dict[str, Any]:
        """Add or replace a tenant (ValueError with the reason for a bad one)."""
        try:
            tenant = parse_tenant(name, raw)
            table = self.table.with_tenant(tenant)
        except TenantConfigError as exc:
            raise ValueError(str(exc)) from exc
        self.admission.set_table(table)
        if share and self.shared is not None:
            self.shared.notify(name, tenant.as_dict(with_keys=True))
        return tenant.as_dict()

    def delete(self, name: str, *, share: bool = True) -> bool:
        """Remove a tenant (its later requests are `default`'s; queued ones keep their place).
        False if unknown. `default` is reset to its defaults instead (it always exists)."""
        if name not in self.table.tenants:
            return False
        self.admission.set_table(self.table.without(name))
        self.usage.forget(name)
        if share and self.shared is not None:
            self.shared.notify(name, None)
        return True

    def apply_shared(self, name: str, tenant: dict[str, Any] | None) -> None:
        """A change another replica made (SharedTenants' `apply`)."""
        if tenant is None:
            self.delete(name, share=False)
        else:
            self.put(name, tenant, share=False)

    # --- status ---------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        usage = self.usage.by_tenant()
        rq = self.redis_quotas
        return {
            "default_tenant": DEFAULT_TENANT,
            "classes": {n: c.as_dict() for n, c in sorted(self.table.classes.items())},
            "tenants": {
                n: {**t.as_dict(), "usage": usage.get(n, {})} for n, t in sorted(self.table.tenants.items())
            },
            "admission": self.admission.status(),
            "quotas": {
                "shared": rq is not None,
                "degraded": bool(rq is not None and rq.degraded),
                "local_fallbacks": rq.fallbacks if rq is not None else 0,
            },
        }

    # --- lifecycle ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(
        self, redis_client: Any | None, key_prefix: str, replica_id: str
    ) -> AsyncIterator[None]:
        """Shared quotas and tenants while `redis_client` is given (never waits on Redis to start)."""
        if redis_client is not None:
            self.redis_quotas = RedisQuotas(
                redis_client,
                key_prefix,
                lease_s=(self.config.request_timeout_s or 600.0) + 60.0,
                timeout_s=self.config.quota_redis_timeout_s,
                on_degraded=self._quota_degraded,
            )
            self.admission.quotas = self.redis_quotas
            self.shared = SharedTenants(redis_client, self.apply_shared, key_prefix, replica_id)
            self.shared.start()
        try:
            yield
        finally:
            await self.admission.close()
            if self.shared is not None:
                await self.shared.close()
                self.shared = None
            if self.redis_quotas is not None:
                await self.redis_quotas.close()
                self.admission.quotas = self.local_quotas

    def _quota_degraded(self, degraded: bool) -> None:
        if self.metrics is not None:
            self.metrics.quota_degraded.set(1 if degraded else 0)
            if degraded:
                self.metrics.quota_redis_outages.inc()

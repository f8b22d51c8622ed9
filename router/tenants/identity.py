"""Who sent a request: its bearer API key, or a header a trusted gateway sets, else `default`.

Only the lookup lives here (no I/O): the HTTP layer passes the two header values it read.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvroute.router.tenants.classes import SlaClass
from kvroute.router.tenants.table import DEFAULT_TENANT, Tenant, TenantTable

CLASS_HEADER = "X-Kvroute-Class"  # a request may ask for a lower class than its tenant's


class UnknownClient(LookupError):
    """No tenant matched and `--require-api-key` is set (the HTTP layer answers 401)."""


class UnknownClass(LookupError):
    """The request asked for a class that does not exist (the HTTP layer answers 400)."""


@dataclass(frozen=True)
class Identity:
    tenant: Tenant
    sla_class: SlaClass


def bearer_key(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    return key if scheme.lower() == "bearer" and key else None


def identify(
    table: TenantTable,
    *,
    authorization: str | None,
    tenant_header_value: str | None = None,
    requested_class: str | None = None,
    require_api_key: bool = False,
) -> Identity:
    """The request's tenant and effective class.

    `tenant_header_value`: the value of `--tenant-header` when that flag is set (the gateway in front
    authenticated the client: its word is taken as is); it wins over the API key."""
    tenant: Tenant | None = None
    if tenant_header_value:
        tenant = table.tenants.get(tenant_header_value.strip())
    if tenant is None:
        key = bearer_key(authorization)
        tenant = table.by_key.get(key) if key else None
    if tenant is None:
        if require_api_key:
            raise UnknownClient("a valid API key is required ('Authorization: Bearer <key>')")
        tenant = table.tenants[DEFAULT_TENANT]
    try:
        cls = table.effective_class(tenant, requested_class.strip() if requested_class else None)
    except KeyError as exc:
        raise UnknownClass(
            f"unknown class {requested_class!r} in {CLASS_HEADER}; known: {sorted(table.classes)}"
        ) from exc
    return Identity(tenant, cls)

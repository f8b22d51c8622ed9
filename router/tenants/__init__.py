"""Tenants and SLA classes: identity (`identity`), classes (`classes`), tenants (`table`), saturation
(`saturation`), quotas (`quotas`), usage and metrics labels (`usage`), the config shared by replicas
(`shared`), and the HTTP glue (`runtime`, `admin`). The queue itself is `router/admission.py`.

A new tenant rule is one file here, used by `runtime`."""

from kvroute.router.tenants.classes import BUILTIN_CLASSES, SlaClass, TenantConfigError
from kvroute.router.tenants.errors import Rejected
from kvroute.router.tenants.identity import CLASS_HEADER, Identity, identify
from kvroute.router.tenants.table import DEFAULT_TENANT, Tenant, TenantTable

__all__ = [
    "BUILTIN_CLASSES",
    "CLASS_HEADER",
    "DEFAULT_TENANT",
    "Identity",
    "Rejected",
    "SlaClass",
    "Tenant",
    "TenantConfigError",
    "TenantTable",
    "identify",
]

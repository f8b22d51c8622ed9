"""HTTP routes of observability: `GET /admin/requests/recent`, `GET /admin/status` and the status page
at `/dashboard` (static files shipped in this package: no CDN, works air-gapped).

Access: the JSON routes are admin routes (bearer token, or loopback only without one). The page's
files hold no data: with a token configured they are served to anyone and the page asks for the token
to call `/admin/status`; without one they follow the admin rule (loopback only).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import orjson
from aiohttp import web

from kvroute.router.admin import AdminApi, check_access
from kvroute.router.errors import bad_request
from kvroute.router.observability.recorder import Observability
from kvroute.router.observability.ring import RecentQuery
from kvroute.router.observability.status import build_status, tenant_rows

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
STATIC_FILES = {
    "index.html": "text/html",
    "dashboard.js": "application/javascript",
    "dashboard.css": "text/css",
}
DEFAULT_WINDOW_S = 60.0
MAX_LIMIT = 10_000


def _json(data: Any) -> web.Response:
    return web.Response(
        body=orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS), content_type="application/json"
    )


def _float_arg(request: web.Request, name: str, default: float | None, lo: float = 0.0) -> float | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        v = float(raw)
    except ValueError as exc:
        raise bad_request(f"'{name}' must be a number, got {raw!r}", f"invalid_{name}") from exc
    if not math.isfinite(v) or v < lo:
        raise bad_request(f"'{name}' must be a finite number >= {lo:g}", f"invalid_{name}")
    return v


def recent_query(request: web.Request) -> RecentQuery:
    """Query parameters -> filters: worker, min_ttft_s (alias slower_than), min_e2e_s, errors, limit."""
    q = request.query
    limit_raw = q.get("limit", "100")
    try:
        limit = int(limit_raw)
    except ValueError as exc:
        raise bad_request(f"'limit' must be an integer, got {limit_raw!r}", "invalid_limit") from exc
    if not 1 <= limit <= MAX_LIMIT:
        raise bad_request(f"'limit' must be between 1 and {MAX_LIMIT}", "invalid_limit")
    errors_raw = q.get("errors", "false").lower()
    if errors_raw not in ("true", "false", "1", "0"):
        raise bad_request("'errors' must be true or false", "invalid_errors")
    min_ttft = _float_arg(request, "min_ttft_s", None)
    if min_ttft is None:
        min_ttft = _float_arg(request, "slower_than", None)
    return RecentQuery(
        worker=q.get("worker") or None,
        min_ttft_s=min_ttft,
        min_e2e_s=_float_arg(request, "min_e2e_s", None),
        errors=errors_raw in ("true", "1"),
        limit=limit,
    )


class ObservabilityApi:
    """Handlers over the app's `Observability`, the router core and the registry (through `AdminApi`)."""

    def __init__(self, obs: Observability, admin: AdminApi) -> None:
        self.obs = obs
        self.admin = admin

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/admin/requests/recent", self._guarded(self.recent))
        r.add_get("/admin/status", self._guarded(self.status))
        r.add_get("/dashboard", self.page)
        r.add_get("/dashboard/", self.page)
        r.add_get("/dashboard/{name}", self.page)

    def _guarded(self, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            check_access(request, self.admin.token)
            return await handler(request)

        return guarded

    async def recent(self, request: web.Request) -> web.Response:
        q = recent_query(request)
        items = self.obs.ring.query(q)
        return _json(
            {
                "capacity": self.obs.ring.capacity,
                "held": len(self.obs.ring),
                "count": len(items),
                "requests": [ph.as_dict() for ph in items],
            }
        )

    async def status(self, request: web.Request) -> web.Response:
        window = _float_arg(request, "window_s", DEFAULT_WINDOW_S, lo=1.0)
        assert window is not None
        core = self.admin.router
        replicas = self.admin.replicas
        tenants = self.admin.tenants  # router.tenants.runtime.TenantRuntime when admission is on
        return _json(
            build_status(
                ring=self.obs.ring,
                workers=self.admin.registry.describe_all(),
                index_stats=core.index_stats(),
                policy=core.policy_info()["name"],
                ready=self.admin.registry.ready(),
                replicas=replicas.status() if replicas is not None else None,
                window_s=window,
                tenants=tenant_rows(tenants.usage.by_tenant()) if tenants is not None else None,
            )
        )

    async def page(self, request: web.Request) -> web.StreamResponse:
        if not self.admin.token:
            check_access(request, None)
        name = request.match_info.get("name", "index.html")
        ctype = STATIC_FILES.get(name)
        if ctype is None:
            raise web.HTTPNotFound()
        if request.path == "/dashboard":
            raise web.HTTPFound("/dashboard/")  # relative asset paths resolve under /dashboard/
        body = resources.files("kvroute.router.observability").joinpath("static", name).read_bytes()
        return web.Response(body=body, content_type=ctype, headers={"Cache-Control": "no-cache"})

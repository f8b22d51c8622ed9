"""Admin routes for tenants: `GET /admin/tenants` (config + live usage), `PUT`/`DELETE
/admin/tenants/{name}`. Mounted by router/admin.py behind its access check."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from kvroute.router.errors import ApiError, bad_request, json_object

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _off() -> ApiError:
    return ApiError(
        404,
        "tenants are not configured: start the router with [tenants.*] in --config, or --admission",
        "not_found_error",
        "tenants_disabled",
    )


class TenantsAdmin:
    def __init__(self, runtime: Any) -> None:
        """`runtime`: the app's TenantRuntime, or None when admission is off (routes answer 404)."""
        self.runtime = runtime

    def add_routes(self, app: web.Application, guarded: Callable[[Handler], Handler]) -> None:
        r = app.router
        r.add_get("/admin/tenants", guarded(self.list))
        r.add_get("/admin/tenants/{name}", guarded(self.get))
        r.add_put("/admin/tenants/{name}", guarded(self.put))
        r.add_delete("/admin/tenants/{name}", guarded(self.delete))

    def _rt(self) -> Any:
        if self.runtime is None:
            raise _off()
        return self.runtime

    async def list(self, request: web.Request) -> web.Response:
        return _json(self._rt().describe())

    async def get(self, request: web.Request) -> web.Response:
        rt, name = self._rt(), request.match_info["name"]
        d = rt.describe()["tenants"].get(name)
        if d is None:
            raise ApiError(404, f"unknown tenant {name!r}", "not_found_error", "unknown_tenant")
        return _json({"name": name, **d})

    async def put(self, request: web.Request) -> web.Response:
        rt, name = self._rt(), request.match_info["name"]
        raw = await request.read()
        body = json_object(raw) if raw else {}
        existed = name in rt.table.tenants
        try:
            tenant = rt.put(name, body)
        except ValueError as exc:
            raise bad_request(str(exc), "invalid_tenant") from exc
        return _json({"name": name, **tenant}, 200 if existed else 201)

    async def delete(self, request: web.Request) -> web.Response:
        rt, name = self._rt(), request.match_info["name"]
        if not rt.delete(name):
            raise ApiError(404, f"unknown tenant {name!r}", "not_found_error", "unknown_tenant")
        return _json({"deleted": name})

"""Admin REST API under `/admin/`: workers, policy, index stats, route explain, counters.

Guarded by a bearer token (`--admin-token` / `KVROUTE_ADMIN_TOKEN`); with no token configured,
only loopback clients may call it. Every answer, errors included, is JSON (see docs/admin-api.md).
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from kvroute.router.errors import ApiError, bad_request, json_object
from kvroute.router.policies.base import NoWorkerAvailable
from kvroute.router.selfcheck import points_at_self
from kvroute.router.types import WorkerRole
from kvroute.router.workers import RegistryError, WorkerRegistry

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS),
        status=status,
        content_type="application/json",
    )


def _is_loopback(remote: str | None) -> bool:
    if not remote:
        return False
    try:
        return ipaddress.ip_address(remote.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def check_access(request: web.Request, token: str | None) -> None:
    """401 without the right bearer token; 403 from a non-loopback client when no token is configured."""
    if token:
        auth = request.headers.get("Authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode("utf-8", "surrogateescape"), token.encode()
        ):
            raise ApiError(
                401,
                "admin API needs 'Authorization: Bearer <admin token>'",
                "authentication_error",
                "unauthorized",
            )
    elif not _is_loopback(request.remote):
        raise ApiError(
            403,
            "admin API is open to loopback clients only (no --admin-token configured)",
            "permission_error",
            "forbidden",
        )


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    return json_object(raw) if raw else {}


def _url_arg(request: web.Request, body: dict[str, Any]) -> str:
    url = request.query.get("url") or body.get("url")
    if not isinstance(url, str) or not url:
        raise bad_request("'url' (query parameter or body field) is required", "missing_url")
    return url


def _unknown_worker(exc: RegistryError) -> ApiError:
    return ApiError(404, str(exc), "not_found_error", "unknown_worker")


class AdminApi:
    """Handlers over the router core and the registry; mounted by `kvroute.router.app`."""

    def __init__(self, router: Any, registry: WorkerRegistry, token: str | None) -> None:
        self.router = router
        self.registry = registry
        self.token = token
        self.pd_metrics: Any = None  # router.pd_metrics.PDMetrics in PD mode (GET /admin/plan)
        self.replicas: Any = None  # router.shared.ReplicaRuntime while sharing through Redis, else None
        self.tenants: Any = None  # router.tenants.runtime.TenantRuntime when admission is on
        self.autoscale: Any = None  # router.autoscale.runtime.AutoscaleRuntime in PD mode

    def add_routes(self, app: web.Application) -> None:
        """Every admin route, each behind the access check (no middleware on the serving hot path)."""
        g = self._guarded
        r = app.router
        r.add_get("/admin/workers", g(self.list_workers))
        r.add_post("/admin/workers", g(self.add_worker))
        r.add_delete("/admin/workers", g(self.remove_worker))
        r.add_post("/admin/workers/remove", g(self.remove_worker))
        r.add_post("/admin/workers/drain", g(self.drain_worker))
        r.add_post("/admin/workers/undrain", g(self.undrain_worker))
        r.add_get("/admin/policy", g(self.get_policy))
        r.add_put("/admin/policy", g(self.set_policy))
        r.add_post("/admin/policy", g(self.set_policy))
        r.add_get("/admin/index", g(self.index_stats))
        r.add_post("/admin/route/explain", g(self.explain))
        r.add_get("/admin/counters", g(self.counters))
        r.add_get("/admin/plan", g(self.plan))
        r.add_get("/admin/replicas", g(self.replicas_status))
        from kvroute.router.tenants.admin import TenantsAdmin

        TenantsAdmin(self.tenants).add_routes(app, g)

    def _guarded(self, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            check_access(request, self.token)
            return await handler(request)

        return guarded

    async def plan(self, request: web.Request) -> web.Response:
        """PD mode: the planner's worker counts for the load seen over the last window."""
        from kvroute.router.planner import PlanError, plan_from_query

        if self.pd_metrics is None:
            raise ApiError(
                404, "the planner needs PD mode (--pd-disaggregation)", "invalid_request_error", "no_pd"
            )
        healthy = [w for w in self.router.workers() if w.routable]
        n_prefill = sum(1 for w in healthy if w.role is WorkerRole.PREFILL)
        n_decode = sum(1 for w in healthy if w.role is WorkerRole.DECODE)
        load = self.pd_metrics.window.summary(n_prefill, n_decode).load
        try:
            defaults = self.autoscale.targets if self.autoscale is not None else None  # the configured
            out = plan_from_query(load, request.query, defaults)
        except PlanError as exc:
            raise bad_request(str(exc), "invalid_plan_query") from exc
        if self.autoscale is not None:  # the autoscaler's state and decisions, and the cost so far
            out["autoscale"] = self.autoscale.status()
            out["cost"] = self.autoscale.cost(self.router.workers())
        return _json(out)

    async def replicas_status(self, request: web.Request) -> web.Response:
        """Replica sharing: this replica's id, the live peers, whether Redis is reachable."""
        if self.replicas is None:
            return _json({"enabled": False})
        return _json({"enabled": True, **self.replicas.status()})

    async def list_workers(self, request: web.Request) -> web.Response:
        return _json({"workers": self.registry.describe_all()})

    async def add_worker(self, request: web.Request) -> web.Response:
        body = await _body(request)
        url = _url_arg(request, body)
        role_s = body.get("role", "regular")
        try:
            role = WorkerRole(role_s)
        except ValueError as exc:
            raise bad_request(
                f"'role' must be one of regular, prefill, decode; got {role_s!r}", "invalid_role"
            ) from exc
        kv = body.get("kv_events")
        if kv is not None and not isinstance(kv, str):
            raise bad_request("'kv_events' must be a zmq endpoint string", "invalid_kv_events")
        bp = body.get("bootstrap_port")
        if bp is not None and (
            not isinstance(bp, int) or isinstance(bp, bool) or role is not WorkerRole.PREFILL
        ):
            raise bad_request(
                "'bootstrap_port' must be an integer, for a prefill worker", "invalid_bootstrap_port"
            )
        worker = await self.register_worker(request, url, role, kv, bp)
        return _json({"worker": self.registry.describe(worker.url)}, status=202)

    async def register_worker(
        self,
        request: web.Request,
        url: str,
        role: WorkerRole,
        kv: str | None = None,
        bp: int | None = None,
        api_key: str | None = None,
    ) -> Any:
        """Add a worker for an admin call (here and smg's /workers API): refuses this router's own
        address, maps registry errors to 400/409, tells the other replicas."""
        sock = request.transport.get_extra_info("sockname") if request.transport is not None else None
        if isinstance(sock, tuple) and await points_at_self(url, sock[:2]):
            raise bad_request(
                f"{url} is this router's own address: a worker must be an engine (routing to itself "
                "would loop)",
                "self_url",
            )
        try:
            worker = self.registry.add(url, role=role, kv_events=kv, bootstrap_port=bp, api_key=api_key)
        except RegistryError as exc:
            raise ApiError(
                409 if "already" in str(exc) else 400,
                str(exc),
                "invalid_request_error",
                "worker_conflict" if "already" in str(exc) else "invalid_url",
            ) from exc
        if self.replicas is not None:
            self.replicas.notify_add(worker.url, role.value, kv, bp)
        return worker

    async def remove_worker(self, request: web.Request) -> web.Response:
        url = _url_arg(request, await _body(request))
        await self.unregister_worker(url)
        return _json({"removed": url})

    async def unregister_worker(self, url: str) -> None:
        """Remove a worker for an admin call (404 if unknown) and tell the other replicas."""
        try:
            await self.registry.remove(url)
        except RegistryError as exc:
            raise _unknown_worker(exc) from exc
        if self.replicas is not None:
            self.replicas.notify_remove(url)

    async def drain_worker(self, request: web.Request) -> web.Response:
        return await self._set_draining(request, True)

    async def undrain_worker(self, request: web.Request) -> web.Response:
        return await self._set_draining(request, False)

    async def _set_draining(self, request: web.Request, draining: bool) -> web.Response:
        """Drain or undrain the worker named by the request, and tell the other replicas."""
        url = _url_arg(request, await _body(request))
        try:
            worker = self.registry.drain(url) if draining else self.registry.undrain(url)
        except RegistryError as exc:
            raise _unknown_worker(exc) from exc
        if self.replicas is not None:
            self.replicas.notify_drain(worker.url, draining, worker.role.value)
        return _json({"worker": self.registry.describe(url)})

    async def get_policy(self, request: web.Request) -> web.Response:
        return _json(self.router.policy_info())

    async def set_policy(self, request: web.Request) -> web.Response:
        body = await _body(request)
        name = body.get("name")
        params = body.get("params")
        params = {} if params is None else params  # `[]`, `""`, `0` are not an object: 400 below
        if not isinstance(name, str) or not name:
            raise bad_request("'name' (policy name) is required", "missing_name")
        if not isinstance(params, dict):
            raise bad_request("'params' must be an object", "invalid_params")
        try:
            self.router.set_policy(name, params)
        except ValueError as exc:
            raise bad_request(str(exc), "invalid_policy") from exc
        info = self.router.policy_info()
        if self.replicas is not None:  # resolved params: every replica compares like with like
            self.replicas.notify_policy(info["name"], info["params"])
        return _json(info)

    async def index_stats(self, request: web.Request) -> web.Response:
        return _json(self.router.index_stats())

    async def explain(self, request: web.Request) -> web.Response:
        """Score a prompt against every worker as the policy would, without sending it anywhere."""
        body = await _body(request)
        prompt = body.get("prompt")
        text = body.get("text", prompt if isinstance(prompt, str) else None)
        ids = body.get("input_ids", prompt if isinstance(prompt, list) else None)
        role_s = body.get("role", "regular")
        try:
            role = WorkerRole(role_s)
            rr = self.router.routing_request(
                input_ids=ids,
                text=text,
                messages=body.get("messages"),
                session_key=body.get("session_key"),
                model=body.get("model"),
                max_tokens=body.get("max_tokens"),
            )
        except ValueError as exc:
            raise bad_request(f"cannot route this prompt: {exc}", "invalid_prompt") from exc
        scores = self.router.explain(rr, role)
        decision: dict[str, Any] | None
        try:
            d = self.router.select(rr, role=role)
            decision = {
                "worker": d.worker,
                "ranked": list(d.ranked),
                "cached_blocks": d.cached_blocks,
                "reason": d.reason,
                "policy": d.policy,
            }
        except NoWorkerAvailable as exc:
            decision = {"worker": None, "error": str(exc)}
        states = {w.url: w.state.value for w in self.router.workers()}
        return _json(
            {
                "prompt_tokens": rr.prompt_tokens,
                "blocks": len(rr.block_hashes),
                "block_size": rr.block_size,
                "policy": self.router.policy_info()["name"],
                "decision": decision,
                "scores": [
                    {
                        "url": s.url,
                        "state": states.get(s.url),
                        "cost": s.cost,
                        "cached_blocks": s.cached_blocks,
                        "terms": s.terms,
                    }
                    for s in scores
                ],
            }
        )

    async def counters(self, request: web.Request) -> web.Response:
        stats = self.router.index_stats()
        return _json(
            {
                "ready": self.registry.ready(),
                "policy": self.router.policy_info()["name"],
                "workers": {
                    u: {k: v for k, v in d.items() if k != "stream"} for u, d in stats["workers"].items()
                },
                "blind_workers": stats.get("blind_workers", []),
                "dropped_batches": stats.get("dropped_batches", 0),
            }
        )

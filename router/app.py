"""The aiohttp application factory: serving routes, admin API and metrics over one `Router`.

Usable in-process (tests, `kvroute demo`) and by `kvroute serve`. State lives on the app under
`web.AppKey`s; the client session, the registry's tasks and the event subscribers start and stop
through `cleanup_ctx`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from kvroute.cache_index.hashing import HFTokenizer, Tokenizer
from kvroute.engines.errors import UpstreamError
from kvroute.engines.http1 import Http1Pool
from kvroute.router.admin import AdminApi, check_access
from kvroute.router.autoscale.runtime import autoscale_context
from kvroute.router.config import ConfigError, RouterConfig
from kvroute.router.core import Router
from kvroute.router.discovery.base import DiscoverySource
from kvroute.router.discovery.runner import build_source, discovery_context
from kvroute.router.discovery.sync import DiscoverySync
from kvroute.router.errors import ApiError, error_response, json_object
from kvroute.router.metrics import Metrics
from kvroute.router.observability import Observability
from kvroute.router.observability.http import ObservabilityApi
from kvroute.router.pd import PDConfig, PDContext, PDSelector, admission_chooser
from kvroute.router.pd_metrics import PDMetrics
from kvroute.router.peer_routes import PeerRoutes
from kvroute.router.proxy import CHAT, COMPLETIONS, GENERATE, PLAIN_ROUTES, RID_KEY, Proxy, RouteSpec
from kvroute.router.shared import replica_context
from kvroute.router.tenants.runtime import TenantRuntime
from kvroute.router.types import WorkerRole
from kvroute.router.workers import INSTANCE_HEADER, WorkerRegistry

log = logging.getLogger("kvroute.app")

CONFIG = web.AppKey("config", RouterConfig)
ROUTER = web.AppKey("router", Router)
METRICS = web.AppKey("metrics", Metrics)
REGISTRY = web.AppKey("registry", WorkerRegistry)
PROXY = web.AppKey("proxy", Proxy)
SESSION = web.AppKey("session", aiohttp.ClientSession)
PD_SELECTOR = web.AppKey("pd_selector", PDSelector)
PD_METRICS = web.AppKey("pd_metrics", PDMetrics)
ADMIN = web.AppKey("admin", AdminApi)
OBSERVABILITY = web.AppKey("observability", Observability)
DISCOVERY_SOURCE = web.AppKey("discovery_source", DiscoverySource)  # set when discovery is configured
DISCOVERY = web.AppKey("discovery", DiscoverySync)  # while the app runs with discovery

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def load_tokenizer(path: str) -> Tokenizer:
    """The `--tokenizer`; a ConfigError saying what is wrong (missing path, missing `hf` extra, bad file),
    never a traceback nor an error taken for a listening failure."""
    try:
        return HFTokenizer(path)
    except ImportError as exc:  # jinja2, for the chat template
        raise ConfigError(
            f"--tokenizer needs the 'hf' extra ({exc.name} is not installed): pip install 'kvroute[hf]'"
        ) from exc
    except RuntimeError as exc:  # the tokenizers package is missing (HFTokenizer says which extra)
        raise ConfigError(str(exc)) from exc
    except FileNotFoundError as exc:
        raise ConfigError(f"--tokenizer {path}: {exc}") from exc
    except Exception as exc:  # tokenizers and json raise their own types for a malformed file
        raise ConfigError(f"--tokenizer {path}: cannot load ({type(exc).__name__}: {exc})") from exc


def build_router(config: RouterConfig) -> Router:
    """ConfigError for an unknown policy, bad policy parameters or an unusable tokenizer."""
    tokenizer: Tokenizer | None = load_tokenizer(config.tokenizer) if config.tokenizer else None
    params = config.policy_params_dict
    if config.policy == "cache_aware":
        params = {**_typed(config.cache_aware_params), **params}
    try:
        return Router(
            block_size=config.block_size,
            policy=config.policy,
            policy_params=params,
            tokenizer=tokenizer,
            model_seed=config.model_seed,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _typed(pairs: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    return RouterConfig(policy_params=pairs).policy_params_dict


def pd_config(config: RouterConfig) -> PDConfig:
    """The PD pools' policies; a cache_aware pool takes SGLang's tuning flags (`cache_aware_params`)."""

    def params(policy: str) -> tuple[tuple[str, Any], ...]:
        return tuple(_typed(config.cache_aware_params).items()) if policy == "cache_aware" else ()

    return PDConfig(
        local_prefill_max_tokens=config.pd_local_prefill_max_tokens,
        max_attempts=1 + config.max_retries,
        prefill_policy=config.prefill_policy,
        prefill_policy_params=params(config.prefill_policy),
        decode_policy=config.decode_policy,
        decode_policy_params=params(config.decode_policy),
    )


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """PD mode: `forward_pd` builds the response; the request id header is added as it is sent."""
    rid = request.get(RID_KEY)
    if rid is not None and rid[0] not in response.headers:
        response.headers[rid[0]] = rid[1]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as JSON in the route's API format; never a traceback."""
    openai = request.path.startswith("/v1/")
    try:
        return await handler(request)
    except ApiError as err:
        return error_response(err, openai=openai, headers=err.headers or None)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(
            exc.status, "http_error"
        )
        allow = exc.headers.get("Allow")  # 405: which methods the path takes (RFC 9110 requires it)
        return error_response(
            ApiError(exc.status, exc.reason, "invalid_request_error", code),
            openai=openai,
            headers={"Allow": allow} if allow is not None else None,
        )
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(
            ApiError(500, "internal router error (see the router log)", "server_error", "internal_error"),
            openai=openai,
        )


def create_app(config: RouterConfig, router: Router | None = None) -> web.Application:
    """The router app. `router`: an existing core to serve (in-process use); built from `config` if None."""
    core = router if router is not None else build_router(config)
    metrics = Metrics()
    registry = WorkerRegistry(core, config, metrics)
    registry.instance_id = os.urandom(8).hex()  # named on /health and in the hop header (loop detection)
    admin = AdminApi(core, registry, config.admin_token)
    if config.admission_enabled:  # PD mode too: late binding of prefill (router/pd/fanout.py)
        admin.tenants = TenantRuntime(core, config, metrics)
    app = web.Application(
        middlewares=[error_middleware],
        client_max_size=config.max_body_bytes or 2**62,
        handler_args={"max_field_size": 65536},
    )
    app[CONFIG] = config
    app[ROUTER] = core
    app[METRICS] = metrics
    app[REGISTRY] = registry
    app[ADMIN] = admin
    app[OBSERVABILITY] = Observability(metrics, recent=config.recent_requests)
    if config.pd_disaggregation:
        try:
            app[PD_SELECTOR] = PDSelector(core, pd_config(config))
        except ValueError as exc:  # unknown prefill/decode policy
            raise ConfigError(f"PD policies: {exc}") from exc
        app[PD_METRICS] = PDMetrics(metrics.registry)
        admin.pd_metrics = app[PD_METRICS]
        app.on_response_prepare.append(_add_request_id)
    source = build_source(config)  # ConfigError now (a missing extra), not after listening
    if source is not None:
        app[DISCOVERY_SOURCE] = source
    app.cleanup_ctx.append(_lifecycle)

    def gen(spec: RouteSpec) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await request.app[PROXY].handle(request, spec)

        return handler

    r = app.router
    for spec in (GENERATE, COMPLETIONS, CHAT, *PLAIN_ROUTES):
        r.add_post(spec.path, gen(spec))
    r.add_get("/v1/models", models)
    r.add_get("/health", liveness)
    r.add_get("/liveness", liveness)
    r.add_get("/readiness", readiness)
    r.add_get("/metrics", metrics_handler)
    r.add_post("/flush_cache", flush_cache)
    r.add_get("/flush_cache", flush_cache)
    r.add_get("/get_loads", get_loads)
    r.add_post("/abort_request", abort_request)
    for path in ("/model_info", "/get_model_info"):
        r.add_get(path, worker_info)
    for path in ("/server_info", "/get_server_info"):
        r.add_get(path, worker_info)
    admin.add_routes(app)
    PeerRoutes(core, registry, admin).add_routes(app)
    ObservabilityApi(app[OBSERVABILITY], admin).add_routes(app)
    return app


def create_side_app(main: web.Application, what: str) -> web.Application:
    """A listener of its own over the main app's state: `metrics` (`--prometheus-port`: GET /metrics) or
    `health` (`--health-check-port`: /health, /liveness, /readiness). Started once `main` is running."""
    side = web.Application(middlewares=[error_middleware])
    for key in main:  # every piece of the main app's state (the handlers read several)
        side[key] = main[key]
    if what == "metrics":
        side.router.add_get("/metrics", metrics_handler)
    else:
        side.router.add_get("/health", liveness)
        side.router.add_get("/liveness", liveness)
        side.router.add_get("/readiness", readiness)
    return side


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    """One shared client session (pool without a per-host cap), the registry, then teardown in reverse."""
    config = app[CONFIG]
    obs = app[OBSERVABILITY]
    obs.open(config.access_log, config.otlp_traces_endpoint, config.trace_sample_ratio)
    connector = aiohttp.TCPConnector(
        limit=0,
        limit_per_host=0,
        ttl_dns_cache=300,
        enable_cleanup_closed=False,
        keepalive_timeout=4.0,  # control calls come every few seconds: no idle connection piles up meanwhile
    )
    session = aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,  # bytes pass through as the engine sent them (with its Content-Encoding)
        skip_auto_headers=("Accept-Encoding", "User-Agent"),
        timeout=aiohttp.ClientTimeout(total=None),
    )
    pool = Http1Pool()  # the proxy's keep-alive connections to engines (lean HTTP/1.1, hot path)
    app[SESSION] = session
    pd: PDContext | None = None
    if config.pd_disaggregation:
        selector = app[PD_SELECTOR]
        pd = PDContext(
            session,
            selector,
            pd_config(config),
            observer=app[PD_METRICS],
            health=app[REGISTRY],
            timeout=aiohttp.ClientTimeout(
                total=config.request_timeout_s or None,
                connect=config.connect_timeout_s or None,
                sock_read=config.stream_idle_timeout_s or None,
            ),
        )
    if pd is not None and app[ADMIN].tenants is not None:  # admission judges and picks the PD pair
        app[ADMIN].tenants.admission.chooser = admission_chooser(pd)
    app[PROXY] = Proxy(app[ROUTER], app[REGISTRY], app[METRICS], config, session, pd=pd, obs=obs)
    await app[REGISTRY].start(session, pool)
    try:
        # Replicas (redis_url set): load sync, shared membership; never waits on Redis to start.
        # Discovery (router/discovery/): adds and retires workers through the registry.
        async with (
            replica_context(config, app[ROUTER], app[REGISTRY]) as replicas,
            _tenants(app[ADMIN].tenants, app[PROXY], replicas, config),
            discovery_context(app.get(DISCOVERY_SOURCE), app[REGISTRY], app[METRICS]) as discovery,
        ):
            if discovery is not None:
                app[DISCOVERY] = discovery
            app[ADMIN].replicas = replicas
            try:
                # PD: the cost meter, and the autoscaler with --autoscale (router/autoscale)
                async with (
                    autoscale_context(
                        config,
                        app,
                        app[ROUTER],
                        app[REGISTRY],
                        app[PD_METRICS],
                        app[METRICS].registry,
                        lambda: app[ADMIN].replicas,
                    )
                    if config.pd_disaggregation
                    else contextlib.nullcontext()
                ) as autoscale:
                    app[ADMIN].autoscale = autoscale
                    yield
            finally:
                app[ADMIN].replicas = None
                app[ADMIN].autoscale = None
    finally:
        await app[REGISTRY].close()
        await app[PROXY].close()
        await obs.aclose()
        await app[ROUTER].close()
        pool.close()
        await session.close()


@contextlib.asynccontextmanager
async def _tenants(
    rt: TenantRuntime | None, proxy: Proxy, replicas: Any, config: RouterConfig
) -> AsyncIterator[None]:
    """Admission on the proxy while the app runs; quotas and tenants shared through the replicas' Redis."""
    if rt is None:
        yield
        return
    client = replicas.client if replicas is not None else None
    rid = replicas.replica_id if replicas is not None else ""
    async with rt.running(client, config.redis_key_prefix, rid):
        proxy.tenants = rt
        try:
            yield
        finally:
            proxy.tenants = None


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


async def liveness(request: web.Request) -> web.Response:
    resp = _json({"status": "ok"})
    resp.headers[INSTANCE_HEADER] = request.app[REGISTRY].instance_id  # lets a registry spot itself
    return resp


async def readiness(request: web.Request) -> web.Response:
    """503 until a worker is healthy; in PD mode until a prefill and a decode worker are both healthy."""
    reg = request.app[REGISTRY]
    healthy = reg.healthy_urls()
    body: dict[str, Any] = {"healthy_workers": len(healthy), "registered_workers": len(reg.urls())}
    if request.app[CONFIG].pd_disaggregation:
        up = set(healthy)
        roles = [w.role for w in request.app[ROUTER].workers() if w.url in up]
        body["healthy_prefill"] = roles.count(WorkerRole.PREFILL)
        body["healthy_decode"] = roles.count(WorkerRole.DECODE)
    ready = reg.ready()
    return _json({"status": "ready" if ready else "not ready", **body}, 200 if ready else 503)


async def models(request: web.Request) -> web.Response:
    """Union of the workers' models (ids as each engine serves them)."""
    data = [
        {"id": m, "object": "model", "created": 0, "owned_by": "sglang"}
        for m in request.app[REGISTRY].models()
    ]
    return _json({"object": "list", "data": data})


async def metrics_handler(request: web.Request) -> web.Response:
    app = request.app
    core = app[ROUTER]
    stats = core.index_stats()
    app[METRICS].refresh(core.workers(), stats.get("workers", {}), stats.get("blind_workers", []))
    app[METRICS].refresh_circuits(app[REGISTRY].circuit_states())
    app[OBSERVABILITY].flush_metrics()
    app[REGISTRY].check_blind()
    replicas = app[ADMIN].replicas
    app[METRICS].refresh_replicas(replicas.status() if replicas is not None else None)
    if app[ADMIN].autoscale is not None:  # PD: GPU-seconds and cost gauges (router/autoscale)
        app[ADMIN].autoscale.cost(core.workers())
    resp = web.Response(body=app[METRICS].exposition())
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


async def flush_cache(request: web.Request) -> web.Response:
    """Fan out to every healthy or draining worker; 200 only if all of them flushed. Admin access (it
    empties every engine's cache: issue #18 found it open to anyone)."""
    check_access(request, request.app[CONFIG].admin_token)
    reg = request.app[REGISTRY]
    urls = [w.url for w in request.app[ROUTER].workers() if w.state.value in ("healthy", "draining")]
    results = await asyncio.gather(*(reg.client(u).flush_cache() for u in urls), return_exceptions=True)
    out: dict[str, Any] = {}
    ok = True
    for url, res in zip(urls, results, strict=True):
        if isinstance(res, BaseException):
            ok = False
            out[url] = {"status": None, "message": str(res)}
        else:
            ok = ok and res[0] == 200
            out[url] = {"status": res[0], "message": res[1][:500]}
    return _json({"success": ok, "workers": out}, 200 if ok else 502)


async def abort_request(request: web.Request) -> web.Response:
    """SGLang's `POST /abort_request {"rid": ...}`: sent to the worker serving that rid when this router
    routed it (a client-given `rid`), else to every healthy or draining worker. Admin access."""
    check_access(request, request.app[CONFIG].admin_token)
    raw = await request.read()
    data = json_object(raw) if raw else {}
    rid = data.get("rid")
    if not isinstance(rid, str) or not rid:
        raise ApiError(400, "'rid' (a non-empty string) is required", "invalid_request_error", "missing_rid")
    reg = request.app[REGISTRY]
    known = request.app[PROXY].worker_of(rid)
    urls = (
        [known]
        if known is not None and known in reg
        else [w.url for w in request.app[ROUTER].workers() if w.state.value in ("healthy", "draining")]
    )
    results = await asyncio.gather(*(reg.client(u).abort(rid) for u in urls), return_exceptions=True)
    out = {
        u: None if not isinstance(r, BaseException) else str(r) for u, r in zip(urls, results, strict=True)
    }
    return _json({"rid": rid, "workers": out}, 200)


async def worker_info(request: web.Request) -> web.Response:
    """`/model_info` and `/server_info` of one healthy worker (clients such as benchmarks probe these)."""
    reg = request.app[REGISTRY]
    healthy = reg.healthy_urls()
    if not healthy:
        raise ApiError(503, "no healthy worker", "service_unavailable", "no_worker")
    client = reg.client(healthy[0])
    try:
        info = await (client.model_info() if "model_info" in request.path else client.server_info())
    except UpstreamError as exc:
        raise ApiError(
            502, f"worker {healthy[0]}: {exc.message}", "upstream_error", "upstream_error"
        ) from exc
    return _json(info)


async def get_loads(request: web.Request) -> web.Response:
    """Each worker's engine load (live /get_load) next to the router's own counters."""
    reg = request.app[REGISTRY]
    workers = request.app[ROUTER].workers()

    async def one(url: str) -> dict[str, Any]:
        try:
            load = await reg.client(url).get_load()
            return {"running": load.running, "queued": load.queued, "token_usage": load.token_usage}
        except UpstreamError as exc:
            return {"error": exc.message}

    engine = await asyncio.gather(*(one(w.url) for w in workers))
    return _json(
        {
            "workers": [
                {
                    "url": w.url,
                    "state": w.state.value,
                    "engine": e,
                    "router": {
                        "in_flight": w.load.in_flight,
                        "pending_prefill_tokens": w.load.pending_prefill_tokens,
                        "active_blocks": w.load.active_blocks,
                    },
                }
                for w, e in zip(workers, engine, strict=True)
            ]
        }
    )

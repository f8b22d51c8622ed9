"""Routes of SGLang's router and gateway that clients, probes and operators' scripts call, answered alike.

- `GET /health_generate`: a one-token generation on a healthy worker (200 once one passes, else 503);
- `GET /v1/models/{model}`: one model of the fleet (OpenAI's shape; 404 `model_not_found` as SGLang);
- `GET /engine_metrics`: every serving worker's own Prometheus `/metrics`, merged, each sample labelled
  `worker="URL"` (families kept together, so the exposition stays valid);
- smg's worker API: `GET /workers` (`{workers, total, stats}`), `GET /workers/{id}`, `POST /workers`
  (`{url, worker_type, bootstrap_port, api_key, ...}`, 202), `DELETE /workers/{id}`; an id is smg-style
  opaque (a UUID derived from the URL) or the URL itself; sglang-router's older `POST /add_worker?url=`,
  `POST /remove_worker?url=` and `GET /list_workers` too. Guarded like `/admin/*` (`--admin-token`, else
  loopback clients only); errors in smg's `{"error", "code"}` shape.
The forwarded POST routes (embeddings, responses, rerank, classify, score) go through the proxy
(`kvroute.router.proxy.PLAIN_ROUTES`).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import orjson
from aiohttp import web

from kvroute.engines.errors import UpstreamError
from kvroute.router.admin import AdminApi, check_access
from kvroute.router.config import normalize_url
from kvroute.router.errors import ApiError
from kvroute.router.types import WorkerRole, WorkerState
from kvroute.router.workers import WorkerRegistry

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_SERVING = (WorkerState.HEALTHY, WorkerState.DRAINING)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _smg_error(status: int, message: str, code: str) -> web.Response:
    return _json({"error": message, "code": code}, status)


def worker_id(url: str) -> str:
    """smg-style opaque worker id, stable for a URL (so every replica gives the same one)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, normalize_url(url)))


class PeerRoutes:
    """Handlers over the registry and the admin API (which guards, registers and tells replicas)."""

    def __init__(self, router: Any, registry: WorkerRegistry, admin: AdminApi) -> None:
        self.router = router
        self.registry = registry
        self.admin = admin

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/health_generate", self.health_generate)
        r.add_get("/v1/models/{model:.+}", self.model)
        r.add_get("/engine_metrics", self.engine_metrics)
        g = self._guarded
        r.add_get("/workers", g(self.list_workers))
        r.add_post("/workers", g(self.add_worker))
        r.add_get("/workers/{worker_id:.+}", g(self.get_worker))
        r.add_delete("/workers/{worker_id:.+}", g(self.remove_worker))
        r.add_post("/add_worker", g(self.legacy_add))
        r.add_post("/remove_worker", g(self.legacy_remove))
        r.add_get("/list_workers", g(self.legacy_list))

    def _guarded(self, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            try:
                check_access(request, self.admin.token)
            except ApiError as err:
                return _smg_error(
                    err.status, err.message, "UNAUTHORIZED" if err.status == 401 else "FORBIDDEN"
                )
            return await handler(request)

        return guarded

    # ---- serving-side probes and reads

    def _serving_urls(self) -> list[str]:
        """Serving workers, least busy first (a probe should not queue behind a long prompt)."""
        workers = [w for w in self.router.workers() if w.state in _SERVING]
        workers.sort(key=lambda w: (w.state is not WorkerState.HEALTHY, w.load.in_flight))
        return [w.url for w in workers]

    async def health_generate(self, request: web.Request) -> web.Response:
        """200 when a healthy worker generates a token (tried least busy first), else 503 with why."""
        errors: dict[str, str] = {}
        for url in [u for u in self._serving_urls() if u in self.registry.healthy_urls()]:
            try:
                await self.registry.client(url).health_generate()
            except UpstreamError as exc:
                errors[url] = exc.message
                continue
            return _json({"status": "ok", "worker": url})
        message = "no healthy worker" if not errors else "no worker passed /health_generate"
        return _json({"status": "unhealthy", "message": message, "errors": errors}, 503)

    async def model(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        if model not in self.registry.models():
            raise ApiError(
                404, f"The model '{model}' does not exist", "invalid_request_error", "model_not_found"
            )
        return _json({"id": model, "object": "model", "created": 0, "owned_by": "sglang", "root": model})

    async def engine_metrics(self, request: web.Request) -> web.Response:
        """The serving workers' /metrics merged, each sample with a `worker` label; a worker that fails is
        named in a comment (the scrape still succeeds with the others)."""
        urls = self._serving_urls()
        results = await asyncio.gather(
            *(self.registry.client(u).get_raw("/metrics") for u in urls), return_exceptions=True
        )
        merged = MetricsMerger()
        notes: list[str] = []
        for url, res in zip(urls, results, strict=True):
            if isinstance(res, BaseException):
                notes.append(f"# worker {url}: {getattr(res, 'message', res)}")
            elif res[0] != 200:
                notes.append(f"# worker {url}: /metrics answered {res[0]}")
            else:
                merged.add(url, res[2].decode("utf-8", "replace"))
        body = merged.text() + "".join(n.replace("\n", " ") + "\n" for n in notes)
        return web.Response(body=body.encode(), content_type="text/plain", charset="utf-8")

    # ---- smg's worker API

    def _info(self, url: str) -> dict[str, Any]:
        d = self.registry.describe(url)
        info: dict[str, Any] = {
            "id": worker_id(url),
            "url": url,
            "model_id": d.get("model") or "unknown",
            "priority": 50,
            "cost": 1.0,
            "worker_type": d["role"],
            "is_healthy": d["state"] == WorkerState.HEALTHY.value,
            "load": d["load"]["in_flight"],
            "connection_mode": "http",
            "metadata": {k: str(v) for k, v in (("state", d["state"]), ("reason", d["reason"])) if v},
        }
        if d.get("bootstrap_port") is not None:
            info["bootstrap_port"] = d["bootstrap_port"]
        return info

    def _find(self, ident: str) -> str | None:
        ident = unquote(ident)
        for url in self.registry.urls():
            if ident in (worker_id(url), url) or normalize_url(ident) == url:
                return url
        return None

    async def list_workers(self, request: web.Request) -> web.Response:
        infos = [self._info(u) for u in self.registry.urls()]
        by_type = {"regular": 0, "prefill": 0, "decode": 0}
        for i in infos:
            by_type[i["worker_type"]] = by_type.get(i["worker_type"], 0) + 1
        stats = {
            "total_workers": len(infos),
            "healthy_workers": sum(1 for i in infos if i["is_healthy"]),
            "total_models": len(self.registry.models()),
            "total_load": sum(i["load"] for i in infos),
            "by_type": by_type,
        }
        return _json({"workers": infos, "total": len(infos), "stats": stats})

    async def get_worker(self, request: web.Request) -> web.Response:
        url = self._find(request.match_info["worker_id"])
        if url is None:
            return _smg_error(404, f"worker {request.match_info['worker_id']} not found", "WORKER_NOT_FOUND")
        return _json(self._info(url))

    async def add_worker(self, request: web.Request) -> web.Response:
        """smg's `WorkerConfigRequest`: `url` (required), `worker_type` (regular | prefill | decode),
        `bootstrap_port`, `api_key` (this engine's key); its other fields (priority, cost, labels,
        health-check overrides, gRPC ones) are accepted and not used."""
        try:
            body = orjson.loads(await request.read() or b"{}")
        except orjson.JSONDecodeError:
            return _smg_error(400, "body must be a JSON object", "BAD_REQUEST")
        if not isinstance(body, dict) or not isinstance(body.get("url"), str) or not body["url"]:
            return _smg_error(400, "'url' (string) is required", "BAD_REQUEST")
        wt = body.get("worker_type") or "regular"
        try:
            role = WorkerRole(wt)
        except ValueError:
            return _smg_error(
                400, f"'worker_type' must be regular, prefill or decode, got {wt!r}", "BAD_REQUEST"
            )
        bp = body.get("bootstrap_port")
        if bp is not None and (
            not isinstance(bp, int) or isinstance(bp, bool) or role is not WorkerRole.PREFILL
        ):
            return _smg_error(400, "'bootstrap_port' must be an integer, for a prefill worker", "BAD_REQUEST")
        key = body.get("api_key")
        if key is not None and not isinstance(key, str):
            return _smg_error(400, "'api_key' must be a string", "BAD_REQUEST")
        try:
            worker = await self.admin.register_worker(request, body["url"], role, None, bp, key)
        except ApiError as err:
            code = "WORKER_ALREADY_EXISTS" if err.status == 409 else "BAD_REQUEST"
            return _smg_error(err.status, err.message, code)
        return _json(
            {
                "success": True,
                "message": f"worker {worker.url} added; registering in the background",
                "worker": self._info(worker.url),
            },
            202,
        )

    async def remove_worker(self, request: web.Request) -> web.Response:
        ident = request.match_info["worker_id"]
        url = self._find(ident)
        if url is None:
            return _smg_error(404, f"worker {ident} not found", "WORKER_NOT_FOUND")
        await self.admin.unregister_worker(url)
        return _json({"success": True, "message": f"worker {url} removed"})

    # ---- sglang-router's older API (query parameter `url`, plain-text answers)

    async def legacy_add(self, request: web.Request) -> web.Response:
        url = request.query.get("url")
        if not url:
            return web.Response(status=400, text="url query parameter is required")
        try:
            worker = await self.admin.register_worker(request, url, WorkerRole.REGULAR)
        except ApiError as err:
            return web.Response(status=err.status, text=err.message)
        return web.Response(text=f"Successfully added worker: {worker.url}")

    async def legacy_remove(self, request: web.Request) -> web.Response:
        url = request.query.get("url")
        if not url:
            return web.Response(status=400, text="url query parameter is required")
        try:
            await self.admin.unregister_worker(url)
        except ApiError as err:
            return web.Response(status=err.status, text=err.message)
        return web.Response(text=f"Successfully removed worker: {normalize_url(url)}")

    async def legacy_list(self, request: web.Request) -> web.Response:
        return _json({"urls": self.registry.urls()})


class MetricsMerger:
    """Merges Prometheus text expositions of several workers: each sample gains `worker="URL"`, and the
    samples of one family stay together under one HELP/TYPE (the format requires it)."""

    def __init__(self) -> None:
        self._families: dict[str, list[str]] = {}  # family -> HELP/TYPE lines (first worker's)
        self._samples: dict[str, list[str]] = {}

    def add(self, worker: str, text: str) -> None:
        label = 'worker="' + worker.replace("\\", "\\\\").replace('"', '\\"') + '"'
        family = ""
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                parts = line.split(None, 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = parts[2]
                    head = self._families.setdefault(family, [])
                    if not any(h.split(None, 2)[1] == parts[1] for h in head):
                        head.append(line)
                    self._samples.setdefault(family, [])
                continue
            name_end = min((i for i in (line.find("{"), line.find(" ")) if i >= 0), default=-1)
            if name_end < 0:
                continue
            name = line[:name_end]
            key = family if family and name.startswith(family) else name
            self._families.setdefault(key, [])
            if line[name_end] == "{":
                inner = line[name_end + 1 :]
                sep = "" if inner.startswith("}") else ","
                sample = f"{name}{{{label}{sep}{inner}"
            else:
                sample = f"{name}{{{label}}}{line[name_end:]}"
            self._samples.setdefault(key, []).append(sample)

    def text(self) -> str:
        out: list[str] = []
        for family, head in self._families.items():
            out.extend(head)
            out.extend(self._samples.get(family, []))
        return "\n".join(out) + ("\n" if out else "")

"""`create_app(core)`: the routes of SGLang 0.5.10's HTTP server over one `EngineCore`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from kvroute.cache_index.hashing import Tokenizer
from kvroute.engines.core import EngineCore
from kvroute.engines.http_api import extra, native, openai
from kvroute.engines.http_api.common import STATE, ApiState, byte_tokenizer
from kvroute.engines.http_api.metrics import EngineCollector, metrics


def api_key_middleware(api_key: str) -> Any:
    """SGLang's `utils/auth.py` for the plain `--api-key`: 401 `{"error": "Unauthorized"}` without the key;
    paths starting with /health or /metrics stay open (probes), as do the simulator's /sim/ knobs."""
    expected = f"Bearer {api_key}"

    @web.middleware
    async def check(request: web.Request, handler: Any) -> web.StreamResponse:
        path = request.path
        if (
            path.startswith(("/health", "/metrics", "/sim/"))
            or request.headers.get("Authorization") == expected
        ):
            resp: web.StreamResponse = await handler(request)
            return resp
        return web.json_response({"error": "Unauthorized"}, status=401)

    return check


def create_app(
    core: EngineCore,
    *,
    tokenizer: Tokenizer | None = None,
    served_model_name: str | None = None,
    extra_server_info: dict[str, Any] | None = None,
    manage_core: bool = True,
    api_key: str | None = None,
) -> web.Application:
    """The SGLang-compatible app over `core`. With `manage_core`, the app starts and closes the engine.
    `api_key`: SGLang's `--api-key` (all routes need `Authorization: Bearer KEY` but /health*, /metrics*)."""
    st = ApiState(
        core=core,
        tokenizer=tokenizer or byte_tokenizer(),
        served_model_name=served_model_name,
        extra_server_info=dict(extra_server_info or {}),
    )
    st.registry.register(EngineCollector(st))
    app = web.Application(
        client_max_size=64 * 1024 * 1024, middlewares=[api_key_middleware(api_key)] if api_key else []
    )
    app[STATE] = st
    r = app.router
    r.add_route("POST", "/generate", native.generate)
    r.add_route("PUT", "/generate", native.generate)
    r.add_post("/v1/completions", openai.completions)
    r.add_post("/v1/chat/completions", openai.chat_completions)
    r.add_get("/v1/models", openai.models)
    extra.add_routes(app)
    r.add_get("/health", native.health)
    r.add_get("/health_generate", native.health_generate)
    r.add_get("/server_info", native.server_info)
    r.add_get("/get_server_info", native.server_info)
    r.add_get("/model_info", native.model_info)
    r.add_get("/get_model_info", native.model_info)
    r.add_get("/get_load", native.get_load)
    r.add_get("/v1/loads", native.v1_loads)
    r.add_route("POST", "/flush_cache", native.flush_cache)
    r.add_get("/flush_cache", native.flush_cache)
    r.add_post("/abort_request", native.abort_request)
    r.add_get("/metrics", metrics)
    if manage_core:

        async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
            await core.start()
            yield
            await core.close()

        app.cleanup_ctx.append(lifecycle)
    return app

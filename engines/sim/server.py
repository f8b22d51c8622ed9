"""One simulated SGLang server: a `SimEngine` behind the SGLang HTTP app on one port, plus fault endpoints.

`POST /sim/faults` (JSON object of `FaultConfig` fields) changes faults at run time and answers the
resulting knobs; `GET /sim/faults` reads them. `refuse_connections` closes the listening socket
(connect() is refused) and reopening binds the same port again.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from kvroute.engines.http_api import create_app
from kvroute.engines.sim.dp import DpSimEngine
from kvroute.engines.sim.engine import SimEngine

ENGINE: web.AppKey[SimEngine | DpSimEngine] = web.AppKey("kvroute_sim_engine")


class SimServer:
    """Owns the runner and site of one engine. `url` is valid after `start()`."""

    def __init__(
        self,
        engine: SimEngine | DpSimEngine,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
    ) -> None:
        self.engine = engine
        self.host = host
        self.port = port
        self.app = create_app(
            engine,
            manage_core=False,
            extra_server_info={"incremental_streaming_output": engine.config.incremental_streaming_output},
            api_key=api_key,
        )
        self.app[ENGINE] = engine
        self.app.router.add_post("/sim/faults", self._set_faults)
        self.app.router.add_get("/sim/faults", self._get_faults)
        self._runner = web.AppRunner(
            self.app, handle_signals=False, access_log=None, handler_cancellation=True, shutdown_timeout=2.0
        )
        self._site: web.TCPSite | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        await self.engine.start()
        await self._runner.setup()
        await self._open()  # bind even when refusing, so the port (and the URL) is known and fixed
        if self.engine.faults.refuse_connections:
            await self._close_listener()

    async def _open(self) -> None:
        # backlog: SGLang (uvicorn) listens with 2048; 128 (the default) overflows when a router opens
        # hundreds of connections at once (connects time out, resets).
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True, backlog=2048)
        await site.start()
        server = site._server  # the asyncio Server: the only place the bound port is exposed
        socks = getattr(server, "sockets", None)
        if self.port == 0 and socks:
            self.port = int(socks[0].getsockname()[1])
        self._site = site

    async def _close_listener(self) -> None:
        if self._site is not None:
            await self._site.stop()
            self._site = None

    async def set_refuse(self, refuse: bool) -> None:
        if refuse:
            await self._close_listener()
        elif self._site is None:
            await self._open()

    async def close(self) -> None:
        await self._close_listener()
        await self.engine.close()  # aborts what runs, so open streams end before the runner waits on them
        await self._runner.cleanup()

    async def _set_faults(self, request: web.Request) -> web.Response:
        try:
            changes = await request.json(loads=orjson.loads)
            if not isinstance(changes, dict):
                raise ValueError("body must be a JSON object of fault knobs")
            self.engine.set_faults(changes)
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": {"message": str(exc)}}, status=400)
        if "refuse_connections" in changes:
            # Closing the listener leaves accepted connections (this one included) open.
            await self.set_refuse(bool(changes["refuse_connections"]))
        return web.json_response(self.engine.faults.as_dict())

    async def _get_faults(self, request: web.Request) -> web.Response:
        return web.json_response(self.engine.faults.as_dict())

"""The PD bootstrap server of a prefill engine and the decode engine's client for it.

The router sends the same request, with `bootstrap_host`, `bootstrap_port` and `bootstrap_room`, to a
prefill and a decode engine (SGLang's protocol, docs/pd.md). The prefill engine serves its bootstrap
port; the decode engine reaches it there, as SGLang's decode side reaches the prefill's bootstrap server:

- `GET  /kvroute/bootstrap/pool`: the prefill pool's `PoolDescriptor` (shapes, owner, CUDA IPC handles).
- `GET  /kvroute/bootstrap/room/{room}?timeout_s=T`: waits (long poll, at most T s) until the room's
  prefill has finished, then answers its lent pages and first token. 504: not within T (the decode side
  answers its client 500, as SGLang does); 409: the prefill failed or was aborted; 410: the pages were
  already taken back.
- `POST /kvroute/bootstrap/room/{room}/release`: the decode side has copied the pages; the prefill engine
  unlocks them (they stay in its prefix cache).

The rooms themselves are `kvroute.engines.sim.pd.BootstrapRegistry` (one per prefill engine): a room nobody
waits
for is kept for the decode wait timeout, then dropped, and the engine takes its pages back.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from kvroute.engines.core import BadRequest, BootstrapTimeout, EngineError
from kvroute.engines.gpu.transfer import PoolDescriptor
from kvroute.engines.sim.pd import BootstrapRegistry

log = logging.getLogger(__name__)

PREFIX = "/kvroute/bootstrap"


@dataclass(frozen=True, slots=True)
class LentKv:
    """A finished prefill's prompt pages, locked in the prefill pool until the decode side releases them."""

    room: int
    pool_id: str
    pages: tuple[int, ...]
    prompt_tokens: int
    cached_tokens: int
    first_token: int | None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LentKv:
        return cls(
            room=int(d["room"]),
            pool_id=str(d["pool_id"]),
            pages=tuple(int(p) for p in d["pages"]),
            prompt_tokens=int(d["prompt_tokens"]),
            cached_tokens=int(d["cached_tokens"]),
            first_token=None if d.get("first_token") is None else int(d["first_token"]),
        )


class Lender(Protocol):
    """The prefill engine, as its bootstrap server sees it (called on the event loop)."""

    def descriptor(self) -> PoolDescriptor: ...

    def lent(self, room: int) -> LentKv | None: ...

    def claimed(self, room: int) -> None:
        """A decode side took the room: its pages now wait for `release` (bounded by a timer)."""

    def release(self, room: int) -> bool: ...


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "code": status}}, status=status)


class BootstrapServer:
    """One prefill engine's bootstrap endpoint (aiohttp, on the engine's event loop)."""

    def __init__(self, lender: Lender, registry: BootstrapRegistry, host: str, port: int) -> None:
        self.lender = lender
        self.registry = registry
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    async def start(self) -> int:
        app = web.Application()
        app.router.add_get(PREFIX + "/pool", self._pool)
        app.router.add_get(PREFIX + "/room/{room}", self._claim)
        app.router.add_post(PREFIX + "/room/{room}/release", self._release)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _pool(self, request: web.Request) -> web.Response:
        return web.json_response(self.lender.descriptor().as_dict())

    @staticmethod
    def _room(request: web.Request) -> int:
        try:
            return int(request.match_info["room"])
        except ValueError as exc:
            raise web.HTTPBadRequest(text="bootstrap room must be an integer") from exc

    async def _claim(self, request: web.Request) -> web.Response:
        room = self._room(request)
        try:
            timeout = float(request.query.get("timeout_s", "30"))
        except ValueError:
            return _error(400, "timeout_s must be a number")
        try:
            await self.registry.claim(room, max(0.0, timeout))
        except TimeoutError:
            return _error(504, f"bootstrap room {room}: the prefill did not finish within {timeout:g} s")
        except RuntimeError as exc:
            return _error(409, f"bootstrap room {room}: prefill failed: {exc}")
        lent = self.lender.lent(room)
        if lent is None:
            return _error(410, f"bootstrap room {room}: its pages were already taken back")
        self.lender.claimed(room)
        return web.json_response(asdict(lent))

    async def _release(self, request: web.Request) -> web.Response:
        room = self._room(request)
        return web.json_response({"released": self.lender.release(room)})


class BootstrapClient:
    """The decode engine's side: find the prefill's pool, wait for a room, release it. One per engine."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._pools: dict[tuple[str, int], PoolDescriptor] = {}

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return self._session

    @staticmethod
    def _base(host: str, port: int) -> str:
        h = f"[{host}]" if ":" in host and not host.startswith("[") else host
        return f"http://{h}:{port}{PREFIX}"

    async def claim(self, host: str, port: int, room: int, timeout_s: float) -> tuple[LentKv, PoolDescriptor]:
        """Wait for the room's prefill; raises `BootstrapTimeout` or `EngineError` (as SGLang does)."""
        base = self._base(host, port)
        try:
            async with self._http().get(
                f"{base}/room/{room}",
                params={"timeout_s": f"{timeout_s:g}"},
                timeout=aiohttp.ClientTimeout(total=timeout_s + 10.0),
            ) as r:
                body = await r.json(content_type=None)
                status = r.status
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            raise EngineError(
                f"bootstrap room {room}: cannot reach the prefill's bootstrap server {host}:{port} ({exc!r})"
            ) from exc
        if status == 504:
            raise BootstrapTimeout(
                f"bootstrap room {room}: KV cache never arrived from the prefill server within "
                f"{timeout_s:g} s (is the prefill request running?)"
            )
        if status != 200:
            msg = body.get("error", {}).get("message") if isinstance(body, dict) else None
            raise EngineError(msg or f"bootstrap room {room}: prefill's bootstrap server answered {status}")
        lent = LentKv.from_dict(body)
        desc = await self.descriptor(host, port, lent.pool_id)
        return lent, desc

    async def descriptor(self, host: str, port: int, pool_id: str) -> PoolDescriptor:
        key = (host, port)
        desc = self._pools.get(key)
        if desc is None or desc.pool_id != pool_id:  # first contact, or the prefill engine restarted
            try:
                async with self._http().get(
                    self._base(host, port) + "/pool", timeout=aiohttp.ClientTimeout(total=30)
                ) as r:
                    if r.status != 200:
                        raise EngineError(f"prefill bootstrap {host}:{port}: /pool answered {r.status}")
                    desc = PoolDescriptor.from_dict(await r.json())
            except aiohttp.ClientError as exc:
                raise EngineError(f"prefill bootstrap {host}:{port} unreachable ({exc!r})") from exc
            if desc.pool_id != pool_id:
                raise BadRequest(f"prefill bootstrap {host}:{port} serves pool {desc.pool_id}, not {pool_id}")
            self._pools[key] = desc
        return desc

    async def release(self, host: str, port: int, room: int) -> None:
        """Best effort: a release that does not arrive is covered by the prefill side's timer."""
        try:
            async with self._http().post(
                f"{self._base(host, port)}/room/{room}/release", timeout=aiohttp.ClientTimeout(total=10)
            ) as r:
                await r.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.warning("bootstrap room %s: release to %s:%s failed (%r)", room, host, port, exc)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

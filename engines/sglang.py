"""Async client of one SGLang server: control calls (health, info, load, flush, abort) and raw forwarding.

Control calls share the caller's aiohttp session; `open` (the proxy's hot path) goes through the
lean `kvroute.engines.http1.Http1Pool`. Every low-level failure leaves this module as an
`kvroute.engines.errors`
exception raised `from` the original.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from kvroute.engines.errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamHTTPError,
    UpstreamProtocolError,
    UpstreamStreamBroken,
    UpstreamTimeout,
)
from kvroute.engines.http1 import Http1Pool, Timeouts, UpstreamResponse

# Re-exported: the transport lived here before `engines/http1.py` (router/pd.py and older callers).
__all__ = [
    "EngineLoad",
    "Http1Pool",
    "SGLangClient",
    "Timeouts",
    "UpstreamResponse",
    "map_exception",
    "parse_load",
]


def map_exception(url: str, exc: BaseException, *, started: bool = False) -> UpstreamError:
    """One mapping from aiohttp/asyncio failures to kvroute's upstream errors.

    `started`: the response had begun (a drop then is a broken stream, not a connect failure).
    """
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, TimeoutError):  # includes aiohttp's ServerTimeoutError / SocketTimeoutError
        return UpstreamTimeout(url, f"timed out ({type(exc).__name__})")
    if isinstance(exc, aiohttp.ClientPayloadError) or started:
        return UpstreamStreamBroken(url, f"stream broken: {exc!s}" or type(exc).__name__)
    if isinstance(exc, aiohttp.ClientError | OSError):
        return UpstreamConnectError(url, f"{type(exc).__name__}: {exc!s}")
    return UpstreamConnectError(url, repr(exc))


@dataclass(frozen=True)
class EngineLoad:
    """The engine's own view of its load, summed over data-parallel ranks."""

    running: int
    queued: int
    token_usage: float | None  # fraction of KV capacity in use, when the engine says


class SGLangClient:
    """One engine endpoint. Cheap to create: holds only the URL, the shared session and timeouts."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        *,
        control_timeout_s: float = 5.0,
        pool: Http1Pool | None = None,
        api_key: str | None = None,
        health_path: str = "/health",
        health_timeout_s: float | None = None,
    ) -> None:
        """`api_key`: the engine's `--api-key`, sent as `Authorization: Bearer` on every call (SGLang leaves
        only paths starting with /health and /metrics open). `health_path` and `health_timeout_s`: the
        health check (`--health-check-endpoint`, `--health-check-timeout-secs`; default: control timeout)."""
        self.session = session
        self.url = url.rstrip("/")
        parts = urlsplit(self.url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"engine url must be http://host[:port], got {url!r}")
        self._key = (parts.hostname, parts.port or 80)
        self._host_header = parts.netloc
        self.pool = pool if pool is not None else Http1Pool()
        self._timeout = aiohttp.ClientTimeout(total=control_timeout_s or None)
        self._auth = f"Bearer {api_key}" if api_key else None
        self.health_path = health_path
        self._health_timeout_s = control_timeout_s if health_timeout_s is None else health_timeout_s
        self._load_path: str | None = None  # learned: /get_load (<=0.5.10) or /v1/loads (newer)

    @property
    def key(self) -> tuple[str, int]:
        """(host, port): this engine's connections in the pool."""
        return self._key

    async def _request(self, method: str, path: str, *, json_body: Any = None) -> bytes:
        return (await self._exchange(method, path, json_body=json_body))[0]

    async def _exchange(
        self, method: str, path: str, *, json_body: Any = None, timeout: float | None = None
    ) -> tuple[bytes, Mapping[str, str]]:
        data = orjson.dumps(json_body) if json_body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if self._auth:
            headers["Authorization"] = self._auth
        t = self._timeout if timeout is None else aiohttp.ClientTimeout(total=timeout or None)
        try:
            async with self.session.request(
                method, self.url + path, data=data, headers=headers, timeout=t
            ) as resp:
                body = await resp.read()
                if resp.status >= 400:
                    raise UpstreamHTTPError(self.url, resp.status, body[:2048])
                return body, resp.headers
        except UpstreamError:
            raise
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise map_exception(self.url, exc) from exc

    async def _get_json(self, path: str, fallback: str | None = None) -> Any:
        try:
            body = await self._request("GET", path)
        except UpstreamHTTPError as exc:
            if fallback is None or exc.status != 404:
                raise
            body = await self._request("GET", fallback)
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise UpstreamProtocolError(self.url, f"{path}: not JSON") from exc

    async def health(self) -> Mapping[str, str]:
        """Raises when unhealthy; returns the response headers (a kvroute router names itself there).
        The path and timeout are the operator's (`--health-check-endpoint`, `--health-check-timeout-secs`)."""
        return (await self._exchange("GET", self.health_path, timeout=self._health_timeout_s))[1]

    async def health_generate(self, timeout: float | None = None) -> None:
        """`/health_generate`: the engine runs a one-token generation, so a wedged scheduler fails it
        (its `/health` may still answer 200)."""
        await self._exchange("GET", "/health_generate", timeout=timeout)

    async def get_raw(self, path: str) -> tuple[int, str, bytes]:
        """GET `path` as is: (status, content type, body), any status (for forwarded GET routes)."""
        headers = {"Authorization": self._auth} if self._auth else {}
        try:
            async with self.session.get(self.url + path, headers=headers, timeout=self._timeout) as resp:
                return resp.status, resp.content_type, await resp.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise map_exception(self.url, exc) from exc

    async def server_info(self) -> dict[str, Any]:
        info = await self._get_json("/server_info", "/get_server_info")
        if not isinstance(info, dict):
            raise UpstreamProtocolError(self.url, "/server_info: not an object")
        return info

    async def model_info(self) -> dict[str, Any]:
        info = await self._get_json("/model_info", "/get_model_info")
        if not isinstance(info, dict):
            raise UpstreamProtocolError(self.url, "/model_info: not an object")
        return info

    async def models(self) -> list[dict[str, Any]]:
        data = await self._get_json("/v1/models")
        items = data.get("data") if isinstance(data, dict) else None
        return [m for m in items if isinstance(m, dict)] if isinstance(items, list) else []

    async def get_load(self) -> EngineLoad:
        """`/get_load` (list of per-rank dicts, SGLang <= 0.5.10) or `/v1/loads` (`{"loads": [...]}`)."""
        paths = [self._load_path] if self._load_path else ["/get_load", "/v1/loads"]
        last: UpstreamError | None = None
        for path in paths:
            try:
                data = await self._get_json(path)
            except UpstreamHTTPError as exc:
                last = exc
                if exc.status == 404:
                    continue
                raise
            self._load_path = path
            return parse_load(data, self.url)
        assert last is not None
        raise last

    async def flush_cache(self) -> tuple[int, str]:
        """Returns (status, message); SGLang answers 400 while requests are running."""
        try:
            body = await self._request("POST", "/flush_cache")
            return 200, body.decode("utf-8", "replace")
        except UpstreamHTTPError as exc:
            return exc.status, exc.body.decode("utf-8", "replace")

    async def abort(self, rid: str) -> None:
        await self._request("POST", "/abort_request", json_body={"rid": rid})

    async def open(
        self, path: str, body: bytes, headers: Mapping[str, str], timeouts: Timeouts
    ) -> UpstreamResponse:
        """POST `body` unchanged with `headers` (end-to-end ones; Host and Content-Length are set here)
        and return once the response head arrived. The caller reads the body and `close()`s it."""
        parts = [f"POST {path} HTTP/1.1\r\nHost: {self._host_header}\r\n"]
        if self._auth is None:
            parts += [f"{k}: {v}\r\n" for k, v in headers.items()]
        else:  # the client's credentials were for the router; the engine gets its own key
            parts += [f"{k}: {v}\r\n" for k, v in headers.items() if k.lower() != "authorization"]
            parts.append(f"Authorization: {self._auth}\r\n")
        parts.append(f"Content-Length: {len(body)}\r\n\r\n")
        head = "".join(parts).encode("utf-8", "surrogateescape")
        return await self.pool.request(self.url, self._key, head, body, timeouts)


def parse_load(data: Any, url: str = "") -> EngineLoad:
    ranks: list[Any]
    if isinstance(data, dict) and isinstance(data.get("loads"), list):
        ranks = data["loads"]
    elif isinstance(data, list):
        ranks = data
    elif isinstance(data, dict):
        ranks = [data]
    else:
        raise UpstreamProtocolError(url, "load: unexpected shape")
    running = queued = 0
    usages: list[float] = []
    for r in ranks:
        if not isinstance(r, dict):
            continue
        running += int(r.get("num_running_reqs", r.get("num_reqs", 0)) or 0)
        queued += int(r.get("num_waiting_reqs", 0) or 0)
        u = r.get("token_usage")
        if isinstance(u, int | float):
            usages.append(float(u))
    return EngineLoad(running, queued, sum(usages) / len(usages) if usages else None)

"""Async client of one SGLang server: control calls (health, info, load, flush, abort) and raw forwarding.

All calls share the caller's aiohttp session (one connection pool per router). Every low-level
failure leaves this module as an `engines.errors` exception raised `from` the original.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from multidict import CIMultiDict

from engines.errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamHTTPError,
    UpstreamProtocolError,
    UpstreamStreamBroken,
    UpstreamTimeout,
)


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
    ) -> None:
        self.session = session
        self.url = url.rstrip("/")
        parts = urlsplit(self.url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"engine url must be http://host[:port], got {url!r}")
        self._key = (parts.hostname, parts.port or 80)
        self._host_header = parts.netloc
        self.pool = pool if pool is not None else Http1Pool()
        self._timeout = aiohttp.ClientTimeout(total=control_timeout_s or None)
        self._load_path: str | None = None  # learned: /get_load (<=0.5.10) or /v1/loads (newer)

    async def _request(self, method: str, path: str, *, json_body: Any = None) -> bytes:
        data = orjson.dumps(json_body) if json_body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else None
        try:
            async with self.session.request(
                method, self.url + path, data=data, headers=headers, timeout=self._timeout
            ) as resp:
                body = await resp.read()
                if resp.status >= 400:
                    raise UpstreamHTTPError(self.url, resp.status, body[:2048])
                return body
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

    async def health(self) -> None:
        await self._request("GET", "/health")

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
        parts += [f"{k}: {v}\r\n" for k, v in headers.items()]
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


# ---------------------------------------------------------------------------------------------------
# Lean HTTP/1.1 transport for the proxy's hot path.
#
# aiohttp's client costs ~100 us of Python per request (request object, URL, cookies, tracing hooks);
# the proxy only needs: write one pre-built request, parse status + headers, relay the body. This
# transport does that over pooled keep-alive connections (asyncio.Protocol, no StreamReader), with
# connect / idle / total timeouts, flow control, and the same error mapping as the rest of the module.

_MAX_BUFFER = 256 * 1024  # body bytes buffered before reading from the engine pauses


@dataclass(frozen=True)
class Timeouts:
    """Seconds; None = no limit. `idle`: between two reads; `total`: the whole exchange."""

    connect: float | None = None
    idle: float | None = None
    total: float | None = None


class _Conn(asyncio.Protocol):
    """One keep-alive connection; carries one exchange at a time and parses its response incrementally."""

    def __init__(self, pool: Http1Pool, key: tuple[str, int]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.reused = False
        self._reset()

    def _reset(self) -> None:
        self._buf = b""
        self._phase = 0  # 0 head, 1 content-length body, 2 chunked body, 3 body until close, 4 done
        self._remaining = 0
        self._chunk_left = -1  # chunked: bytes left in the current chunk (-1: expecting a size line)
        self.status = 0
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.keep_alive = True
        self._body: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.got_bytes = False

    # -- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.keep_alive = False
        if self._phase == 3:
            self._phase = 4
        elif self._phase != 4 and self._exc is None:
            self._exc = ConnectionResetError("connection closed by the engine") if exc is None else exc
        self.pool._forget(self)
        self._wake()

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self._feed(data)
        except ValueError as exc:  # malformed response: drop the connection
            self._exc = exc
            self.keep_alive = False
            if self.transport is not None:
                self.transport.abort()
        self._wake()

    def pause_writing(self) -> None:  # pragma: no cover - request bodies are written in one go
        pass

    def resume_writing(self) -> None:  # pragma: no cover
        pass

    # -- parser
    def _feed(self, data: bytes) -> None:
        while self._phase == 0:
            self._buf += data
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > 65536:
                    raise ValueError("response head too large")
                return
            self._parse_head(self._buf[:end])
            data, self._buf = self._buf[end + 4 :], b""
            if 100 <= self.status < 200:  # interim response (100 Continue): the real one follows
                self._phase, self.status, self.headers = 0, 0, CIMultiDict()
                if not data:
                    return
                continue
            if not data:
                return
        if self._phase == 1:
            take = data[: self._remaining]
            self._remaining -= len(take)
            self._push(take)
            if self._remaining == 0:
                self._phase = 4
        elif self._phase == 2:
            self._feed_chunked(data)
        elif self._phase == 3:
            self._push(data)

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        status_line = lines[0].split(b" ", 2)
        if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1."):
            raise ValueError(f"bad status line {lines[0][:80]!r}")
        self.status = int(status_line[1])
        http10 = status_line[0] == b"HTTP/1.0"
        h = self.headers
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if sep:
                h.add(name.strip().decode("latin-1"), value.strip().decode("utf-8", "surrogateescape"))
        conn = h.get("Connection", "").lower()
        self.keep_alive = ("keep-alive" in conn) if http10 else ("close" not in conn)
        if self.status in (204, 304) or 100 <= self.status < 200:
            self._phase = 4  # no body (1xx heads are skipped by _feed)
        elif "chunked" in h.get("Transfer-Encoding", "").lower():
            self._phase = 2
        elif "Content-Length" in h:
            self._remaining = int(h["Content-Length"])
            self._phase = 1 if self._remaining else 4
        else:
            self._phase = 3
            self.keep_alive = False

    def _feed_chunked(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        self._buf = b""
        pos = 0
        n = len(buf)
        while pos < n:
            if self._chunk_left > 0:
                take = buf[pos : pos + self._chunk_left]
                self._chunk_left -= len(take)
                pos += len(take)
                self._push(take)
                if self._chunk_left == 0:
                    self._chunk_left = -2  # expect the CRLF after the data
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                self._buf = buf[pos:]
                return
            line = buf[pos:eol]
            pos = eol + 2
            if self._chunk_left == -2:  # the CRLF closing a chunk's data
                self._chunk_left = -1
                continue
            if self._chunk_left == -3:  # trailers, until an empty line
                if not line:
                    self._phase = 4
                    return
                continue
            size = int(line.split(b";", 1)[0].strip() or b"x", 16)
            if size == 0:
                self._chunk_left = -3
            else:
                self._chunk_left = size

    def _push(self, data: bytes) -> None:
        if not data:
            return
        self._body.append(data)
        self._buffered += len(data)
        if self._buffered > _MAX_BUFFER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def wait(self, timeout: float | None, deadline: float | None) -> None:
        """Wait for the parser to make progress (bytes, end, error) or the timeout."""
        loop = asyncio.get_running_loop()
        self._waiter = fut = loop.create_future()
        handle = None
        at = None if timeout is None else loop.time() + timeout
        if deadline is not None:
            at = deadline if at is None else min(at, deadline)
        if at is not None:
            handle = loop.call_at(at, _expire, fut)
        try:
            await fut
        finally:
            self._waiter = None
            if handle is not None:
                handle.cancel()

    def take(self) -> bytes:
        out = b"".join(self._body) if len(self._body) > 1 else (self._body[0] if self._body else b"")
        self._body.clear()
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return out


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class UpstreamResponse:
    """An engine's response: status and headers now, the body read whole or relayed chunk by chunk.

    `close()` returns the connection to the pool when the body was read to the end, else drops it
    (which is how an engine learns that the client left).
    """

    def __init__(self, conn: _Conn, url: str, timeouts: Timeouts, deadline: float | None) -> None:
        self._conn = conn
        self.url = url
        self.status = conn.status
        self.headers = conn.headers
        ctype = conn.headers.get("Content-Type", "")
        self.content_type = ctype.split(";", 1)[0].strip().lower()
        self._timeouts = timeouts
        self._deadline = deadline
        self._closed = False

    async def next_chunk(self) -> bytes:
        """The next body bytes; b"" at the end. UpstreamTimeout / UpstreamStreamBroken on failure."""
        c = self._conn
        while True:
            if c._body:
                return c.take()
            if c._phase == 4:
                return b""
            if c._exc is not None:
                raise UpstreamStreamBroken(self.url, f"stream broken: {c._exc}") from c._exc
            try:
                await c.wait(self._timeouts.idle, self._deadline)
            except TimeoutError as exc:
                raise UpstreamTimeout(self.url, "no data within the timeout") from exc

    async def read(self, limit: int | None = None) -> bytes:
        parts = []
        size = 0
        while limit is None or size < limit:
            chunk = await self.next_chunk()
            if not chunk:
                break
            parts.append(chunk)
            size += len(chunk)
        data = b"".join(parts)
        return data if limit is None else data[:limit]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        c = self._conn
        if c._phase == 4 and c.keep_alive and c._exc is None and not c._body:
            c.pool._release(c)
        else:
            c.keep_alive = False
            if c.transport is not None:
                c.transport.abort()


class Http1Pool:
    """Keep-alive connections per (host, port), shared by every `SGLangClient` of one router."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self._all: set[_Conn] = set()

    def _forget(self, conn: _Conn) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def _pop_idle(self, key: tuple[str, int]) -> _Conn | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                return conn
            self._all.discard(conn)
        return None

    def _release(self, conn: _Conn) -> None:
        conn._reset()
        conn.reused = True
        self._idle.setdefault(conn.key, []).append(conn)

    async def _connect(self, key: tuple[str, int], url: str, timeout: float | None) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(lambda: _Conn(self, key), *key), timeout)
        except TimeoutError as exc:
            raise UpstreamTimeout(url, "connect timed out") from exc
        except OSError as exc:
            raise UpstreamConnectError(url, f"{type(exc).__name__}: {exc}") from exc
        self._all.add(conn)
        return conn

    async def request(
        self, url: str, key: tuple[str, int], head: bytes, body: bytes, timeouts: Timeouts
    ) -> UpstreamResponse:
        """Send `head + body` and return once the response head arrived.

        A reused connection that the engine closed while idle is retried once on a fresh one (the
        engine answered nothing on it, so the request was not processed).
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeouts.total is None else loop.time() + timeouts.total
        for attempt in range(2):
            conn = self._pop_idle(key) or await self._connect(key, url, timeouts.connect)
            assert conn.transport is not None
            conn.transport.write(head + body if len(body) < 16384 else head)
            if len(body) >= 16384:
                conn.transport.write(body)
            while conn._phase == 0:
                if conn._exc is not None:
                    break
                try:
                    await conn.wait(timeouts.idle, deadline)
                except TimeoutError as exc:
                    conn.transport.abort()
                    raise UpstreamTimeout(url, "no response within the timeout") from exc
                except asyncio.CancelledError:
                    conn.transport.abort()
                    raise
            if conn._phase != 0:
                return UpstreamResponse(conn, url, timeouts, deadline)
            err = conn._exc
            conn.transport.abort()
            if conn.reused and not conn.got_bytes and attempt == 0:
                continue
            raise UpstreamConnectError(url, f"connection failed before a response: {err}") from err
        raise UpstreamConnectError(url, "no usable connection")

    def close(self) -> None:
        for conn in list(self._all):
            if conn.transport is not None:
                conn.transport.abort()
        self._all.clear()
        self._idle.clear()

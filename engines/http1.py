"""Lean pooled HTTP/1.1 client transport for the proxy's hot path (router -> engine requests).

Why it exists: aiohttp's client costs ~100 us of Python per request (request object, URL handling,
cookie jar, tracing hooks, StreamReader), measured with `bench/router_overhead.py` (kvroute's added
p50 and its sustained rate next to sglang-router's). The proxy only needs: write one pre-built request,
parse status + headers, relay the body. This transport does that over pooled keep-alive connections
(`asyncio.Protocol`, no StreamReader), with connect / idle / total timeouts, read-side flow control, and
the same `kvroute.engines.errors` types as the rest of the engine client. Control calls (health, info, loads)
keep using aiohttp: they are off the hot path.

Scope (deliberately small): HTTP/1.1 and 1.0 responses, Content-Length, chunked (extensions and
trailers skipped) and read-until-close bodies, interim 1xx heads skipped, `Connection: close` honoured,
one exchange per connection at a time (no pipelining), plain TCP (no TLS: engines sit on the cluster
network).

Stale keep-alive connections: an engine (uvicorn: 5 s) closes idle connections; a connection idle for
more than `max_idle_s` is not reused, one the engine already closed is discarded when taken, and a
reused connection that dies before any response byte is retried once on a fresh connection only when
that is safe: the request is idempotent, or nothing of it was written.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass

from multidict import CIMultiDict

from kvroute.engines.errors import (
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamStreamBroken,
    UpstreamTimeout,
)

MAX_HEAD_BYTES = 65536  # a response head (status line + headers) above this is refused
_MAX_BUFFER = 256 * 1024  # body bytes buffered before reading from the engine pauses
_SPLIT_WRITE = 16384  # bodies at least this big are written separately (no head + body copy)
_PIECEWISE_WRITE = 4 << 20  # bodies at least this big are written in pieces, yielding between them
_WRITE_PIECE = 1 << 20

# Parser phases.
_HEAD, _LENGTH, _CHUNKED, _UNTIL_CLOSE, _DONE = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class Timeouts:
    """Seconds; None = no limit. `idle`: between two reads; `total`: the whole exchange.
    `idle_head`: `idle` also bounds the wait for the response head (a stream's head comes at once; a
    non-streamed answer's head comes when generation ends, so only `total` bounds it)."""

    connect: float | None = None
    idle: float | None = None
    total: float | None = None
    idle_head: bool = True


class WorkerStalled(ConnectionError):
    """The pool's owner declared the engine wedged and failed its exchanges (`Http1Pool.fail_busy`)."""


class HostActivity:
    """Exchanges in flight to one engine and when it last sent a byte: what stall detection reads."""

    __slots__ = ("busy", "progress_at")

    def __init__(self) -> None:
        self.busy: set[_Conn] = set()
        self.progress_at = 0.0  # loop time of the last byte received, or of going from idle to busy


class _Conn(asyncio.Protocol):
    """One keep-alive connection; carries one exchange at a time and parses its response incrementally."""

    def __init__(self, pool: Http1Pool, key: tuple[str, int]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.reused = False
        self.idle_since: float | None = None  # set while the connection sits in the pool
        self.lost = False
        # One lazily re-armed timer per connection instead of a call_at per wait (a timer per relayed
        # chunk cost ~7% of the router's CPU under load): it fires at most once per `idle` period and
        # only expires a waiter whose own expiry (`_wait_at`) has passed.
        # The loop, looked up once: on CPython 3.11 every asyncio.get_running_loop() is a getpid()
        # syscall, and wait() runs once per relayed chunk.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._wait_at: float | None = None
        self.activity: HostActivity | None = None  # set while an exchange runs
        self._reset()

    def _exchange_done(self) -> None:
        a = self.activity
        if a is not None:
            a.busy.discard(self)
            self.activity = None

    def _reset(self) -> None:
        self._cancel_timer()
        self._buf = b""
        self._phase = _HEAD
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
        self.lost = True
        self._exchange_done()
        self._cancel_timer()
        self.keep_alive = False
        if self._phase == _UNTIL_CLOSE:
            self._phase = _DONE
        elif self._phase != _DONE and self._exc is None:
            self._exc = ConnectionResetError("connection closed by the engine") if exc is None else exc
        self.pool._forget(self)
        self._wake()

    def data_received(self, data: bytes) -> None:
        if self.idle_since is not None:  # bytes nobody asked for (e.g. a 408 on an idle connection)
            self.keep_alive = False
            if self.transport is not None:
                self.transport.abort()
            return
        self.got_bytes = True
        a = self.activity
        if a is not None and self._loop is not None:
            a.progress_at = self._loop.time()
        try:
            self._feed(data)
        except ValueError as exc:  # malformed response: drop the connection
            self._exc = exc
            self.keep_alive = False
            if self.transport is not None:
                self.transport.abort()
        self._wake()

    # -- parser
    def _feed(self, data: bytes) -> None:
        while self._phase == _HEAD:
            self._buf += data
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > MAX_HEAD_BYTES:
                    raise ValueError(f"response head larger than {MAX_HEAD_BYTES} bytes")
                return
            if end > MAX_HEAD_BYTES:
                raise ValueError(f"response head larger than {MAX_HEAD_BYTES} bytes")
            self._parse_head(self._buf[:end])
            data, self._buf = self._buf[end + 4 :], b""
            if 100 <= self.status < 200:  # interim response (100 Continue): the real one follows
                self._phase, self.status, self.headers = _HEAD, 0, CIMultiDict()
                if not data:
                    return
                continue
            if not data:
                return
        if self._phase == _LENGTH:
            take = data[: self._remaining]
            self._remaining -= len(take)
            self._push(take)
            if self._remaining == 0:
                self._phase = _DONE
                if len(data) > len(take):  # bytes past the body: the connection cannot be trusted
                    self.keep_alive = False
        elif self._phase == _CHUNKED:
            self._feed_chunked(data)
        elif self._phase == _UNTIL_CLOSE:
            self._push(data)
        elif data:  # _DONE and more bytes arrived
            self.keep_alive = False

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
            self._phase = _DONE  # no body (1xx heads are skipped by _feed)
        elif "chunked" in h.get("Transfer-Encoding", "").lower():
            self._phase = _CHUNKED
        elif "Content-Length" in h:
            self._remaining = int(h["Content-Length"])
            if self._remaining < 0:
                raise ValueError("negative Content-Length")
            self._phase = _LENGTH if self._remaining else _DONE
        else:
            self._phase = _UNTIL_CLOSE
            self.keep_alive = False

    def _feed_chunked(self, data: bytes) -> None:
        if self._chunk_left == -1 and not self._buf:
            # Fast path, the streaming case: `data` is exactly one whole chunk ("size CRLF bytes CRLF").
            eol = data.find(b"\r\n", 0, 18)
            if eol > 0 and data.endswith(b"\r\n"):
                head = data[:eol]
                if b";" not in head:
                    size = int(head.strip() or b"x", 16)
                    if size > 0 and len(data) == eol + 4 + size:
                        self._push(data[eol + 2 : -2])
                        return
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
                if len(self._buf) > MAX_HEAD_BYTES:
                    raise ValueError("chunk size line or trailer too long")
                return
            line = buf[pos:eol]
            pos = eol + 2
            if self._chunk_left == -2:  # the CRLF closing a chunk's data
                if line:
                    raise ValueError("chunk data not followed by CRLF")
                self._chunk_left = -1
                continue
            if self._chunk_left == -3:  # trailers, until an empty line
                if not line:
                    self._phase = _DONE
                    if pos < n:
                        self.keep_alive = False
                    return
                continue
            size = int(line.split(b";", 1)[0].strip() or b"x", 16)
            if size < 0:
                raise ValueError("negative chunk size")
            self._chunk_left = -3 if size == 0 else size

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
        """Wait for the parser to make progress (bytes, end, error) or the timeout.

        `timeout` counts from this call, `deadline` is absolute (loop time); the earlier one applies.
        """
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        self._waiter = fut = loop.create_future()
        at = None if timeout is None else loop.time() + timeout
        if deadline is not None:
            at = deadline if at is None else min(at, deadline)
        self._wait_at = at
        if at is not None and (self._timer is None or self._timer_at > at):
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = at
            self._timer = loop.call_at(at, self._on_timer)
        try:
            await fut
        finally:
            self._waiter = None
            self._wait_at = None

    def _on_timer(self) -> None:
        """Expire the pending wait if its time has come, else re-arm for it (or stay unarmed)."""
        self._timer = None
        at, fut = self._wait_at, self._waiter
        if at is None or fut is None or fut.done():
            return
        loop = fut.get_loop()
        if loop.time() >= at:
            fut.set_exception(TimeoutError())
        else:
            self._timer_at = at
            self._timer = loop.call_at(at, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def take(self) -> bytes:
        out = b"".join(self._body) if len(self._body) > 1 else (self._body[0] if self._body else b"")
        self._body.clear()
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return out

    def abort(self) -> None:
        self._exchange_done()
        self._cancel_timer()
        self.keep_alive = False
        if self.transport is not None:
            self.transport.abort()


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
            if c._phase == _DONE:
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
        if c._phase == _DONE and c.keep_alive and c._exc is None and not c._body and not c.lost:
            c.pool._release(c)
        else:
            c.abort()


class Http1Pool:
    """Keep-alive connections per (host, port), shared by every `SGLangClient` of one router.

    `max_idle_s`: a connection idle longer than this is closed instead of reused (keep it below the
    engines' keep-alive timeout, uvicorn's default is 5 s, so the engine never closes one we are about to
    write on); None = no limit.
    """

    def __init__(self, max_idle_s: float | None = 4.0) -> None:
        self.max_idle_s = max_idle_s
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self._all: set[_Conn] = set()
        self.connects = 0  # connections opened (observability and tests)
        self._hosts: dict[tuple[str, int], HostActivity] = {}
        self._reaper: asyncio.TimerHandle | None = None  # armed while idle connections exist

    def _forget(self, conn: _Conn) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def _pop_idle(self, key: tuple[str, int], now: float) -> _Conn | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()  # most recently used first
            since, conn.idle_since = conn.idle_since, None
            usable = not conn.lost and conn.transport is not None and not conn.transport.is_closing()
            if usable and (self.max_idle_s is None or since is None or now - since <= self.max_idle_s):
                return conn
            conn.abort()
            self._all.discard(conn)
        return None

    def _release(self, conn: _Conn) -> None:
        conn._exchange_done()
        conn._reset()
        conn.reused = True
        loop = conn._loop or asyncio.get_running_loop()
        conn.idle_since = loop.time()
        self._idle.setdefault(conn.key, []).append(conn)
        if self._reaper is None and self.max_idle_s is not None:
            self._reaper = loop.call_later(self.max_idle_s, self._reap, loop)

    def _reap(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close connections idle past `max_idle_s` (they would never be reused: without this, a burst
        leaves its descriptors open until the engine closes them, or forever if it never does)."""
        self._reaper = None
        assert self.max_idle_s is not None
        cutoff = loop.time() - self.max_idle_s
        for key in list(self._idle):
            idle = self._idle[key]
            keep = [c for c in idle if c.idle_since is not None and c.idle_since > cutoff and not c.lost]
            for c in list(idle):
                if c not in keep:
                    c.idle_since = None
                    c.abort()
                    self._all.discard(c)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        if self._idle:
            self._reaper = loop.call_later(self.max_idle_s / 2, self._reap, loop)

    def idle_count(self, key: tuple[str, int] | None = None) -> int:
        if key is not None:
            return len(self._idle.get(key, ()))
        return sum(len(v) for v in self._idle.values())

    def forget_host(self, key: tuple[str, int]) -> None:
        """The engine left the fleet: its idle connections and its activity record go."""
        self.close_host(key)
        a = self._hosts.get(key)
        if a is not None and not a.busy:
            del self._hosts[key]

    def close_host(self, key: tuple[str, int]) -> None:
        """Close the idle connections to one engine (it left the fleet). Busy ones finish their exchange;
        if pooled again then, the reaper closes them after `max_idle_s`."""
        for conn in self._idle.pop(key, []):
            conn.idle_since = None
            conn.abort()
            self._all.discard(conn)

    async def _connect(self, key: tuple[str, int], url: str, timeout: float | None) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(lambda: _Conn(self, key), *key), timeout)
        except TimeoutError as exc:
            raise UpstreamTimeout(url, "connect timed out") from exc
        except OSError as exc:
            raise UpstreamConnectError(url, f"{type(exc).__name__}: {exc}") from exc
        self.connects += 1
        self._all.add(conn)
        conn._loop = loop
        return conn

    # -- stall detection (read by the worker registry)
    def stalled_for(self, key: tuple[str, int], now: float) -> float:
        """Seconds the engine has had exchanges in flight without sending a byte (0 when idle)."""
        a = self._hosts.get(key)
        if a is None or not a.busy:
            return 0.0
        return max(0.0, now - a.progress_at)

    def in_flight(self, key: tuple[str, int]) -> int:
        a = self._hosts.get(key)
        return len(a.busy) if a is not None else 0

    def mark_progress(self, key: tuple[str, int], now: float) -> None:
        """The engine proved alive another way (a probe generation passed): restart the stall clock."""
        a = self._hosts.get(key)
        if a is not None:
            a.progress_at = now

    def fail_busy(self, key: tuple[str, int], reason: str) -> int:
        """Fail every exchange in flight to the engine (its requests see `WorkerStalled`: retried where no
        byte reached the client, else their stream ends with an error) and close its idle connections.
        Returns how many exchanges were failed."""
        a = self._hosts.get(key)
        busy = list(a.busy) if a is not None else []
        for conn in busy:
            if conn._exc is None:
                conn._exc = WorkerStalled(reason)
            conn.abort()
            conn._wake()
        self.close_host(key)
        return len(busy)

    async def request(
        self,
        url: str,
        key: tuple[str, int],
        head: bytes,
        body: bytes,
        timeouts: Timeouts,
        *,
        idempotent: bool = False,
    ) -> UpstreamResponse:
        """Send `head + body` and return once the response head arrived.

        A reused connection that dies before any response byte is retried once on a fresh connection
        when `idempotent` (the engine may have received the request; repeating it is harmless) or when
        nothing was written on it. A POST that may have reached the engine is never sent twice here:
        the error goes to the caller, which decides (the proxy tries another worker).
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeouts.total is None else loop.time() + timeouts.total
        for attempt in range(2):
            conn = self._pop_idle(key, loop.time()) or await self._connect(key, url, timeouts.connect)
            transport = conn.transport
            assert transport is not None
            if conn.lost or transport.is_closing():  # closed between connect/pop and now: nothing written
                if attempt == 0:
                    continue
                raise UpstreamConnectError(url, "connection closed before the request was sent")
            act = self._hosts.get(key)
            if act is None:
                act = self._hosts[key] = HostActivity()
            if not act.busy:
                act.progress_at = loop.time()
            act.busy.add(conn)
            conn.activity = act
            if len(body) < _SPLIT_WRITE:
                transport.write(head + body)
            elif len(body) < _PIECEWISE_WRITE:
                transport.write(head)
                transport.write(body)
            else:  # a body of many MB: in pieces, a loop turn between (the transport copies what it buffers)
                transport.write(head)
                view = memoryview(body)
                for i in range(0, len(body), _WRITE_PIECE):
                    transport.write(view[i : i + _WRITE_PIECE])
                    await asyncio.sleep(0)
            head_wait = timeouts.idle if timeouts.idle_head else None
            while conn._phase == _HEAD and conn._exc is None:
                try:
                    await conn.wait(head_wait, deadline)
                except TimeoutError as exc:
                    conn.abort()
                    raise UpstreamTimeout(url, "no response within the timeout") from exc
                except asyncio.CancelledError:
                    conn.abort()
                    raise
            if conn._phase != _HEAD:
                return UpstreamResponse(conn, url, timeouts, deadline)
            err = conn._exc
            conn.abort()
            if isinstance(err, ValueError):
                raise UpstreamProtocolError(url, f"malformed response: {err}") from err
            if isinstance(err, WorkerStalled):  # nothing came back: another worker may serve it
                raise UpstreamTimeout(url, str(err)) from err
            if conn.reused and not conn.got_bytes and attempt == 0 and idempotent:
                continue
            raise UpstreamConnectError(url, f"connection closed before a response: {err}") from err
        raise UpstreamConnectError(url, "no usable connection")

    def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        for conn in list(self._all):
            conn.abort()
        self._all.clear()
        self._idle.clear()

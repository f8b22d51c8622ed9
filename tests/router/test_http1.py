"""`kvroute.engines.http1`: the pooled HTTP/1.1 transport of the proxy's hot path, against scripted raw
servers.

Each server is a plain `asyncio.start_server` on 127.0.0.1 whose per-connection handler a test writes,
so framing, keep-alive and failure cases are exact (no HTTP framework smoothing them over).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from kvroute.engines.errors import UpstreamConnectError, UpstreamProtocolError, UpstreamTimeout
from kvroute.engines.http1 import MAX_HEAD_BYTES, Http1Pool, Timeouts, _Conn
from tests.router.conftest import wait_until

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Server"], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
T = Timeouts(connect=2.0, idle=2.0, total=5.0)


class Server:
    """Counts connections and the requests read; runs `handler` per connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed = asyncio.Event()  # set when a handler closed its side
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> Server:
        self._server = await asyncio.start_server(self._on_conn, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.handler(reader, writer, self)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self.closed.set()
            self._tasks.discard(task)

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        """One request (head + Content-Length body), or None at EOF."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await reader.readexactly(length)
        self.requests.append(head + body)
        return head + body

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        if self._tasks:
            await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), 5.0)

    @property
    def key(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[Server]]]:
    servers: list[Server] = []

    async def start(handler: Handler) -> Server:
        s = await Server(handler).start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        await s.stop()


@pytest.fixture
def pool() -> Iterator[Http1Pool]:
    p = Http1Pool()
    yield p
    p.close()


def _head(path: str = "/generate", method: str = "POST", body: bytes = b"") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()


async def _get(pool: Http1Pool, srv: Server, body: bytes = b"{}", **kw: object) -> tuple[int, bytes]:
    resp = await pool.request(srv.url, srv.key, _head(body=body), body, kw.pop("timeouts", T), **kw)  # type: ignore[arg-type]
    try:
        return resp.status, await resp.read()
    finally:
        resp.close()


async def answer_each(reply: bytes) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        while await srv.read_request(reader) is not None:
            writer.write(reply)
            await writer.drain()

    return handler


# ---------------------------------------------------------------- parser, fed byte by byte


class _NoPool:
    def _forget(self, conn: _Conn) -> None:
        pass


def _parse_bytewise(raw: bytes) -> _Conn:
    conn = _Conn(_NoPool(), ("127.0.0.1", 1))  # type: ignore[arg-type]
    for i in range(len(raw)):  # worst case: every byte in its own read
        conn.data_received(raw[i : i + 1])
    return conn


def test_parser_chunked_and_interim_responses_split_anywhere() -> None:
    raw = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n"
        b'6\r\ndata: \r\na;ext=1\r\n{"k": 1}\n\n\r\n0\r\nTrailer: x\r\n\r\n'
    )
    conn = _parse_bytewise(raw)
    assert (conn.status, conn.headers["X-A"], conn._phase, conn.keep_alive) == (200, "1", 4, True)
    assert conn.take() == b'data: {"k": 1}\n\n'


def test_parser_content_length_and_close() -> None:
    conn = _parse_bytewise(b"HTTP/1.1 503 Busy\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
    assert (conn.status, conn.take(), conn._phase, conn.keep_alive) == (503, b"hello", 4, False)


def test_parser_bytes_past_the_body_make_the_connection_unusable() -> None:
    conn = _Conn(_NoPool(), ("127.0.0.1", 1))  # type: ignore[arg-type]
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA")
    assert (conn.take(), conn._phase, conn.keep_alive) == (b"ok", 4, False)


def test_parser_http10_without_keep_alive_and_bad_chunk_framing() -> None:
    conn = _parse_bytewise(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx")
    assert (conn.take(), conn.keep_alive) == (b"x", False)
    bad = _parse_bytewise(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY\r\n")
    assert isinstance(bad._exc, ValueError)


def test_parser_whole_chunk_per_read_fast_path() -> None:
    conn = _Conn(_NoPool(), ("127.0.0.1", 1))  # type: ignore[arg-type]
    conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    for part in (b"6\r\ndata: \r\n", b"A\r\n0123456789\r\n", b"3;x=1\r\nabc\r\n", b"2\r\nxy\r\n0\r\n\r\n"):
        conn.data_received(part)  # one whole chunk per read (the streaming case), then mixed reads
    assert (conn.take(), conn._phase, conn.keep_alive) == (b"data: 0123456789abcxy", 4, True)
    bad = _Conn(_NoPool(), ("127.0.0.1", 1))  # type: ignore[arg-type]
    bad.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    bad.data_received(b"2\r\nabX\r\n")  # size says 2, 3 bytes follow: not a whole chunk, and bad framing
    assert isinstance(bad._exc, ValueError)


# ---------------------------------------------------------------- over loopback


async def test_content_length_bodies_reuse_one_keep_alive_connection(serve, pool) -> None:
    srv = await serve(await answer_each(OK))
    results = [await _get(pool, srv) for _ in range(3)]
    assert results == [(200, b"ok")] * 3
    assert (srv.connections, pool.connects, len(srv.requests)) == (1, 1, 3)


async def test_chunked_body_in_pieces_then_reuse(serve, pool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        while await srv.read_request(reader) is not None:
            writer.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n"
            )
            for part in (b"5\r\nhel", b"lo\r\n", b"6\r\n world\r\n", b"0\r\n\r\n"):
                writer.write(part)
                await writer.drain()

    srv = await serve(handler)
    resp = await pool.request(srv.url, srv.key, _head(), b"", T)
    assert resp.content_type == "text/event-stream"
    chunks = []
    while chunk := await resp.next_chunk():
        chunks.append(chunk)
    resp.close()
    assert b"".join(chunks) == b"hello world"
    assert await _get(pool, srv) == (200, b"hello world")
    assert srv.connections == 1


async def test_connection_close_is_honoured(serve, pool) -> None:
    srv = await serve(
        await answer_each(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    )
    assert await _get(pool, srv) == (200, b"ok")
    assert await _get(pool, srv) == (200, b"ok")
    assert pool.connects == 2


async def test_body_until_close(serve, pool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\npart1,")
        await writer.drain()
        writer.write(b"part2")
        await writer.drain()

    srv = await serve(handler)
    assert await _get(pool, srv) == (200, b"part1,part2")
    assert await _get(pool, srv) == (200, b"part1,part2")
    assert pool.connects == 2


async def test_interim_100_continue_is_skipped(serve, pool) -> None:
    srv = await serve(await answer_each(b"HTTP/1.1 100 Continue\r\n\r\n" + OK))
    assert await _get(pool, srv) == (200, b"ok")
    assert await _get(pool, srv) == (200, b"ok")
    assert srv.connections == 1


async def test_large_request_body_is_sent_whole(serve, pool) -> None:
    srv = await serve(await answer_each(OK))
    body = b"x" * 100_000
    assert await _get(pool, srv, body=body) == (200, b"ok")
    assert srv.requests[0].endswith(body)


async def test_engine_closing_an_idle_connection_is_noticed_before_reuse(serve, pool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        await srv.read_request(reader)
        writer.write(OK)
        await writer.drain()  # then close: the keep-alive timeout of a uvicorn engine

    srv = await serve(handler)
    assert await _get(pool, srv) == (200, b"ok")
    await asyncio.wait_for(srv.closed.wait(), 5)
    await wait_until(lambda: not pool._idle.get(srv.key), what="the pool to drop the closed connection")
    assert await _get(pool, srv) == (200, b"ok")  # a POST, on a fresh connection, no error
    assert (pool.connects, len(srv.requests)) == (2, 2)


def _close_on_second_request() -> Handler:
    """Answers the first request on a connection; reads the second and closes without answering (the
    engine's keep-alive timer fired as our request arrived). Later connections are served normally."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        first_conn = srv.connections == 1
        n = 0
        while await srv.read_request(reader) is not None:
            n += 1
            if first_conn and n == 2:
                return
            writer.write(OK)
            await writer.drain()

    return handler


async def test_stale_connection_is_not_retried_for_a_post(serve, pool) -> None:
    srv = await serve(_close_on_second_request())
    assert await _get(pool, srv) == (200, b"ok")
    with pytest.raises(UpstreamConnectError) as info:
        await _get(pool, srv)
    assert info.value.retryable  # the proxy may try another worker; the transport never repeats a POST
    assert (len(srv.requests), pool.connects) == (2, 1)


async def test_stale_connection_is_retried_once_when_idempotent(serve, pool) -> None:
    srv = await serve(_close_on_second_request())
    assert await _get(pool, srv) == (200, b"ok")
    assert await _get(pool, srv, idempotent=True) == (200, b"ok")
    assert (len(srv.requests), pool.connects) == (3, 2)


async def test_fresh_connection_dying_is_not_retried_even_when_idempotent(serve, pool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        await srv.read_request(reader)  # and close without answering

    srv = await serve(handler)
    with pytest.raises(UpstreamConnectError):
        await _get(pool, srv, idempotent=True)
    assert len(srv.requests) == 1


async def test_connection_idle_past_max_idle_is_not_reused(serve, pool) -> None:
    srv = await serve(await answer_each(OK))
    assert await _get(pool, srv) == (200, b"ok")
    (conn,) = pool._idle[srv.key]
    assert conn.idle_since is not None
    conn.idle_since -= (pool.max_idle_s or 0) + 1.0  # as if it had sat idle past the limit
    assert await _get(pool, srv) == (200, b"ok")
    assert pool.connects == 2
    assert conn.transport is not None and conn.transport.is_closing()


async def test_unsolicited_bytes_on_an_idle_connection_drop_it(serve, pool) -> None:
    released = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        first = srv.connections == 1
        while await srv.read_request(reader) is not None:
            writer.write(OK)
            await writer.drain()
            if first:  # e.g. a 408 sent on a connection nobody is using any more
                await released.wait()
                writer.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()

    srv = await serve(handler)
    assert await _get(pool, srv) == (200, b"ok")
    assert len(pool._idle[srv.key]) == 1
    released.set()
    await wait_until(lambda: not pool._idle.get(srv.key), what="the pool to drop the connection")
    assert await _get(pool, srv) == (200, b"ok")
    assert pool.connects == 2


async def test_no_response_within_idle_timeout(serve, pool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        await srv.read_request(reader)
        await reader.read()  # never answers; returns when the client gives up

    srv = await serve(handler)
    with pytest.raises(UpstreamTimeout):
        await _get(pool, srv, timeouts=Timeouts(connect=2.0, idle=0.1, total=5.0))
    assert not pool._idle.get(srv.key)


async def test_idle_timeout_counts_from_the_last_read_of_a_stream(serve, pool) -> None:
    """The idle timer is armed once and re-armed lazily: chunks keep the stream alive, silence ends it."""
    silent_from: list[float] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(5):  # 5 x 0.12 s: longer than one idle period in all, each gap well within it
            writer.write(b"1\r\nx\r\n")
            await writer.drain()
            if i < 4:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(reader.read(), 0.12)
        silent_from.append(asyncio.get_running_loop().time())
        await reader.read()  # silence until the client gives up

    srv = await serve(handler)
    resp = await pool.request(srv.url, srv.key, _head(), b"", Timeouts(connect=2.0, idle=0.4, total=10.0))
    got = 0
    with pytest.raises(UpstreamTimeout):
        while await resp.next_chunk():
            got += 1
    timed_out_at = asyncio.get_running_loop().time()
    resp.close()
    assert got == 5
    assert timed_out_at - silent_from[0] >= 0.4 - 0.05  # not before a full idle period of silence


async def test_total_timeout_stops_a_trickling_stream(serve, pool) -> None:
    stop = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while not stop.is_set():
            writer.write(b"1\r\nx\r\n")
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.02)

    srv = await serve(handler)
    resp = await pool.request(srv.url, srv.key, _head(), b"", Timeouts(connect=2.0, idle=2.0, total=0.3))
    got = 0
    with pytest.raises(UpstreamTimeout):
        while await resp.next_chunk():
            got += 1
    resp.close()
    stop.set()
    assert got > 0  # data did flow; the whole-exchange deadline ended it


async def test_oversized_response_head_is_a_protocol_error(serve, pool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (MAX_HEAD_BYTES + 10) + b"\r\n\r\n")
        await writer.drain()
        await reader.read()

    srv = await serve(handler)
    with pytest.raises(UpstreamProtocolError):
        await _get(pool, srv)


async def test_abandoned_response_drops_the_connection(serve, pool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        while await srv.read_request(reader) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
            await writer.drain()

    srv = await serve(handler)
    resp = await pool.request(srv.url, srv.key, _head(), b"", T)
    assert await resp.next_chunk() == b"half"
    resp.close()  # the client left mid-body: the engine must see the connection drop
    await asyncio.wait_for(srv.closed.wait(), 5)
    assert not pool._idle.get(srv.key)


async def test_refused_connection_is_a_connect_error(pool) -> None:
    from tests.router.conftest import refused_url

    url = refused_url()
    port = int(url.rsplit(":", 1)[1])
    with pytest.raises(UpstreamConnectError):
        await pool.request(url, ("127.0.0.1", port), _head(), b"", T)

"""Fault matrix, part 2: what clients can do to the router (slow heads and bodies, connection floods,
malformed HTTP), over raw loopback sockets. Each case is bounded by small timeouts set in the config."""

from __future__ import annotations

import asyncio
import logging
import time

import orjson
import pytest

from tests.faults.conftest import gen, test_config

pytestmark = pytest.mark.slow


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def _raw(url: str, data: bytes, timeout: float = 5.0) -> bytes:
    """Send `data` on a fresh connection; the first response (head and Content-Length body)."""
    reader, writer = await asyncio.open_connection(*_host_port(url))
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            return head + await reader.readexactly(length)
    finally:
        writer.close()


def _status_and_json(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), orjson.loads(body)


async def test_slow_clients_are_closed_within_the_header_timeout_while_others_are_served(
    fleet, start_router
) -> None:
    f = await fleet(2)
    r = await start_router(test_config(worker_urls=tuple(f.urls), header_timeout_s=1.0))
    await r.wait_healthy(2)
    head = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"

    async def slow_client() -> tuple[float, bytes]:
        reader, writer = await asyncio.open_connection(*_host_port(r.url))
        t0 = time.monotonic()
        got = b""
        try:
            for i in range(len(head)):  # one byte every 100 ms: the head would take ~7 s
                writer.write(head[i : i + 1])
                try:  # read(n) keeps what arrived if the wait times out (read() until EOF would not)
                    got = await asyncio.wait_for(reader.read(65536), 0.1)
                except TimeoutError:
                    continue
                if got or reader.at_eof():
                    break
            elapsed = time.monotonic() - t0
            return elapsed, got + await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()

    slow = [asyncio.create_task(slow_client()) for _ in range(40)]
    sem = asyncio.Semaphore(8)

    async def normal(i: int) -> int:
        async with sem:
            return (await gen(r.session, r.url, f"normal {i} " * 8, max_new_tokens=4))[0]

    statuses = await asyncio.gather(*(normal(i) for i in range(40)))
    assert statuses == [200] * 40
    for elapsed, got in await asyncio.gather(*slow):
        assert elapsed < 5.0, elapsed  # closed by the server (1 s timeout), not by finishing the head
        status, body = _status_and_json(got)
        assert status == 408 and body["error"]["code"] == "header_timeout"
    text = await (await r.session.get(r.url + "/metrics")).text()
    assert 'kvroute_protocol_errors_total{kind="header_timeout"} 40.0' in text


async def test_connection_cap_answers_503_with_retry_after(start_router) -> None:
    r = await start_router(test_config(max_connections=8, header_timeout_s=5.0))
    await r.session.close()  # its keep-alive connections would count
    held = [await asyncio.open_connection(*_host_port(r.url)) for _ in range(8)]
    try:
        raw = await _raw(r.url, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        head = raw.partition(b"\r\n\r\n")[0]
        status, body = _status_and_json(raw)
        assert status == 503 and body["error"]["code"] == "too_many_connections"
        assert b"Retry-After: 1" in head
    finally:
        for _, w in held:
            w.close()


async def test_body_shorter_than_its_length_times_out(start_router) -> None:
    r = await start_router(test_config(body_timeout_s=0.5))
    t0 = time.monotonic()
    raw = await _raw(
        r.url,
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"prompt": ',
    )
    status, body = _status_and_json(raw)
    assert status == 408 and body["error"]["code"] == "body_timeout" and "param" in body["error"]
    assert time.monotonic() - t0 < 4.0


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", 431,
         "request_header_fields_too_large"),
        (b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"0\r\n\r\n", 400, "bad_http_request"),
        (b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", 400, "bad_http_request"),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, "bad_http_request"),
    ],
    ids=["oversized-header", "cl-and-te", "negative-length", "http2-preface"],
)  # fmt: skip
async def test_malformed_http_gets_json_and_a_rate_limited_log_line(
    start_router, caplog, request_bytes, status, code
) -> None:
    r = await start_router(test_config())
    caplog.set_level(logging.INFO)
    for _ in range(20):
        got_status, body = _status_and_json(await _raw(r.url, request_bytes))
        assert got_status == status and body["error"]["code"] == code
    errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR or rec.exc_info]
    assert errors == []
    lines = [rec for rec in caplog.records if rec.name == "kvroute.server"]
    assert len(lines) <= 1  # 20 bad requests, at most one line (http2-preface: none, like aiohttp's own)


async def test_non_utf8_authorization_is_a_401_not_a_500(start_router) -> None:
    r = await start_router(test_config(admin_token="secret"))
    raw = await _raw(r.url, b"GET /admin/workers HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n"
                     b"Connection: close\r\n\r\n")  # fmt: skip
    status, body = _status_and_json(raw)
    assert status == 401 and body["error"]["code"] == "unauthorized"

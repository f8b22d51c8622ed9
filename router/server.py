"""The router's HTTP server limits: request head timeout, a cap on client connections, protocol errors.

aiohttp's server has no timeout for reading a request head, so a client sending one byte a second held
its descriptor forever (issue #18: 1,100 of them with a 1,024 descriptor limit made every normal request
fail); its protocol errors (oversized headers, CL+TE, a negative length, an HTTP/2 preface) came out as
plain text with one ERROR traceback each, so anyone could flood the log. `RouterRunner` is aiohttp's
`AppRunner` whose connections are `GuardedRequestHandler`s:
- a request head must arrive within `header_timeout_s` of the connection opening or of its first byte,
  else the client gets 408 (JSON) and the connection closes;
- past `max_connections` open client connections, a new one gets 503 with Retry-After and is closed;
- protocol errors answer JSON in the OpenAI error shape (431 for oversized header lines), are counted in
  `kvroute_protocol_errors`, and logged at most once per `log_interval_s` per kind, without a traceback.
Bodies are bounded where they are read (`kvroute.router.proxy`: `body_timeout_s`).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from kvroute.router.config import RouterConfig

log = logging.getLogger("kvroute.server")


def error_json(status: int, message: str, code: str) -> bytes:
    """The OpenAI error shape (a superset of the native one): usable whatever the path was."""
    type_ = "invalid_request_error" if status < 500 else "service_unavailable"
    return orjson.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}})


def raw_response(status: int, reason: str, message: str, code: str, extra: str = "") -> bytes:
    """A whole HTTP/1.1 response that closes the connection, for places with no request object."""
    body = error_json(status, message, code)
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"Connection: close\r\n{extra}\r\n"
    )
    return head.encode() + body


@dataclass
class RateLimitedLog:
    """At most one line per `interval_s` per kind; the next line says how many were left out."""

    logger: logging.Logger
    interval_s: float = 10.0
    _last: dict[str, float] = field(default_factory=dict)
    _skipped: dict[str, int] = field(default_factory=dict)

    def warning(self, kind: str, msg: str, *args: Any, exc_info: BaseException | None = None) -> bool:
        return self.log(logging.WARNING, kind, msg, *args, exc_info=exc_info)

    def log(self, level: int, kind: str, msg: str, *args: Any, exc_info: BaseException | None = None) -> bool:
        """Returns whether the line was written."""
        now = time.monotonic()
        if now - self._last.get(kind, -1e18) < self.interval_s:
            self._skipped[kind] = self._skipped.get(kind, 0) + 1
            return False
        self._last[kind] = now
        skipped = self._skipped.pop(kind, 0)
        if skipped:
            msg += f" ({skipped} more like it in the last {self.interval_s:.0f}s not logged)"
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True


@dataclass
class ServerGuard:
    """The limits and the counters every connection of one server shares."""

    header_timeout_s: float
    max_connections: int
    metrics: Any = None  # router.metrics.Metrics (its `protocol_errors` counter), when the app has one
    errors: RateLimitedLog = field(default_factory=lambda: RateLimitedLog(log))

    def count(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.protocol_errors.labels(kind).inc()


class GuardedRequestHandler(RequestHandler):
    """aiohttp's connection handler with a request head timeout, the connection cap and JSON errors."""

    _guard: ServerGuard
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        manager = self._manager
        guard: ServerGuard = getattr(manager, "guard")  # noqa: B009  (set by RouterRunner)
        self._guard = guard
        if guard.max_connections and manager is not None and len(manager.connections) > guard.max_connections:
            guard.count("too_many_connections")
            guard.errors.warning(
                "too_many_connections",
                "refusing a client connection: %d open, the limit is %d (--max-connections)",
                len(manager.connections),
                guard.max_connections,
            )
            tr: Any = transport
            tr.write(
                raw_response(
                    503,
                    "Service Unavailable",
                    f"too many connections (limit {guard.max_connections}); retry shortly",
                    "too_many_connections",
                    "Retry-After: 1\r\n",
                )
            )
            self.force_close()
            tr.close()
            return
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        t = self._guard.header_timeout_s
        if t > 0 and self._head_timer is None:
            self._head_timer = self._loop.call_later(t, self._head_timed_out, self._request_count)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self, count: int) -> None:
        self._head_timer = None
        tr = self.transport
        if tr is None or tr.is_closing() or self._request_count != count or self._request_in_progress:
            return
        g = self._guard
        g.count("header_timeout")
        peer = tr.get_extra_info("peername")
        g.errors.warning(
            "header_timeout",
            "closing a client connection (%s): no complete request head within %.1fs (--header-timeout-secs)",
            peer[0] if isinstance(peer, tuple) else peer,
            g.header_timeout_s,
        )
        msg = f"request head not received within {g.header_timeout_s:g}s"
        tr.write(raw_response(408, "Request Timeout", msg, "header_timeout"))
        self.force_close()
        tr.close()

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:
            self._cancel_head_timer()  # a whole head arrived
        elif data and not self._request_in_progress and not self._messages:
            self._arm_head_timer()  # the first bytes of the next head: it has header_timeout_s from now

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Protocol errors (the client's) and unhandled ones: JSON, counted, logged with a rate limit;
        a traceback only for a 500 (the router's bug), and then at most once per interval."""
        g = self._guard
        if isinstance(exc, LineTooLong) and status == 400:
            status = 431
        if status >= 500:
            kind, code = "internal_error", "internal_error"
            text = "internal router error (see the router log)"
            g.errors.log(
                logging.ERROR, kind, "unhandled error on a connection from %s", request.remote, exc_info=exc
            )
        else:
            kind = "bad_request"
            code = "request_header_fields_too_large" if status == 431 else "bad_http_request"
            text = f"malformed HTTP request: {message or exc or 'bad request'}"[:300]
            if not isinstance(exc, BadHttpMethod) or self._request_count > 1:  # non-HTTP probes: silent
                g.errors.warning(kind, "bad request from %s: %s", request.remote, text)
        g.count(kind)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send the error")
        body = error_json(status, text, code)
        resp = web.Response(status=status, body=body, content_type="application/json")
        resp.force_close()
        return resp


class GuardedServer(Server):
    """aiohttp's connection factory, making `GuardedRequestHandler`s."""

    guard: ServerGuard

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, **self._kwargs)


class RouterRunner(web.AppRunner):
    """`AppRunner` for the router's app: the limits of `config` on every client connection."""

    def __init__(
        self, app: web.Application, config: RouterConfig, metrics: Any = None, **kwargs: Any
    ) -> None:
        kwargs.setdefault("handler_cancellation", True)
        kwargs.setdefault("access_log", None)
        kwargs.setdefault("shutdown_timeout", config.shutdown_grace_period_s)
        if config.keepalive_timeout_s:
            kwargs.setdefault("keepalive_timeout", config.keepalive_timeout_s)
        super().__init__(app, **kwargs)
        self.guard = ServerGuard(config.header_timeout_s, connection_cap(config.max_connections), metrics)

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        server.__class__ = GuardedServer  # same object and state; only its handler factory differs
        server.guard = self.guard  # type: ignore[attr-defined]
        return server

    def open_connections(self) -> int:
        server = self.server
        return len(server.connections) if server is not None else 0


def raise_descriptor_limit(want: int = 65536) -> int:
    """Raise the soft RLIMIT_NOFILE towards the hard one (as most servers do); returns the soft limit."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    except (OSError, ValueError):
        return -1
    return int(soft)


def connection_cap(configured: int) -> int:
    """`configured` (0 = automatic), lowered to half the process's descriptor limit: the other half is left
    for upstream connections, event sockets and files, so a flood of clients cannot starve the engines'."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return configured
    if soft == resource.RLIM_INFINITY:
        return configured
    half = max(16, soft // 2)
    return half if configured == 0 or configured > half else configured

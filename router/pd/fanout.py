"""The fan-out: the same body to both servers at once, the decode response relayed, aborts and retries.

See the package docstring (`kvroute.router.pd`) for the invariants this keeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import orjson
from aiohttp import web

from kvroute.engines.errors import UpstreamConnectError, UpstreamError, UpstreamHTTPError
from kvroute.engines.sglang import map_exception
from kvroute.router.core import Router
from kvroute.router.errors import ApiError, bad_request, error_response, from_upstream, sse_error_event
from kvroute.router.load import Ticket
from kvroute.router.pd.bootstrap import bootstrap_fields, bootstrap_host_of, insert_fields, rid_fields
from kvroute.router.pd.model import PDConfig, PDError, PDHealth, PDObserver, PDRecord, PDRoute
from kvroute.router.pd.selection import PDSelector, choose_admitted_route, choose_route
from kvroute.router.policies.base import NoWorkerAvailable
from kvroute.router.types import RoutingRequest, Worker, WorkerRole

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "content-encoding",
        "host",
    }
)
WORKER_HEADER = "X-Kvroute-Worker"  # the decode (or local) worker that answered, as the proxy reports it
PREFILL_WORKER_HEADER = "X-Kvroute-Prefill-Worker"
T = TypeVar("T")


@dataclass
class PDContext:
    """What `forward_pd` needs: one shared session, the selector (router + per-role policies), the
    config, and optionally metrics and the registry's circuit breaker. Build with `PDContext.create`."""

    session: aiohttp.ClientSession
    selector: PDSelector
    config: PDConfig = field(default_factory=PDConfig)
    observer: PDObserver | None = None
    health: PDHealth | None = None
    timeout: aiohttp.ClientTimeout | None = None
    rng: random.Random = field(default_factory=random.SystemRandom)

    @staticmethod
    def create(
        session: aiohttp.ClientSession, router: Router, config: PDConfig | None = None, **kw: Any
    ) -> PDContext:
        cfg = config if config is not None else PDConfig()
        return PDContext(session, PDSelector(router, cfg), cfg, **kw)


class _SideFailed(Exception):
    """One side of an attempt failed before anything reached the client; `side`: prefill | decode."""

    def __init__(self, side: str, url: str, error: UpstreamError) -> None:
        super().__init__(str(error))
        self.side = side
        self.url = url
        self.error = error


@dataclass
class _PrefillResult:
    status: int
    body: bytes
    done_at: float


def forward_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Request headers for the engines: hop-by-hop and body-framing ones dropped (aiohttp sets its own)."""
    return {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}


async def _run_prefill(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    timeout: aiohttp.ClientTimeout | None,
) -> _PrefillResult:
    """POST to the prefill server and read its whole answer (checked for errors, timings, logprobs)."""
    try:
        async with session.post(url, data=body, headers=headers, timeout=timeout) as resp:
            data = await resp.read()
            if resp.status >= 400:
                raise UpstreamHTTPError(url, resp.status, data[:4096])
            return _PrefillResult(resp.status, data, time.monotonic())
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise map_exception(url, exc) from exc


async def _open_decode(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    timeout: aiohttp.ClientTimeout | None,
) -> aiohttp.ClientResponse:
    try:
        resp = await session.post(url, data=body, headers=headers, timeout=timeout)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise map_exception(url, exc) from exc
    if resp.status >= 400:
        data = b""
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
            data = await resp.content.read(4096)
        resp.close()
        raise UpstreamHTTPError(url, resp.status, data)
    return resp


class _Attempt:
    """One pair (or one local worker) serving one request; see the module invariants."""

    def __init__(
        self,
        ctx: PDContext,
        route: PDRoute,
        path: str,
        body: bytes,
        headers: Mapping[str, str],
        rids: list[str],
        routing: RoutingRequest,
        openai: bool,
        priority: int = 0,
    ) -> None:
        self.ctx = ctx
        self.priority = priority
        self.route = route
        self.path = path
        self.body = body
        self.headers = headers
        self.rids = rids
        self.routing = routing
        self.openai = openai
        self.prefill_task: asyncio.Task[_PrefillResult] | None = None
        self.prefill_result: _PrefillResult | None = None
        self.prefill_ticket: Ticket | None = None
        self.decode_ticket: Ticket | None = None
        self.decode_resp: aiohttp.ClientResponse | None = None
        self.decode_done = False
        self.t0 = time.monotonic()
        cached = (
            route.decode_decision.cached_blocks
            if route.prefill is None
            else (route.prefill_decision.cached_blocks if route.prefill_decision else 0)
        )
        self.record = PDRecord(
            route.mode, "upstream_error", routing.prompt_tokens, cached * routing.block_size, 0
        )

    @property
    def decode_pool(self) -> str:
        return "decode" if self.route.prefill is not None else "local"

    # -- watching the prefill side while waiting on the decode side
    async def _watch(self, aw: Awaitable[T]) -> T:
        """Await `aw` (a decode step); if the prefill side fails first, raise its failure instead."""
        task = self.prefill_task
        if task is None or self.prefill_result is not None:
            return await aw
        inner = asyncio.ensure_future(aw)
        try:
            while True:
                if task.done():
                    self._collect_prefill()  # raises _SideFailed on a prefill error
                    return await inner
                await asyncio.wait({inner, task}, return_when=asyncio.FIRST_COMPLETED)
                if inner.done() and not task.done():
                    return inner.result()
        finally:
            if not inner.done():
                inner.cancel()
                with contextlib.suppress(BaseException):
                    await inner

    def _collect_prefill(self) -> None:
        task = self.prefill_task
        prefill = self.route.prefill
        assert task is not None and task.done() and prefill is not None
        if self.prefill_result is not None:
            return
        exc = None if task.cancelled() else task.exception()
        if task.cancelled() or exc is not None:
            err = exc if isinstance(exc, UpstreamError) else UpstreamConnectError(prefill.url, repr(exc))
            raise _SideFailed("prefill", prefill.url, err)
        self.prefill_result = task.result()
        self.record.prefill_s = self.prefill_result.done_at - self.t0
        meta = _meta_info(self.prefill_result.body)
        queue = meta.get("queue_time") if meta else None
        if isinstance(queue, int | float) and 0 <= queue <= self.record.prefill_s:
            self.record.prefill_queue_s = float(queue)
            self.record.prefill_s -= float(queue)
        self._release_prefill()

    def _release_prefill(self) -> None:
        """The prefill server is done with this request (answered, failed or aborted): free its load."""
        if self.prefill_ticket is None:
            return
        self.ctx.selector.router.on_finished(self.prefill_ticket)
        self.prefill_ticket = None
        if self.ctx.observer is not None:
            self.ctx.observer.pool_leave("prefill")

    async def run(self, request: web.Request) -> web.StreamResponse:
        """Serve the request or raise `_SideFailed` (nothing sent yet: the caller may retry)."""
        route, ctx = self.route, self.ctx
        sel, obs = ctx.selector, ctx.observer
        decode_role = WorkerRole.DECODE if route.prefill is not None else ctx.config.local_role
        try:
            self.decode_ticket = sel.on_routed(
                route.decode_decision, self.routing, decode_role, self.priority
            )
            if obs is not None:
                obs.pool_enter(self.decode_pool)
            if route.prefill is not None:
                assert route.prefill_decision is not None
                self.prefill_ticket = sel.on_routed(
                    route.prefill_decision, self.routing, WorkerRole.PREFILL, self.priority
                )
                if obs is not None:
                    obs.pool_enter("prefill")
                p_url = route.prefill.url + self.path
                self.prefill_task = asyncio.create_task(
                    _run_prefill(ctx.session, p_url, self.body, self.headers, ctx.timeout)
                )
            try:
                d_url = route.decode.url + self.path
                self.decode_resp = await self._watch(
                    _open_decode(ctx.session, d_url, self.body, self.headers, ctx.timeout)
                )
            except UpstreamError as err:
                raise self._prefer_prefill_error(_SideFailed("decode", route.decode.url, err)) from err
            return await self._relay(request, self.decode_resp)
        finally:
            await self._cleanup()

    def _prefer_prefill_error(self, failed: _SideFailed) -> _SideFailed:
        """A decode error while the prefill side also failed is the prefill's fault: report that one."""
        task = self.prefill_task
        if task is not None and task.done() and self.prefill_result is None:
            try:
                self._collect_prefill()
            except _SideFailed as pf:
                return pf
        return failed

    def _decode_failed(self, exc: BaseException, started: bool) -> _SideFailed:
        url = self.route.decode.url
        err = map_exception(url, exc, started=started)
        return self._prefer_prefill_error(_SideFailed("decode", url, err))

    async def _relay(self, request: web.Request, resp: aiohttp.ClientResponse) -> web.StreamResponse:
        route, router = self.route, self.ctx.selector.router
        out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in HOP_BY_HOP}
        out_headers[WORKER_HEADER] = route.decode.url
        if route.prefill is not None:
            out_headers[PREFILL_WORKER_HEADER] = route.prefill.url
        if not resp.content_type == "text/event-stream":
            try:
                data = await self._watch(resp.read())
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                raise self._decode_failed(exc, started=False) from exc
            self.decode_done = True
            await self._settle_prefill()
            data = self._merge_logprobs(data)
            self._finish_record_from(data)
            return web.Response(status=resp.status, body=data, headers=out_headers)
        it: AsyncIterator[bytes] = resp.content.iter_any().__aiter__()
        try:
            first = await self._watch(it.__anext__())
        except StopAsyncIteration:
            first = b""
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise self._decode_failed(exc, started=False) from exc
        t_first = time.monotonic()
        self.record.ttft_s = t_first - self.t0
        if self.prefill_result is not None:
            self.record.transfer_s = max(0.0, t_first - self.prefill_result.done_at)
        assert self.decode_ticket is not None
        router.on_first_token(self.decode_ticket)
        out = web.StreamResponse(status=resp.status, headers=out_headers)
        last = first
        chunks = 1 if first else 0
        try:
            await out.prepare(request)
            if first:
                await out.write(first)
            t_prev = t_first
            while True:
                try:
                    chunk = await self._watch(it.__anext__())
                except StopAsyncIteration:
                    break
                now = time.monotonic()
                self.record.itls.append(now - t_prev)
                t_prev = now
                chunks += 1
                last = chunk
                await out.write(chunk)
            self.decode_done = True
            self._finish_record_from(last, chunks)
            await out.write_eof()
        except _SideFailed as failed:
            await self._stream_error(out, failed.error)
        except (aiohttp.ClientError, TimeoutError) as exc:
            await self._stream_error(out, map_exception(route.decode.url, exc, started=True))
        except ConnectionError:  # the client went away (aiohttp raises ClientConnectionResetError)
            self.record.outcome = "client_gone"
        return out

    async def _stream_error(self, out: web.StreamResponse, err: UpstreamError) -> None:
        """Headers are gone: end the SSE stream with an error event, as the proxy does."""
        self.record.outcome = "upstream_error"
        if self.ctx.health is not None:
            self.ctx.health.record_failure(err.url, err.message)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await out.write(b"\n\n" + sse_error_event(from_upstream(err), openai=self.openai))
            await out.write_eof()

    async def _settle_prefill(self) -> None:
        """The decode side is done: wait briefly for the prefill's answer (timings and logprobs)."""
        task = self.prefill_task
        if task is None or self.prefill_result is not None:
            return
        with contextlib.suppress(TimeoutError, _SideFailed):
            await asyncio.wait_for(asyncio.shield(task), timeout=max(self.ctx.config.abort_timeout_s, 0.1))
        if task.done():
            with contextlib.suppress(_SideFailed):
                self._collect_prefill()

    def _merge_logprobs(self, data: bytes) -> bytes:
        """`return_logprob`: the prompt's logprobs come from the prefill server (as SGLang's router does)."""
        if self.prefill_result is None or b"input_token_logprobs" not in self.prefill_result.body:
            return data
        try:
            dec = orjson.loads(data)
            pre = orjson.loads(self.prefill_result.body)
        except orjson.JSONDecodeError:
            return data
        if not (isinstance(dec, dict) and isinstance(pre, dict)):
            return data
        pm, dm = pre.get("meta_info"), dec.get("meta_info")
        if isinstance(pm, dict) and isinstance(dm, dict) and isinstance(pm.get("input_token_logprobs"), list):
            tail = list(dm.get("input_token_logprobs") or [])
            dm["input_token_logprobs"] = pm["input_token_logprobs"] + tail
            return orjson.dumps(dec)
        return data

    def _finish_record_from(self, data: bytes, chunks: int = 0) -> None:
        self.record.outcome = "ok"
        meta = _meta_info(data)
        usage = _usage(data)
        if meta:
            self.record.prompt_tokens = int(meta.get("prompt_tokens", self.record.prompt_tokens))
            self.record.cached_tokens = int(meta.get("cached_tokens", self.record.cached_tokens))
            self.record.output_tokens = int(meta.get("completion_tokens", chunks))
        elif usage:
            self.record.prompt_tokens = int(usage.get("prompt_tokens", self.record.prompt_tokens))
            self.record.output_tokens = int(usage.get("completion_tokens", chunks))
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
                self.record.cached_tokens = details["cached_tokens"]
        else:
            self.record.output_tokens = chunks

    async def _cleanup(self) -> None:
        """Close what is open, abort the side still running, release loads (runs on every exit)."""
        route, ctx = self.route, self.ctx
        aborts: list[Awaitable[None]] = []
        resp = self.decode_resp
        if not self.decode_done:
            if resp is not None:
                resp.close()
            aborts.append(self._abort(route.decode.url, "decode"))
        elif resp is not None:
            resp.release()
        task = self.prefill_task
        if task is not None:
            if not task.done():
                task.cancel()
                assert route.prefill is not None
                aborts.append(self._abort(route.prefill.url, "prefill"))
            with contextlib.suppress(BaseException):
                await task
        self._release_prefill()
        if aborts:
            await asyncio.gather(*aborts)
        if self.decode_ticket is not None:
            out = self.record.output_tokens if self.decode_done else None
            cached = self.record.cached_tokens if self.decode_done and route.prefill is None else None
            ctx.selector.router.on_finished(self.decode_ticket, cached_tokens=cached, output_tokens=out)
            self.decode_ticket = None
            if ctx.observer is not None:
                ctx.observer.pool_leave(self.decode_pool)
        if ctx.health is not None and self.decode_done:
            ctx.health.record_success(route.decode.url)
            if route.prefill is not None and self.prefill_result is not None:
                ctx.health.record_success(route.prefill.url)

    async def _abort(self, base_url: str, side: str) -> None:
        """`POST /abort_request` per rid; failures are ignored (the closed connection also aborts)."""
        timeout_s = self.ctx.config.abort_timeout_s
        if timeout_s <= 0:
            return
        to = aiohttp.ClientTimeout(total=timeout_s)
        for rid in self.rids:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                url = base_url + "/abort_request"
                auth = {k: v for k, v in self.headers.items() if k.lower() == "authorization"}
                async with self.ctx.session.post(url, json={"rid": rid}, timeout=to, headers=auth) as r:
                    await r.read()
        if self.ctx.observer is not None:
            self.ctx.observer.abort_sent(side)


def _last_json_event(data: bytes) -> dict[str, Any] | None:
    """The last JSON object in a body: the whole body, or the last `data: {...}` SSE event."""
    text = data.strip()
    if not text:
        return None
    if text.startswith(b"{"):
        try:
            obj = orjson.loads(text)
        except orjson.JSONDecodeError:
            return None
        return obj if isinstance(obj, dict) else None
    for line in reversed(text.split(b"\n")):
        line = line.strip()
        if line.startswith(b"data:") and line[5:].strip().startswith(b"{"):
            try:
                obj = orjson.loads(line[5:].strip())
            except orjson.JSONDecodeError:
                return None
            return obj if isinstance(obj, dict) else None
    return None


def _meta_info(data: bytes) -> dict[str, Any] | None:
    obj = _last_json_event(data)
    meta = obj.get("meta_info") if obj else None
    return meta if isinstance(meta, dict) else None


def _usage(data: bytes) -> dict[str, Any] | None:
    obj = _last_json_event(data)
    usage = obj.get("usage") if obj else None
    return usage if isinstance(usage, dict) else None


def _client_error(failed: _SideFailed, openai: bool) -> web.Response:
    """The client's error after the last attempt. A 4xx from an engine (the request's own fault, e.g. the
    prefill server rejecting it) passes through with its body; anything else is the proxy's error shape."""
    err = failed.error
    if isinstance(err, UpstreamHTTPError) and 400 <= err.status < 500 and err.status != 429 and err.body:
        return web.Response(status=err.status, body=err.body, content_type="application/json")
    api = from_upstream(err)
    api.message = f"{failed.side} worker {failed.url}: {api.message}"
    return error_response(api, openai=openai)


def _breaker_excluded(ctx: PDContext) -> set[str]:
    """Workers whose circuit breaker admits nothing now."""
    if ctx.health is None:
        return set()
    return {w.url for w in ctx.selector.workers() if not ctx.health.breaker_allows(w.url)}


def admission_chooser(
    ctx: PDContext,
) -> Callable[[RoutingRequest, Callable[[Worker], bool], bool], PDRoute | None]:
    """Admission's chooser in PD mode (`Admission.chooser`): the pair chosen when a request is released
    from the router's queue, on the load as it is then, with prefill saturation judged by admission."""

    def choose(routing: RoutingRequest, full: Callable[[Worker], bool], behind: bool) -> PDRoute | None:
        excl = _breaker_excluded(ctx)
        return choose_admitted_route(ctx.selector, routing, ctx.config, excl, full, behind)

    return choose


def count_arrival(ctx: PDContext) -> None:
    """One request arrived: the demand the planner reads (counted once, before any router queue)."""
    if ctx.observer is not None:
        ctx.observer.arrive()


async def forward_pd(
    ctx: PDContext,
    request: web.Request,
    path: str,
    body: bytes,
    parsed: Mapping[str, Any],
    routing: RoutingRequest,
    *,
    openai: bool | None = None,
    headers: Mapping[str, str] | None = None,
    route: PDRoute | None = None,
    priority: int | None = None,
    arrived: bool = False,
) -> web.StreamResponse:
    """Serve one generation request through a prefill/decode pair (or a local worker).

    `path` is the engine path (`/generate`, `/v1/completions`, `/v1/chat/completions`); `parsed` the
    body the proxy already decoded; `routing` its RoutingRequest (chat: the whole templated prompt);
    `headers` the end-to-end headers to forward (default: the client's minus hop-by-hop ones).
    `route`: the first attempt's pair, chosen by admission at release (call before any await, so its
    load is reserved before another request is judged); retries choose again. `priority`: the class
    priority, set in the body (SGLang's `priority`) and on the load tickets. `arrived`: the caller
    already counted the request's arrival (before it queued).
    Returns the decode server's response, or an error response when no attempt could start one.
    """
    cfg = ctx.config
    if not arrived:
        count_arrival(ctx)
    is_openai = path.startswith("/v1/") if openai is None else openai
    fwd = forward_headers(headers if headers is not None else request.headers)
    exclude: set[str] = _breaker_excluded(ctx)
    given = route
    last: _SideFailed | None = None
    for attempt_no in range(1, max(cfg.max_attempts, 1) + 1):
        try:
            pair = (
                given
                if given is not None and attempt_no == 1
                else choose_route(ctx.selector, routing, cfg, exclude)
            )
        except NoWorkerAvailable as exc:
            if last is not None:
                break
            return error_response(
                ApiError(503, f"no worker available: {exc}", "service_unavailable", "no_worker"),
                openai=is_openai,
            )
        extra_rid, rids = rid_fields(parsed, path)
        extra: dict[str, Any] = dict(extra_rid)
        if priority is not None:
            extra["priority"] = priority
        if pair.prefill is not None:
            extra.update(
                bootstrap_fields(
                    parsed, path, bootstrap_host_of(pair.prefill.url), pair.prefill.bootstrap_port, ctx.rng
                )
            )
        try:
            out_body = insert_fields(body, parsed, extra)
        except PDError as exc:
            return error_response(bad_request(str(exc)), openai=is_openai)
        attempt = _Attempt(ctx, pair, path, out_body, fwd, rids, routing, is_openai, priority or 0)
        attempt.record.attempts = attempt_no
        try:
            resp = await attempt.run(request)
        except _SideFailed as failed:
            last = failed
            exclude.add(failed.url)
            retryable = failed.error.retryable
            attempt.record.outcome = "upstream_error" if retryable else "client_error"
            attempt.record.finished_at = time.monotonic()
            if ctx.health is not None and retryable:
                ctx.health.record_failure(failed.url, failed.error.message)
            if ctx.observer is not None:
                ctx.observer.observe(attempt.record)
                if retryable and attempt_no < cfg.max_attempts:
                    ctx.observer.retry(failed.side)
            if not retryable:
                break
            continue
        attempt.record.finished_at = time.monotonic()
        if ctx.observer is not None:
            ctx.observer.observe(attempt.record)
        return resp
    assert last is not None
    return _client_error(last, is_openai)

"""Prefill/decode disaggregation: pair selection, conditional disaggregation and SGLang's bootstrap fan-out.

One entry point for the proxy: `forward_pd(ctx, request, path, body, parsed, routing)`. It picks a
(prefill, decode) pair, adds `bootstrap_host`/`bootstrap_port`/`bootstrap_room` (and an `rid` when the
client gave none, so either side can be aborted by id) to the body, sends the same bytes to both servers
at once, and streams the decode server's response back (PROTOCOLS.md section 3, checked against
sglang 0.5.10 `io_struct.py` `_normalize_bootstrap_params` and `scheduler.py`).

Invariants
- Both sides of a pair get byte-identical bodies, hence the same room(s).
- Nothing reaches the client before the decode server's first chunk: until then a failure on either side
  aborts the other and the next attempt picks a new pair (excluding the worker that failed).
- Whatever ends an attempt (success, error, client gone), both upstream connections are closed and the
  side still running gets `POST /abort_request` for its rid(s) before `forward_pd` returns.
- Load is reserved on each chosen worker before sending and released in `finally`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import aiohttp
import orjson
from aiohttp import web
from yarl import URL

from engines.errors import UpstreamConnectError, UpstreamError, UpstreamHTTPError
from engines.sglang import map_exception
from router.core import Router
from router.errors import ApiError, bad_request, error_response, from_upstream, sse_error_event
from router.load import Ticket
from router.policies import make_policy
from router.policies.base import NoWorkerAvailable, Policy, PolicyContext
from router.types import Decision, RoutingRequest, Worker, WorkerRole

BOOTSTRAP_KEYS = ("bootstrap_host", "bootstrap_port", "bootstrap_room")
ROOM_BITS = 63  # SGLang keeps rooms as signed int64; the router draws a fresh non-negative one
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


class PDError(Exception):
    """The PD path could not serve the request; `status` and `body` are what the client gets."""

    def __init__(self, status: int, message: str, body: bytes | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


@dataclass(frozen=True)
class PDConfig:
    """PD knobs. Tokens are prompt tokens; 0 disables the feature named."""

    local_prefill_max_tokens: int = 0
    """Conditional disaggregation: serve a request on the local pool alone when its uncached prompt
    (tokens the chosen local worker does not hold) is at most this many tokens. 0 = always disaggregate."""
    local_queue_scale_tokens: int = 8192
    """The threshold grows with the prefill pool's queue: x (1 + q / this), q = the least queued prefill
    tokens of any prefill worker, because a short prompt waiting behind that queue loses more than it costs
    a decode batch to prefill it there. 0 = threshold ignores the queue."""
    local_prefill_cap_tokens: int = 4096
    """Upper bound of the queue-grown threshold (bounds the ITL hit a local prefill gives a decode batch)."""
    local_role: WorkerRole = WorkerRole.REGULAR
    """Which pool serves local requests. SGLang's decode mode rejects a request without a bootstrap room
    (400, `scheduler.py`), so with real SGLang this is the regular pool (`--disaggregation-mode null`
    servers). DECODE only for engines whose decode workers accept plain requests (the simulator's
    `--accept-plain`)."""
    max_attempts: int = 3
    """Pairs tried while nothing has reached the client (1 = no retry)."""
    abort_timeout_s: float = 2.0
    """Seconds allowed for each `POST /abort_request` sent to the side still running; 0 = do not send."""
    prefill_timeout_s: float = 0.0
    """Seconds the prefill side may take to answer in full; 0 = no limit beyond the session's."""
    prefill_policy: str = "kv_aware"
    prefill_policy_params: tuple[tuple[str, Any], ...] = ()
    """Typed params of the prefill policy; kv_aware gets `decode_weight=0` unless given here."""
    decode_policy: str = "least_load"
    decode_policy_params: tuple[tuple[str, Any], ...] = ()

    @property
    def conditional(self) -> bool:
        return self.local_prefill_max_tokens > 0

    def local_threshold(self, prefill_queue_tokens: int | None) -> int:
        """The uncached-token threshold under the current prefill queue (None: no prefill worker up)."""
        base = self.local_prefill_max_tokens
        if base <= 0:
            return 0
        if prefill_queue_tokens is None:
            return max(base, self.local_prefill_cap_tokens)
        if self.local_queue_scale_tokens <= 0:
            return base
        grown = base * (1.0 + prefill_queue_tokens / self.local_queue_scale_tokens)
        return int(min(max(grown, base), max(self.local_prefill_cap_tokens, base)))


class PDHealth(Protocol):
    """The registry's circuit breaker (`router.workers.WorkerRegistry` satisfies it)."""

    def breaker_allows(self, url: str) -> bool: ...

    def record_success(self, url: str) -> None: ...

    def record_failure(self, url: str, why: str) -> None: ...


class PDSelector:
    """Per-role policies over the router's candidates: `--prefill-policy`, `--decode-policy`.

    The prefill policy (default `kv_aware` with `decode_weight=0`: overlap and queued prefill tokens,
    nothing else runs on a prefill server) and the decode policy (default `least_load`: pending plus
    active KV blocks, floored by the engine's token usage, ties to fewer requests in flight) read the
    router's shared index and in-flight predictions. The local pool uses the router's own policy.
    Selection only reads; `on_routed` reserves load through the router and lets the policy learn.
    """

    def __init__(self, router: Router, config: PDConfig) -> None:
        self.router = router
        ctx = PolicyContext(kv_index=router.index, inflight=router.load.inflight, clock=router.clock)
        p_params = dict(config.prefill_policy_params)
        if config.prefill_policy == "kv_aware":
            p_params.setdefault("decode_weight", 0.0)  # nothing decodes on a prefill server
        self.policies: dict[WorkerRole, Policy] = {
            WorkerRole.PREFILL: make_policy(config.prefill_policy, p_params, ctx),
            WorkerRole.DECODE: make_policy(config.decode_policy, dict(config.decode_policy_params), ctx),
        }

    def workers(self, role: WorkerRole | None = None) -> list[Worker]:
        return self.router.workers(role)

    def select(self, request: RoutingRequest, role: WorkerRole, exclude: Collection[str] = ()) -> Decision:
        policy = self.policies.get(role)
        if policy is None:
            return self.router.select(request, role=role, exclude=exclude)
        cands = self.router.candidates(request, role, exclude)
        if not cands:
            raise NoWorkerAvailable(f"no healthy {role.value} worker available")
        return policy.select(request, cands)

    def on_routed(self, decision: Decision, request: RoutingRequest, role: WorkerRole) -> Ticket:
        ticket = self.router.on_routed(decision, request)
        policy = self.policies.get(role)
        worker = self.router.get_worker(decision.worker)
        if policy is not None and worker is not None:
            policy.on_routed(request, worker)
        return ticket


class PDObserver(Protocol):
    """Receives per-request PD timings (`router.pd_metrics.PDMetrics` implements it)."""

    def pool_enter(self, pool: str) -> None: ...

    def pool_leave(self, pool: str) -> None: ...

    def observe(self, record: PDRecord) -> None: ...

    def retry(self, side: str) -> None: ...

    def abort_sent(self, side: str) -> None: ...


@dataclass(frozen=True)
class PDRoute:
    """One attempt's choice. `prefill is None` means local (conditional disaggregation)."""

    decode: Worker
    prefill: Worker | None
    decode_decision: Decision
    prefill_decision: Decision | None
    uncached_tokens: int
    threshold: int
    reason: str

    @property
    def mode(self) -> str:
        return "disaggregated" if self.prefill is not None else "local"


@dataclass
class PDRecord:
    """What one served request measured, seconds on the router's clock (None = not observed)."""

    mode: str
    outcome: str  # ok | client_error | upstream_error | client_gone
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    prefill_queue_s: float | None = None
    prefill_s: float | None = None
    transfer_s: float | None = None
    ttft_s: float | None = None
    itls: list[float] = field(default_factory=list)
    attempts: int = 1
    finished_at: float = 0.0


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


# ---------------------------------------------------------------- body rewriting (pure)


def batch_size(parsed: Mapping[str, Any], path: str) -> int | None:
    """Items in a batch request (one room each), or None for a single request.

    `/generate`: `text` a list, or `input_ids` a list of lists. `/v1/completions`: `prompt` a list of
    strings or of token lists (a flat list of ints is one prompt). Chat is always single.
    """
    if path.endswith("/chat/completions"):
        return None
    if path.endswith("/completions"):
        prompt = parsed.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            return len(prompt)
        return None
    text = parsed.get("text")
    if isinstance(text, list):
        return len(text)
    ids = parsed.get("input_ids")
    if isinstance(ids, list) and ids and isinstance(ids[0], list):
        return len(ids)
    return None


def new_room(rng: random.Random) -> int:
    return rng.getrandbits(ROOM_BITS)


def bootstrap_fields(
    parsed: Mapping[str, Any], path: str, host: str | None, port: int | None, rng: random.Random
) -> dict[str, Any]:
    """The fields SGLang's pairing needs: the prefill server's host and bootstrap port, and fresh rooms."""
    n = batch_size(parsed, path)
    if n is None:
        return {"bootstrap_host": host, "bootstrap_port": port, "bootstrap_room": new_room(rng)}
    return {
        "bootstrap_host": [host] * n,
        "bootstrap_port": [port] * n,
        "bootstrap_room": [new_room(rng) for _ in range(n)],
    }


def rid_fields(parsed: Mapping[str, Any], path: str) -> tuple[dict[str, Any], list[str]]:
    """An `rid` (per item for batches) when the client gave none, so `/abort_request` can name it."""
    rid = parsed.get("rid")
    if isinstance(rid, str):
        return {}, [rid]
    if isinstance(rid, list) and all(isinstance(r, str) for r in rid):
        return {}, list(rid)
    n = batch_size(parsed, path)
    if n is None:
        r = uuid.uuid4().hex
        return {"rid": r}, [r]
    rids = [uuid.uuid4().hex for _ in range(n)]
    return {"rid": rids}, rids


def insert_fields(body: bytes, parsed: Mapping[str, Any], extra: Mapping[str, Any]) -> bytes:
    """Add `extra` keys to a JSON object body without re-serialising the client's bytes.

    The keys go right after the opening brace, so the client's own fields, number formats, key order
    and unknown fields reach the engine untouched. When the client already sent one of the keys
    (duplicate JSON keys are ambiguous), the object is re-serialised with ours replacing theirs.
    """
    if not extra:
        return body
    if any(k in parsed for k in extra):
        merged = dict(parsed)
        merged.update(extra)
        return orjson.dumps(merged)
    start = 0
    while start < len(body) and body[start] in b" \t\r\n":
        start += 1
    if start >= len(body) or body[start : start + 1] != b"{":
        raise PDError(400, "request body must be a JSON object")
    rest = body[start + 1 :]
    encoded = orjson.dumps(dict(extra))[1:-1]
    sep = b"" if rest.lstrip()[:1] == b"}" else b","
    return body[: start + 1] + encoded + sep + rest


def bootstrap_host_of(url: str) -> str:
    host = URL(url).host
    if not host:
        raise PDError(500, f"prefill worker url has no host: {url}")
    return host


# ---------------------------------------------------------------- pair selection


def prefill_queue_tokens(selector: PDSelector, exclude: Collection[str] = ()) -> int | None:
    """The least queued prefill tokens over routable prefill workers (None when none is up)."""
    queues = [
        w.load.pending_prefill_tokens
        for w in selector.workers(WorkerRole.PREFILL)
        if w.routable and w.url not in exclude
    ]
    return min(queues) if queues else None


def choose_route(
    selector: PDSelector, routing: RoutingRequest, config: PDConfig, exclude: Collection[str] = ()
) -> PDRoute:
    """Pick a pair, or a local worker when the uncached prompt is under the queue-aware threshold.

    The prefill worker is the prefill policy's pick, the decode worker the decode policy's. Local
    serving is also the fallback when no prefill worker is up (conditional disaggregation on).
    Raises `NoWorkerAvailable` when nothing can serve.
    """
    by_url = {w.url: w for w in selector.workers()}
    queue = prefill_queue_tokens(selector, exclude)
    threshold = config.local_threshold(queue) if config.conditional else 0
    if config.conditional:
        try:
            local = selector.select(routing, config.local_role, exclude)
        except NoWorkerAvailable:
            local = None
        if local is not None:
            uncached = max(0, routing.prompt_tokens - local.cached_blocks * routing.block_size)
            if uncached <= threshold or queue is None:
                why = "no prefill worker up" if queue is None else f"uncached {uncached} <= {threshold}"
                return PDRoute(by_url[local.worker], None, local, None, uncached, threshold, why)
    prefill = selector.select(routing, WorkerRole.PREFILL, exclude)
    decode = selector.select(routing, WorkerRole.DECODE, exclude)
    uncached = max(0, routing.prompt_tokens - prefill.cached_blocks * routing.block_size)
    return PDRoute(
        by_url[decode.worker],
        by_url[prefill.worker],
        decode,
        prefill,
        uncached,
        threshold,
        f"prefill {prefill.worker} ({prefill.reason}); decode {decode.worker} ({decode.reason})",
    )


# ---------------------------------------------------------------- the fan-out


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
    ) -> None:
        self.ctx = ctx
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
            self.decode_ticket = sel.on_routed(route.decode_decision, self.routing, decode_role)
            if obs is not None:
                obs.pool_enter(self.decode_pool)
            if route.prefill is not None:
                assert route.prefill_decision is not None
                self.prefill_ticket = sel.on_routed(route.prefill_decision, self.routing, WorkerRole.PREFILL)
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
                async with self.ctx.session.post(url, json={"rid": rid}, timeout=to) as r:
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
) -> web.StreamResponse:
    """Serve one generation request through a prefill/decode pair (or a local worker).

    `path` is the engine path (`/generate`, `/v1/completions`, `/v1/chat/completions`); `parsed` the
    body the proxy already decoded; `routing` its RoutingRequest (chat: the whole templated prompt);
    `headers` the end-to-end headers to forward (default: the client's minus hop-by-hop ones).
    Returns the decode server's response, or an error response when no attempt could start one.
    """
    cfg = ctx.config
    is_openai = path.startswith("/v1/") if openai is None else openai
    fwd = forward_headers(headers if headers is not None else request.headers)
    exclude: set[str] = set()
    if ctx.health is not None:
        exclude.update(w.url for w in ctx.selector.workers() if not ctx.health.breaker_allows(w.url))
    last: _SideFailed | None = None
    for attempt_no in range(1, max(cfg.max_attempts, 1) + 1):
        try:
            route = choose_route(ctx.selector, routing, cfg, exclude)
        except NoWorkerAvailable as exc:
            if last is not None:
                break
            return error_response(
                ApiError(503, f"no worker available: {exc}", "service_unavailable", "no_worker"),
                openai=is_openai,
            )
        extra_rid, rids = rid_fields(parsed, path)
        extra: dict[str, Any] = dict(extra_rid)
        if route.prefill is not None:
            extra.update(
                bootstrap_fields(
                    parsed, path, bootstrap_host_of(route.prefill.url), route.prefill.bootstrap_port, ctx.rng
                )
            )
        try:
            out_body = insert_fields(body, parsed, extra)
        except PDError as exc:
            return error_response(bad_request(str(exc)), openai=is_openai)
        attempt = _Attempt(ctx, route, path, out_body, fwd, rids, routing, is_openai)
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

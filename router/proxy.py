"""Forwarding of generation requests: route, send the client's bytes unchanged, relay the answer.

Invariants:
- The body is forwarded byte for byte (parsed with orjson only to read routing fields); end-to-end
  headers are kept, hop-by-hop headers dropped.
- Load is reserved on the chosen worker (`Router.on_routed`) and released exactly once in `finally`.
- Another worker is tried only while nothing has reached the client; after that a broken stream
  ends with an SSE error event and `data: [DONE]`.
- A client that disconnects closes the upstream response and sends `/abort_request` for its rid.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict

from kvroute.engines.errors import UpstreamError, UpstreamHTTPError, UpstreamStreamBroken, UpstreamTimeout
from kvroute.engines.http1 import Timeouts, UpstreamResponse
from kvroute.router.config import RouterConfig
from kvroute.router.errors import (
    ApiError,
    bad_request,
    error_response,
    from_upstream,
    sse_error_event,
)
from kvroute.router.metrics import Metrics
from kvroute.router.observability import PHASES, Observability
from kvroute.router.pd import PDContext, count_arrival, forward_pd
from kvroute.router.policies.base import NoWorkerAvailable
from kvroute.router.prompt_parse import Parsed, helper_pool, parse, parse_in_helper, spec_of, unwrap
from kvroute.router.retry import RetryBackoff
from kvroute.router.types import Decision
from kvroute.router.wire import (
    RoutingFields,
    SseObserver,
    Usage,
    extract_fields,
    forward_headers,
    loads_or_none,
    response_headers,
    usage_of,
)
from kvroute.router.workers import WorkerRegistry

# Re-exported: these lived here before `router/wire.py`.
__all__ = [
    "CHAT",
    "COMPLETIONS",
    "GENERATE",
    "Proxy",
    "RouteSpec",
    "RoutingFields",
    "SseObserver",
    "Usage",
    "extract_fields",
    "forward_headers",
    "response_headers",
    "usage_of",
]

log = logging.getLogger("kvroute.proxy")

WORKER_HEADER = "X-Kvroute-Worker"
# Loop detection: each router appends its instance id to this header on the requests it forwards; a
# request already carrying our id (or past MAX_HOPS routers) came back to us through a misconfiguration.
VIA_HEADER = "X-Kvroute-Via"
MAX_HOPS = 8
# (header name, value) of the request id the response must carry (PD mode: set as the response starts).
RID_KEY: web.RequestKey[tuple[str, str]] = web.RequestKey("kvroute_request_id", tuple)
CACHED_BLOCKS_HEADER = "X-Kvroute-Cached-Blocks"
DP_RANK_HEADER = "X-Kvroute-Dp-Rank"  # --dp-aware: the data-parallel rank the request was sent to


@dataclass(frozen=True)
class RouteSpec:
    """One client-facing generation route and the engine path it forwards to."""

    path: str
    kind: str  # "generate" | "completions" | "chat" | one of `kvroute.router.wire.PLAIN_KINDS`

    @property
    def openai(self) -> bool:
        return self.kind != "generate"

    @property
    def generation(self) -> bool:
        """Generation routes can run prefill/decode disaggregated; the forwarded-only ones cannot."""
        return self.kind in ("generate", "completions", "chat")


GENERATE = RouteSpec("/generate", "generate")
COMPLETIONS = RouteSpec("/v1/completions", "completions")
CHAT = RouteSpec("/v1/chat/completions", "chat")
# Forwarded as they are, routed by their prompt with load accounting (SGLang's OpenAI-compatible extras).
PLAIN_ROUTES = (
    RouteSpec("/v1/embeddings", "embeddings"),
    RouteSpec("/v1/responses", "responses"),
    RouteSpec("/v1/rerank", "rerank"),
    RouteSpec("/v1/classify", "classify"),
    RouteSpec("/v1/score", "score"),
)


def _kind(exc: UpstreamError) -> str:
    if isinstance(exc, UpstreamHTTPError):
        return "upstream_429" if exc.status == 429 else "upstream_5xx"
    if isinstance(exc, UpstreamTimeout):
        return "upstream_timeout"
    if isinstance(exc, UpstreamStreamBroken):
        return "stream_broken"
    return "upstream_unreachable"


class Proxy:
    """Handles the generation routes over one shared client session."""

    def __init__(
        self,
        router: Any,
        registry: WorkerRegistry,
        metrics: Metrics,
        config: RouterConfig,
        session: aiohttp.ClientSession,
        pd: PDContext | None = None,
        obs: Observability | None = None,
    ) -> None:
        """`pd`: PD disaggregation is on; generation requests go through `kvroute.router.pd.forward_pd`.
        `obs`: where each request's phases go when it ends (router.observability)."""
        self.router = router
        self.pd = pd
        self.registry = registry
        self.metrics = metrics
        self.config = config
        self.session = session
        self.obs = obs if obs is not None else Observability(metrics)
        # Request ids we create: a random prefix per process and a counter. Unique across processes and
        # replicas like a random id, without a getrandom() syscall per request (~4% of the proxy's CPU).
        self._rid_prefix = os.urandom(8).hex()
        self._rid_seq = itertools.count()
        self.timeout = Timeouts(  # streamed answers: the head comes at once, then chunks
            connect=config.connect_timeout_s or None,
            idle=config.stream_idle_timeout_s or None,
            total=config.request_timeout_s or None,
        )
        # Non-streamed answers: the head comes when generation ends; only the total bounds the wait (a hung
        # engine is found by the registry's stall detection, not by guessing a generation's length).
        self.timeout_unary = dataclasses.replace(self.timeout, idle_head=False)
        self._background: set[asyncio.Task[None]] = set()
        self.tenants: Any = None  # router.tenants.runtime.TenantRuntime when admission is on
        self.backoff = RetryBackoff.from_config(config)
        self._parse_pool: ProcessPoolExecutor | None = None  # large bodies are parsed and hashed here
        self._parse_thread: ThreadPoolExecutor | None = None  # ... or here (tokenizer not rebuildable)
        self._rid_workers: dict[str, str] = {}  # client-given rid -> worker, while in flight
        self.in_flight = 0  # client requests being handled (the shutdown log says how many it waits for)

    async def close(self) -> None:
        """Wait for the abort notices still being sent."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        for pool in (self._parse_pool, self._parse_thread):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self._parse_pool = None
        self._parse_thread = None

    def _client_rid(self, request: web.Request) -> str:
        """The client's id from the other `--request-id-headers` (the first present), else a new one."""
        for name in self.config.request_id_headers:
            rid = request.headers.get(name)
            if rid:
                return rid
        return f"{self._rid_prefix}{next(self._rid_seq):016x}"

    async def handle(self, request: web.Request, spec: RouteSpec) -> web.StreamResponse:
        t0 = time.perf_counter()
        cfg = self.config
        rid_header = request.headers.get(cfg.request_id_header) or self._client_rid(request)
        ph = self.obs.start(request, spec.path, rid_header, t0)
        self.in_flight += 1
        try:
            return await self._handle(request, spec, rid_header, t0)
        except asyncio.CancelledError:
            ph.status = ph.status or 499
            raise
        except ApiError as err:
            ph.status, ph.error = err.status, err.code
            if err.status >= 500 or err.status == 429:
                self.metrics.errors.labels(spec.path, "none", err.code).inc()
            else:
                self.metrics.errors.labels(spec.path, "none", "bad_request").inc()
            self.metrics.requests.labels(spec.path, self._policy_name(), "none", str(err.status)).inc()
            return error_response(
                err, openai=spec.openai, headers={cfg.request_id_header: rid_header, **(err.headers or {})}
            )
        finally:
            self.obs.finish(ph)
            self.in_flight -= 1

    def worker_of(self, rid: str) -> str | None:
        """The worker serving the in-flight request with this client-given `rid`, if this router routed it."""
        return self._rid_workers.get(rid)

    def _policy_name(self) -> str:
        return str(getattr(self.router.policy, "name", self.config.policy))

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.config.max_body_bytes
        if limit and request.content_length is not None and request.content_length > limit:
            raise ApiError(
                413,
                f"request body of {request.content_length} bytes exceeds the limit of {limit}",
                "invalid_request_error",
                "body_too_large",
            )
        try:
            if not self.config.body_timeout_s:
                return await request.read()
            async with asyncio.timeout(self.config.body_timeout_s):
                return await request.read()
        except TimeoutError as exc:
            raise ApiError(
                408,
                f"request body not received within {self.config.body_timeout_s:g}s",
                "invalid_request_error",
                "body_timeout",
                headers={"Connection": "close"},
            ) from exc
        except web.HTTPRequestEntityTooLarge as exc:
            raise ApiError(
                413,
                f"request body exceeds the limit of {limit} bytes",
                "invalid_request_error",
                "body_too_large",
            ) from exc

    def _via(self, request: web.Request) -> str:
        """The hop header to forward; 508 when this request already passed through this router."""
        instance = self.registry.instance_id
        via = request.headers.get(VIA_HEADER)
        if via is None:
            return instance
        hops = [h.strip() for h in via.split(",")]
        if instance in hops or len(hops) >= MAX_HOPS:
            raise ApiError(
                508,
                f"request loop detected: it already passed through this router ({VIA_HEADER}: {via[:200]}); "
                "check that no worker URL points back at a router",
                "invalid_request_error",
                "loop_detected",
            )
        return f"{via}, {instance}"

    async def _handle(
        self, request: web.Request, spec: RouteSpec, rid_header: str, t0: float
    ) -> web.StreamResponse:
        via = self._via(request)
        body = await self._read_body(request)
        if not body:
            raise bad_request("empty request body; expected a JSON object", "empty_body")
        if self.pd is not None and not spec.generation:
            raise ApiError(
                501,
                f"{spec.path} is not served in prefill/decode mode (engines run disaggregated generation)",
                "invalid_request_error",
                "not_supported_in_pd_mode",
            )
        session_header = request.headers.get(self.config.session_header)
        offload = self.config.offload_body_bytes
        if offload and len(body) >= offload:  # ~1 s for 30 MB: not on the loop
            data, f, rr = await self._parse_large(spec, body, session_header)
        else:
            data, f, rr = self._parse(spec, body, session_header)
        if self.pd is not None:
            return await self._handle_pd(request, spec, body, data, rr, rid_header, t0)
        stream = data.get("stream") is True
        if self.tenants is not None:  # admission: identify, quota, maybe queue; 401/429 as ApiError
            async with self.tenants.admit(request.headers, rr, rid_header) as grant:
                body = self.tenants.with_priority(body, data, grant, spec.kind)
                return await self._forward(
                    request, spec, body, rr, grant.decision, rid_header, f.rid, t0, via, grant, stream=stream
                )
        decision = await self._select(rr)
        return await self._forward(
            request, spec, body, rr, decision, rid_header, f.rid, t0, via, stream=stream
        )

    def _parse(self, spec: RouteSpec, body: bytes, session_header: str | None) -> Parsed:
        # PD's per-role policies read blocks; else the policy says (None).
        return parse(self.router, spec.kind, body, session_header, True if self.pd is not None else None)

    async def _parse_large(self, spec: RouteSpec, body: bytes, session_header: str | None) -> Parsed:
        """A large body is parsed and hashed in the helper process (router/prompt_parse.py): the loop
        keeps serving meanwhile. Without a rebuildable tokenizer, on a thread (frees the loop between
        the big C calls only)."""
        loop = asyncio.get_running_loop()
        pspec = spec_of(self.router, self.config.tokenizer)
        if pspec is None:
            if self._parse_thread is None:
                self._parse_thread = ThreadPoolExecutor(1, thread_name_prefix="kvroute-parse")
            return await loop.run_in_executor(self._parse_thread, self._parse, spec, body, session_header)
        if self._parse_pool is None:
            self._parse_pool = helper_pool()
        with_blocks = True if self.pd is not None else bool(getattr(self.router.policy, "needs_blocks", True))
        result = await loop.run_in_executor(
            self._parse_pool, parse_in_helper, pspec, spec.kind, body, session_header, with_blocks
        )
        return unwrap(result)

    async def _forward(
        self,
        request: web.Request,
        spec: RouteSpec,
        body: bytes,
        rr: Any,
        decision: Decision,
        rid_header: str,
        rid: str | None,
        t0: float,
        via: str,
        grant: Any = None,
        *,
        stream: bool = False,
    ) -> web.StreamResponse:
        """Send to `decision.worker`, then down `decision.ranked` while nothing reached the client."""
        if grant is not None:
            ph = request.get(PHASES)
            if ph is not None:
                ph.admission_s = grant.queue_wait_s
        self.obs.routed(request, decision)
        timeout = self.timeout if stream else self.timeout_unary
        headers = forward_headers(request.headers, self.config.request_id_header, rid_header)
        headers[VIA_HEADER] = via
        # Workers whose breaker admits a request, best first; if none does, the policy's pick anyway.
        candidates = [u for u in decision.ranked if self.registry.breaker_allows(u)]
        forced = not candidates
        last: UpstreamError | None = None
        tried = 0
        for url in candidates or [decision.worker]:
            if tried > self.config.max_retries:
                break
            admission = self.registry.begin_attempt(url)  # a half-open breaker's probe slots are few
            if admission == "no" and not forced:
                continue
            if tried:
                assert last is not None
                self.metrics.retries.labels(spec.path, _kind(last)).inc()
                log.info("retrying %s on %s after %s", rid_header, url, last)
                pause = self.backoff.delay_s(tried)
                if pause > 0:
                    await asyncio.sleep(pause)
            tried += 1
            try:
                return await self._attempt(
                    request,
                    spec,
                    body,
                    headers,
                    url,
                    rr,
                    decision,
                    rid_header,
                    rid,
                    t0,
                    grant,
                    timeout=timeout,
                )
            except UpstreamError as exc:  # raised only while nothing reached the client
                last = exc
                self.metrics.errors.labels(spec.path, url, _kind(exc)).inc()
                self.registry.record_failure(url, exc.message)
                if not exc.retryable:
                    break
            finally:
                if admission == "probe":
                    self.registry.end_probe(url)
        if last is None:
            raise ApiError(
                503,
                "no worker available: every candidate's circuit is open",
                "service_unavailable",
                "no_worker",
                headers={"Retry-After": "1"},
            )
        raise from_upstream(last) from last

    async def _select(self, rr: Any) -> Decision:
        """The policy's pick; while workers are still registering (a router just restarted), a request
        waits up to `no_worker_wait_s` for one instead of getting 503 at once."""
        try:
            return self.router.select(rr)  # type: ignore[no-any-return]
        except NoWorkerAvailable as exc:
            err = exc
        wait = self.config.no_worker_wait_s
        if wait > 0 and self.registry.registering():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self.registry.ready_event.wait()
            try:
                return self.router.select(rr)  # type: ignore[no-any-return]
            except NoWorkerAvailable as exc:
                err = exc
        raise ApiError(
            503,
            f"no worker available: {err}" if str(err) else "no worker available",
            "service_unavailable",
            "no_worker",
            headers={"Retry-After": "1"},
        ) from err

    async def _handle_pd(
        self,
        request: web.Request,
        spec: RouteSpec,
        body: bytes,
        data: dict[str, Any],
        rr: Any,
        rid_header: str,
        t0: float,
    ) -> web.StreamResponse:
        """PD mode: `forward_pd` picks the pair, rewrites the body (bootstrap fields) and relays the
        decode side; it records its own PD metrics. Here: the request counter and end-to-end latency."""
        assert self.pd is not None
        headers = forward_headers(request.headers, self.config.request_id_header, rid_header)
        if self.config.engine_api_key:  # the client's credentials were for the router
            headers["Authorization"] = f"Bearer {self.config.engine_api_key}"
        request[RID_KEY] = (self.config.request_id_header, rid_header)
        if self.tenants is None:
            resp = await forward_pd(
                self.pd, request, spec.path, body, data, rr, openai=spec.openai, headers=headers
            )
        else:  # late binding: wait while the prefill pool is full; the pair is chosen at release
            count_arrival(self.pd)  # demand counts at arrival, not when the queue lets it go
            async with self.tenants.admit(request.headers, rr, rid_header) as grant:
                ph = request.get(PHASES)
                if ph is not None:
                    ph.admission_s = grant.queue_wait_s
                prio = grant.priority if self.config.engine_priority else None
                resp = await forward_pd(
                    self.pd, request, spec.path, body, data, rr, openai=spec.openai, headers=headers,
                    route=grant.route, priority=prio, arrived=True,
                )  # fmt: skip
                grant.observe(resp.status, None)
        worker = resp.headers.get(WORKER_HEADER, "none")
        status = resp.status
        ph = request.get(PHASES)
        if ph is not None:
            ph.worker, ph.status, ph.policy = worker, status, "pd"
        if status >= 500 or status == 429:
            kind = {503: "no_worker", 429: "upstream_429"}.get(status, "upstream_5xx")
            self.metrics.errors.labels(spec.path, worker, kind).inc()
        self.metrics.observe_request(
            spec.path,
            "pd",
            worker,
            status,
            e2e_s=time.perf_counter() - t0,
            ttft_s=None,
            tpot_s=None,
            prompt_tokens=None,
            cached_tokens=None,
            predicted_blocks=0,
        )
        return resp

    async def _attempt(
        self,
        request: web.Request,
        spec: RouteSpec,
        body: bytes,
        headers: CIMultiDict[str],
        url: str,
        rr: Any,
        decision: Decision,
        rid_header: str,
        rid: str | None,
        t0: float,
        grant: Any = None,
        timeout: Timeouts | None = None,
    ) -> web.StreamResponse:
        policy = decision.policy
        prio = grant.priority if grant is not None else 0
        ticket = self.router.on_routed(decision if url == decision.worker else url, rr, priority=prio)
        if grant is not None:
            ticket.queue_wait_s = grant.queue_wait_s
        cached_blocks = ticket.cached_blocks_predicted
        usage = Usage(rid=rid)
        first_at: float | None = None
        status = 0
        headers = self.obs.before_send(request, url, headers, cached_blocks)
        if rid is not None:
            self._rid_workers[rid] = url  # POST /abort_request finds the worker
        dp_rank: int | None = None
        if self.config.dp_aware:
            body, dp_rank = self._route_to_rank(url, body, rr)
        try:
            resp = await self.registry.client(url).open(spec.path, body, headers, timeout or self.timeout)
            self.obs.head(request, resp.content_type == "text/event-stream")
            try:
                status = resp.status
                if status >= 500 or status == 429:
                    err_body = b""
                    with contextlib.suppress(UpstreamError):
                        err_body = await resp.read(2048)
                    raise UpstreamHTTPError(url, status, err_body)
                out_headers = response_headers(resp.headers)
                out_headers[WORKER_HEADER] = url
                out_headers[CACHED_BLOCKS_HEADER] = str(cached_blocks)
                out_headers[self.config.request_id_header] = rid_header
                if dp_rank is not None:
                    out_headers[DP_RANK_HEADER] = str(dp_rank)
                if resp.content_type == "text/event-stream":
                    obs = SseObserver()
                    out, first_at = await self._relay_stream(
                        request, resp, out_headers, obs, url, usage, ticket, spec, t0
                    )
                    status = out.status
                    return out
                try:
                    payload = await resp.read()
                except UpstreamError as exc:
                    exc.retryable = True  # nothing reached the client yet: another worker may serve it
                    raise
                if resp.content_type == "application/json" and status < 400:
                    u = usage_of(loads_or_none(payload))
                    usage.prompt_tokens, usage.cached_tokens, usage.output_tokens = (
                        u.prompt_tokens,
                        u.cached_tokens,
                        u.output_tokens,
                    )
                    usage.engine_meta = u.engine_meta
                first_at = time.perf_counter()
                self.router.on_first_token(ticket)
                return web.Response(body=payload, status=status, headers=out_headers)
            finally:
                resp.close()
        except asyncio.CancelledError:
            status = 499  # client closed the connection (nginx's convention)
            self._abort_upstream(url, usage.rid)
            self.metrics.errors.labels(spec.path, url, "client_disconnect").inc()
            raise
        finally:
            if rid is not None and self._rid_workers.get(rid) == url:
                del self._rid_workers[rid]
            if dp_rank is not None:
                self.router.rank_load.release(url, dp_rank)
            self.router.on_finished(
                ticket, cached_tokens=usage.cached_tokens, output_tokens=usage.output_tokens
            )
            self.obs.answered(request, status, first_at, usage)
            if status and status < 500 and status != 429:
                self._record(spec, policy, url, status, t0, first_at, usage, cached_blocks)
                if grant is not None:
                    grant.observe(
                        status,
                        None if first_at is None else first_at - t0,
                        usage.itl_gaps,
                        usage.prompt_tokens,
                        usage.output_tokens,
                    )

    def _route_to_rank(self, url: str, body: bytes, rr: Any) -> tuple[bytes, int | None]:
        """`--dp-aware`: name the data-parallel rank of `url` that holds most of the prompt (SGLang's
        `routed_dp_rank`, `data_parallel_rank` before 0.5.10) and count the request on it. A rank the
        client named is kept. (body, rank); the body unchanged for a worker with one rank."""
        rank = self.router.dp_rank_for(url, rr.block_hashes)
        if rank is None:
            return body, None
        data = loads_or_none(body)
        if not isinstance(data, dict):
            return body, None
        given = data.get("routed_dp_rank", data.get("data_parallel_rank"))
        if isinstance(given, int) and not isinstance(given, bool):
            rank = given
        else:
            worker = self.router.get_worker(url)
            data[worker.dp_rank_field if worker is not None else "routed_dp_rank"] = rank
            body = orjson.dumps(data)
        self.router.rank_load.add(url, rank)
        return body, rank

    async def _relay_stream(
        self,
        request: web.Request,
        resp: UpstreamResponse,
        headers: CIMultiDict[str],
        obs: SseObserver,
        url: str,
        usage: Usage,
        ticket: Any,
        spec: RouteSpec,
        t0: float,
    ) -> tuple[web.StreamResponse, float | None]:
        try:
            first = await resp.next_chunk()
        except UpstreamError as exc:
            exc.retryable = True  # nothing reached the client yet: another worker may serve it
            raise
        out = web.StreamResponse(status=resp.status, headers=headers)
        await out.prepare(request)
        chunk = first
        while chunk:
            if obs.feed(chunk, time.perf_counter()):
                self.router.on_first_token(ticket)
                if usage.rid is None:
                    usage.rid = usage_of(loads_or_none(obs.first_data)).rid
            try:
                await out.write(chunk)
            except ConnectionError:
                self._abort_upstream(url, usage.rid)
                self.metrics.errors.labels(spec.path, url, "client_disconnect").inc()
                self._fill_usage(obs, usage)
                return out, obs.first_at
            try:
                chunk = await resp.next_chunk()
            except UpstreamError as uerr:
                self.metrics.errors.labels(spec.path, url, _kind(uerr)).inc()
                self.registry.record_failure(url, uerr.message)
                log.warning("stream from %s broke after the response started: %s", url, uerr.message)
                tail = b"" if obs.ends_clean else b"\n\n"
                with contextlib.suppress(ConnectionError):
                    await out.write(tail + sse_error_event(from_upstream(uerr), openai=spec.openai))
                    await out.write_eof()
                self._fill_usage(obs, usage)
                return out, obs.first_at
        with contextlib.suppress(ConnectionError):
            await out.write_eof()
        self._fill_usage(obs, usage)
        self.registry.record_success(url)
        return out, obs.first_at

    @staticmethod
    def _fill_usage(obs: SseObserver, usage: Usage) -> None:
        usage.itl_gaps = obs.gaps
        u = usage_of(loads_or_none(obs.last_data))
        usage.prompt_tokens = u.prompt_tokens
        usage.cached_tokens = u.cached_tokens
        usage.output_tokens = u.output_tokens if u.output_tokens is not None else obs.events or None
        usage.engine_meta = u.engine_meta

    def _abort_upstream(self, url: str, rid: str | None) -> None:
        """Tell the engine to stop a request whose client left (closing the connection alone may not)."""
        if not rid or url not in self.registry:
            return
        client = self.registry.client(url)

        async def _send() -> None:
            with contextlib.suppress(UpstreamError):
                await client.abort(rid)

        task = asyncio.get_running_loop().create_task(_send())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _record(
        self,
        spec: RouteSpec,
        policy: str,
        url: str,
        status: int,
        t0: float,
        first_at: float | None,
        usage: Usage,
        cached_blocks: int,
    ) -> None:
        now = time.perf_counter()
        if status < 400:
            self.registry.record_success(url)
        n = usage.output_tokens
        self.metrics.observe_request(
            spec.path,
            policy,
            url,
            status,
            e2e_s=now - t0,
            ttft_s=None if first_at is None else first_at - t0,
            tpot_s=(now - first_at) / (n - 1) if first_at is not None and n and n > 1 else None,
            itl_gaps=usage.itl_gaps,
            prompt_tokens=usage.prompt_tokens,
            cached_tokens=usage.cached_tokens,
            predicted_blocks=cached_blocks,
        )

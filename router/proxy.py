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
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from engines.errors import UpstreamError, UpstreamHTTPError, UpstreamStreamBroken, UpstreamTimeout
from engines.sglang import Timeouts, UpstreamResponse
from router.config import RouterConfig
from router.errors import ApiError, bad_request, error_response, from_upstream, sse_error_event
from router.metrics import Metrics
from router.policies.base import NoWorkerAvailable
from router.types import Decision
from router.workers import WorkerRegistry

log = logging.getLogger("kvroute.proxy")

# RFC 9110 7.6.1 hop-by-hop headers, plus the ones the HTTP stack recomputes for the new hop.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
_RESPONSE_DROP = _HOP_BY_HOP | {"date", "server"}
WORKER_HEADER = "X-Kvroute-Worker"
CACHED_BLOCKS_HEADER = "X-Kvroute-Cached-Blocks"


@dataclass(frozen=True)
class RouteSpec:
    """One client-facing generation route and the engine path it forwards to."""

    path: str
    kind: str  # "generate" | "completions" | "chat"

    @property
    def openai(self) -> bool:
        return self.kind != "generate"


GENERATE = RouteSpec("/generate", "generate")
COMPLETIONS = RouteSpec("/v1/completions", "completions")
CHAT = RouteSpec("/v1/chat/completions", "chat")


@dataclass(frozen=True)
class RoutingFields:
    """The few fields of a body the router reads; everything else is only forwarded."""

    text: str | None = None
    input_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    model: str | None = None
    max_tokens: int | None = None
    user: str | None = None
    rid: str | None = None


def _opt(body: Mapping[str, Any], key: str, types: type | tuple[type, ...], what: str) -> Any:
    v = body.get(key)
    if v is None:
        return None
    if not isinstance(v, types) or isinstance(v, bool) and bool not in _as_tuple(types):
        raise bad_request(f"'{key}' must be {what}", f"invalid_{key}")
    return v


def _as_tuple(t: type | tuple[type, ...]) -> tuple[type, ...]:
    return t if isinstance(t, tuple) else (t,)


def _token_list(v: Any, key: str) -> list[int]:
    if not v or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v):
        raise bad_request(f"'{key}' must be a non-empty list of non-negative integers", f"invalid_{key}")
    return list(v)


def extract_fields(kind: str, body: Mapping[str, Any]) -> RoutingFields:
    """Read and type-check the routing fields; a batch is routed by its first item."""
    _opt(body, "stream", bool, "a boolean")
    model = _opt(body, "model", str, "a string")
    user = _opt(body, "user", str, "a string")
    rid = body.get("rid")
    rid = rid if isinstance(rid, str) else None
    if kind == "generate":
        sp = _opt(body, "sampling_params", dict, "an object")
        max_tokens = _opt(sp, "max_new_tokens", int, "an integer") if sp else None
        text, ids = body.get("text"), body.get("input_ids")
        if text is None and ids is None:
            if body.get("input_embeds") is not None:
                raise bad_request("requests with only 'input_embeds' cannot be routed", "unroutable")
            raise bad_request("one of 'text' or 'input_ids' is required", "missing_prompt")
        if text is not None:
            if isinstance(text, list) and text and all(isinstance(t, str) for t in text):
                text = text[0]
            if not isinstance(text, str) or not text:
                raise bad_request("'text' must be a non-empty string or list of strings", "invalid_text")
            return RoutingFields(text=text, model=model, max_tokens=max_tokens, user=user, rid=rid)
        if isinstance(ids, list) and ids and isinstance(ids[0], list):
            ids = ids[0]
        if not isinstance(ids, list):
            raise bad_request("'input_ids' must be a list of integers", "invalid_input_ids")
        return RoutingFields(
            input_ids=_token_list(ids, "input_ids"), model=model, max_tokens=max_tokens, user=user, rid=rid
        )
    max_tokens = _opt(body, "max_tokens", int, "an integer")
    if kind == "chat":
        mct = _opt(body, "max_completion_tokens", int, "an integer")
        max_tokens = max_tokens if max_tokens is not None else mct
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise bad_request("'messages' must be a non-empty list", "invalid_messages")
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise bad_request("each message must be an object with a string 'role'", "invalid_messages")
            c = m.get("content")
            if c is not None and not isinstance(c, str | list):
                raise bad_request("message 'content' must be a string or a list of parts", "invalid_messages")
        return RoutingFields(messages=msgs, model=model, max_tokens=max_tokens, user=user, rid=rid)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("'prompt' must not be empty", "invalid_prompt")
        return RoutingFields(text=prompt, model=model, max_tokens=max_tokens, user=user, rid=rid)
    if isinstance(prompt, list):
        return RoutingFields(
            input_ids=_token_list(prompt, "prompt"), model=model, max_tokens=max_tokens, user=user, rid=rid
        )
    raise bad_request("'prompt' must be a string, a list of strings or a list of token ids", "invalid_prompt")


def forward_headers(headers: CIMultiDictProxy[str], request_id_header: str, rid: str) -> CIMultiDict[str]:
    """End-to-end headers of the client's request, minus hop-by-hop ones (and those named in Connection)."""
    extra = {h.strip().lower() for h in headers.get("Connection", "").split(",") if h.strip()}
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in headers.items():
        lk = k.lower()
        if lk not in _HOP_BY_HOP and lk not in extra:
            out.add(k, v)
    out[request_id_header] = rid
    return out


def response_headers(headers: CIMultiDict[str] | CIMultiDictProxy[str]) -> CIMultiDict[str]:
    extra = {h.strip().lower() for h in headers.get("Connection", "").split(",") if h.strip()}
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in headers.items():
        lk = k.lower()
        if lk not in _RESPONSE_DROP and lk not in extra:
            out.add(k, v)
    return out


class SseObserver:
    """Reads an SSE stream on the side: first token time, event count, the last event, the rid.

    Never alters or holds back bytes; parses JSON only for the first and the last data event.
    """

    __slots__ = ("_rest", "events", "first_at", "last_data", "first_data", "ends_clean", "done")

    def __init__(self) -> None:
        self._rest = b""
        self.events = 0
        self.first_at: float | None = None
        self.first_data: bytes | None = None
        self.last_data: bytes | None = None
        self.ends_clean = True  # the bytes so far end at an event boundary ("\n\n")
        self.done = False

    def feed(self, chunk: bytes, now: float) -> bool:
        """Returns True when this chunk carried the first data event."""
        data = self._rest + chunk if self._rest else chunk
        self.ends_clean = data.endswith(b"\n\n") or data.endswith(b"\r\n\r\n")
        lines = data.split(b"\n")
        self._rest = lines.pop()
        first = False
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if not payload:
                continue
            if payload == b"[DONE]":
                self.done = True
                continue
            self.events += 1
            self.last_data = payload
            if self.first_at is None:
                self.first_at = now
                self.first_data = payload
                first = True
        return first


@dataclass
class Usage:
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    output_tokens: int | None = None
    rid: str | None = None


def usage_of(obj: Any) -> Usage:
    """Token counts from an engine answer: native `meta_info` or OpenAI `usage` (batches: summed)."""
    if isinstance(obj, list):
        total = Usage()
        for item in obj:
            u = usage_of(item)
            for f in ("prompt_tokens", "cached_tokens", "output_tokens"):
                v = getattr(u, f)
                if v is not None:
                    setattr(total, f, (getattr(total, f) or 0) + v)
            total.rid = total.rid or u.rid
        return total
    if not isinstance(obj, dict):
        return Usage()
    meta = obj.get("meta_info")
    if isinstance(meta, dict):
        return Usage(
            _int(meta.get("prompt_tokens")),
            _int(meta.get("cached_tokens")),
            _int(meta.get("completion_tokens")),
            _str(meta.get("id")),
        )
    usage = obj.get("usage")
    rid = _str(obj.get("id"))
    if isinstance(usage, dict):
        details = usage.get("prompt_tokens_details")
        cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else None
        return Usage(_int(usage.get("prompt_tokens")), cached, _int(usage.get("completion_tokens")), rid)
    return Usage(rid=rid)


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def _loads(b: bytes | None) -> Any:
    if not b:
        return None
    try:
        return orjson.loads(b)
    except orjson.JSONDecodeError:
        return None


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
    ) -> None:
        self.router = router
        self.registry = registry
        self.metrics = metrics
        self.config = config
        self.session = session
        self.timeout = Timeouts(
            connect=config.connect_timeout_s or None,
            idle=config.stream_idle_timeout_s or None,
            total=config.request_timeout_s or None,
        )
        self._background: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        """Wait for the abort notices still being sent."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def handle(self, request: web.Request, spec: RouteSpec) -> web.StreamResponse:
        t0 = time.perf_counter()
        cfg = self.config
        rid_header = request.headers.get(cfg.request_id_header) or os.urandom(16).hex()
        try:
            return await self._handle(request, spec, rid_header, t0)
        except ApiError as err:
            if err.status >= 500 or err.status == 429:
                self.metrics.errors.labels(spec.path, "none", err.code).inc()
            else:
                self.metrics.errors.labels(spec.path, "none", "bad_request").inc()
            self.metrics.requests.labels(spec.path, self._policy_name(), "none", str(err.status)).inc()
            return error_response(err, openai=spec.openai, headers={cfg.request_id_header: rid_header})

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
            return await request.read()
        except web.HTTPRequestEntityTooLarge as exc:
            raise ApiError(
                413,
                f"request body exceeds the limit of {limit} bytes",
                "invalid_request_error",
                "body_too_large",
            ) from exc

    async def _handle(
        self, request: web.Request, spec: RouteSpec, rid_header: str, t0: float
    ) -> web.StreamResponse:
        body = await self._read_body(request)
        if not body:
            raise bad_request("empty request body; expected a JSON object", "empty_body")
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise bad_request(f"malformed JSON: {exc}", "invalid_json") from exc
        if not isinstance(data, dict):
            raise bad_request("the request body must be a JSON object", "invalid_json")
        f = extract_fields(spec.kind, data)
        session_key = request.headers.get(self.config.session_header) or f.user
        try:
            rr = self.router.routing_request(
                input_ids=f.input_ids,
                text=f.text,
                messages=f.messages,
                session_key=session_key,
                model=f.model,
                max_tokens=f.max_tokens,
            )
        except ValueError as exc:
            raise bad_request(f"cannot route this prompt: {exc}", "invalid_prompt") from exc
        try:
            decision = self.router.select(rr)
        except NoWorkerAvailable as exc:
            raise ApiError(
                503,
                f"no worker available: {exc}" if str(exc) else "no worker available",
                "service_unavailable",
                "no_worker",
            ) from exc
        headers = forward_headers(request.headers, self.config.request_id_header, rid_header)
        attempts = [u for u in decision.ranked if self.registry.breaker_allows(u)] or [decision.worker]
        attempts = attempts[: 1 + self.config.max_retries]
        last: UpstreamError | None = None
        for i, url in enumerate(attempts):
            if i:
                assert last is not None
                self.metrics.retries.labels(spec.path, _kind(last)).inc()
                log.info("retrying %s on %s after %s", rid_header, url, last)
            try:
                return await self._attempt(
                    request, spec, body, headers, url, rr, decision, rid_header, f.rid, t0
                )
            except UpstreamError as exc:  # raised only while nothing reached the client
                last = exc
                self.metrics.errors.labels(spec.path, url, _kind(exc)).inc()
                self.registry.record_failure(url, exc.message)
                if not exc.retryable:
                    break
        assert last is not None
        raise from_upstream(last) from last

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
    ) -> web.StreamResponse:
        policy = decision.policy
        ticket = self.router.on_routed(decision if url == decision.worker else url, rr)
        cached_blocks = ticket.cached_blocks_predicted
        usage = Usage(rid=rid)
        first_at: float | None = None
        status = 0
        try:
            resp = await self.registry.client(url).open(spec.path, body, headers, self.timeout)
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
                    u = usage_of(_loads(payload))
                    usage.prompt_tokens, usage.cached_tokens, usage.output_tokens = (
                        u.prompt_tokens,
                        u.cached_tokens,
                        u.output_tokens,
                    )
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
            self.router.on_finished(
                ticket, cached_tokens=usage.cached_tokens, output_tokens=usage.output_tokens
            )
            if status and status < 500 and status != 429:
                self._record(spec, policy, url, status, t0, first_at, usage, cached_blocks)

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
                    usage.rid = usage_of(_loads(obs.first_data)).rid
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
        u = usage_of(_loads(obs.last_data))
        usage.prompt_tokens = u.prompt_tokens
        usage.cached_tokens = u.cached_tokens
        usage.output_tokens = u.output_tokens if u.output_tokens is not None else obs.events or None

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
            prompt_tokens=usage.prompt_tokens,
            cached_tokens=usage.cached_tokens,
            predicted_blocks=cached_blocks,
        )

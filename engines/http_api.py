"""SGLang's HTTP API (native + OpenAI-compatible) over any `EngineCore`, as an aiohttp application.

Shapes follow `sglang/srt/entrypoints/http_server.py` and `openai/` of 0.5.10.post1 (and the
`kv_event_sources` entry of 0.5.23's `/server_info`); see PROTOCOLS.md section 2. Prompts are
tokenized here (the byte tokenizer by default, so a router with the same default agrees with the
engine on every block hash); the engine only sees token ids.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from cache_index.hashing import ByteTokenizer, Tokenizer
from engines.core import DropConnection, EngineCore, EngineError, GenerateRequest, TokenChunk

SGLANG_VERSION = "0.5.10.post1"
"""The SGLang release whose API shapes this layer reproduces."""


class ApiError(Exception):
    """A request the API rejects before it reaches the engine (400 unless told)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _byte_tokenizer() -> Tokenizer:
    # ByteTokenizer's `name` is a frozen field, the Protocol declares a plain attribute: same at run time.
    return cast(Tokenizer, ByteTokenizer())


def _bytes_detokenize(ids: list[int]) -> str:
    return bytes(i & 0xFF for i in ids).decode("utf-8", errors="replace")


@dataclass
class ApiState:
    """What the handlers share: the engine, the tokenizer, the Prometheus registry of this one app."""

    core: EngineCore
    tokenizer: Tokenizer = field(default_factory=lambda: _byte_tokenizer())
    detokenize: Callable[[list[int]], str] = _bytes_detokenize
    served_model_name: str | None = None
    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=False))
    extra_server_info: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> str:
        return self.served_model_name or self.core.facts.model_path


STATE = web.AppKey("kvroute_api_state", ApiState)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _openai_error(message: str, status: int = 400, err_type: str = "BadRequestError") -> web.Response:
    return _json(
        {"object": "error", "message": message, "type": err_type, "param": None, "code": status}, status
    )


def _native_error(message: str, status: int = 400) -> web.Response:
    return _json({"error": {"message": message}}, status)


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json(loads=orjson.loads)
    except (ValueError, orjson.JSONDecodeError) as exc:
        raise ApiError(f"Invalid JSON body: {exc}") from exc
    if not isinstance(data, dict):
        raise ApiError("The request body must be a JSON object")
    return data


def _int_field(d: dict[str, Any], name: str, default: int | None) -> int | None:
    v = d.get(name, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(f"{name} must be an integer, got {v!r}")
    return v


def _token_list(v: Any, name: str) -> list[int]:
    if not isinstance(v, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v
    ):
        raise ApiError(f"{name} must be a list of non-negative integers")
    return v


def _bootstrap(d: dict[str, Any], req: GenerateRequest) -> None:
    for name in ("bootstrap_host", "bootstrap_port", "bootstrap_room"):
        v = d.get(name)
        if isinstance(v, list):
            raise ApiError(f"batched {name} is not supported: send one request per item")
        if v is not None:
            if name != "bootstrap_host" and (isinstance(v, bool) or not isinstance(v, int)):
                raise ApiError(f"{name} must be an integer")
            setattr(req, name, v)


# ---- the engine seam: iterate chunks, mapping disconnects to aborts ---------------------------------
async def _first_and_rest(
    core: EngineCore, req: GenerateRequest
) -> tuple[TokenChunk, AsyncIterator[TokenChunk]]:
    """Wait for the first chunk before any byte goes out, so errors before it get a real HTTP status."""
    it = core.generate(req).__aiter__()
    try:
        first = await it.__anext__()
    except StopAsyncIteration as exc:  # pragma: no cover - an engine always ends with a finish chunk
        raise EngineError("engine produced no output") from exc
    except BaseException:
        await it.aclose()  # type: ignore[attr-defined]
        raise
    return first, it


async def _drop(request: web.Request) -> None:
    """Fault: cut the TCP connection mid-response (the client sees an incomplete chunked body)."""
    if request.transport is not None:
        request.transport.abort()


def _merge(chunks: Iterable[TokenChunk]) -> tuple[list[int], TokenChunk]:
    ids: list[int] = []
    last: TokenChunk | None = None
    for c in chunks:
        ids.extend(c.token_ids)
        last = c
    assert last is not None
    return ids, last


async def _collect(first: TokenChunk, rest: AsyncIterator[TokenChunk]) -> tuple[list[int], TokenChunk]:
    chunks = [first]
    if first.finish_reason is None:
        async for c in rest:
            chunks.append(c)
    return _merge(chunks)


def _sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


_DONE = b"data: [DONE]\n\n"


async def _end_sse(resp: web.StreamResponse) -> web.StreamResponse:
    try:
        await resp.write(_DONE)
        await resp.write_eof()
    except ConnectionResetError:
        pass  # the client left after the last token: nothing to abort any more
    return resp


async def _start_sse(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(
        status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    return resp


# ---- native API ------------------------------------------------------------------------------------
def _meta(rid: str, c: TokenChunk, completion_tokens: int) -> dict[str, Any]:
    m: dict[str, Any] = {
        "id": rid,
        "finish_reason": c.finish_reason,
        "prompt_tokens": c.prompt_tokens,
        "weight_version": "default",
        "total_retractions": 0,
        "reasoning_tokens": 0,
        "completion_tokens": completion_tokens,
        "cached_tokens": c.cached_tokens,
    }
    if c.finish_reason is not None and c.e2e_latency is not None:
        m["e2e_latency"] = c.e2e_latency
    return m


def _parse_generate(st: ApiState, d: dict[str, Any]) -> GenerateRequest:
    text, ids = d.get("text"), d.get("input_ids")
    if (text is None) == (ids is None):
        raise ApiError("Either text or input_ids should be provided.")
    if isinstance(text, list) or (isinstance(ids, list) and ids and isinstance(ids[0], list)):
        raise ApiError("batched /generate requests are not supported by this engine: send one per prompt")
    if text is not None and not isinstance(text, str):
        raise ApiError("text must be a string")
    tokens = st.tokenizer.encode(text) if text is not None else _token_list(ids, "input_ids")
    sp = d.get("sampling_params") or {}
    if not isinstance(sp, dict):
        raise ApiError("sampling_params must be an object")
    rid = d.get("rid") or uuid.uuid4().hex
    if not isinstance(rid, str):
        raise ApiError("rid must be a string")
    max_new = _int_field(sp, "max_new_tokens", 128)
    seed = _int_field(sp, "sampling_seed", None)
    req = GenerateRequest(
        rid=rid,
        input_ids=tokens,
        max_new_tokens=128 if max_new is None else max_new,
        seed=seed,
        ignore_eos=bool(sp.get("ignore_eos", False)),
        stream=bool(d.get("stream", False)),
    )
    _bootstrap(d, req)
    return req


async def generate(request: web.Request) -> web.StreamResponse:
    st = request.app[STATE]
    try:
        req = _parse_generate(st, await _body(request))
        first, rest = await _first_and_rest(st.core, req)
    except ApiError as exc:
        return _native_error(str(exc), exc.status)
    except EngineError as exc:
        return _native_error(str(exc), exc.status)
    incremental = bool(st.extra_server_info.get("incremental_streaming_output", False))
    if not req.stream:
        try:
            ids, last = await _collect(first, rest)
        except EngineError as exc:
            return _native_error(str(exc), exc.status)
        return _json(
            {"text": st.detokenize(ids), "output_ids": ids, "meta_info": _meta(req.rid, last, len(ids))}
        )
    out: list[int] = []
    resp = web.StreamResponse()
    try:
        resp = await _start_sse(request)
        chunk: TokenChunk | None = first
        while chunk is not None:
            out.extend(chunk.token_ids)
            shown = chunk.token_ids if incremental else out
            await resp.write(
                _sse(
                    {
                        "text": st.detokenize(shown),
                        "output_ids": list(shown),
                        "meta_info": _meta(req.rid, chunk, len(out)),
                    }
                )
            )
            if chunk.finish_reason is not None:
                break
            chunk = await anext(rest, None)
    except DropConnection:
        await _drop(request)
        return resp
    except EngineError as exc:
        await resp.write(_sse({"error": {"message": str(exc)}}))
    except ConnectionResetError:  # the client went away: closing `rest` aborts the request
        return resp
    finally:
        await rest.aclose()  # type: ignore[attr-defined]
    return await _end_sse(resp)


# ---- OpenAI API ------------------------------------------------------------------------------------
def _usage(c: TokenChunk, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": c.prompt_tokens,
        "total_tokens": c.prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": {"cached_tokens": c.cached_tokens},
        "reasoning_tokens": 0,
    }


def _finish_str(c: TokenChunk) -> str | None:
    if c.finish_reason is None:
        return None
    t = c.finish_reason.get("type")
    return "length" if t == "length" else "abort" if t == "abort" else "stop"


def _openai_common(st: ApiState, d: dict[str, Any], tokens: list[int], prefix: str) -> GenerateRequest:
    n = d.get("n", 1)
    if n not in (1, None):
        raise ApiError("n > 1 is not supported by this engine")
    max_new = _int_field(d, "max_completion_tokens", None)
    if max_new is None:
        max_new = _int_field(d, "max_tokens", None)
    if max_new is None:
        max_new = 16 if prefix == "cmpl" else 128
    rid = d.get("rid") or f"{uuid.uuid4().hex}"
    if not isinstance(rid, str):
        raise ApiError("rid must be a string")
    req = GenerateRequest(
        rid=rid,
        input_ids=tokens,
        max_new_tokens=max_new,
        seed=_int_field(d, "seed", None),
        ignore_eos=bool(d.get("ignore_eos", False)),
        stream=bool(d.get("stream", False)),
    )
    _bootstrap(d, req)
    return req


def _include_usage(d: dict[str, Any]) -> bool:
    so = d.get("stream_options")
    return isinstance(so, dict) and bool(so.get("include_usage"))


async def _openai_stream(
    request: web.Request,
    first: TokenChunk,
    rest: AsyncIterator[TokenChunk],
    make_chunk: Callable[[str | None, str | None], dict[str, Any]],
    head: dict[str, Any],
    include_usage: bool,
    opening: dict[str, Any] | None,
) -> web.StreamResponse:
    st = request.app[STATE]
    n_out = 0
    last = first
    resp = web.StreamResponse()
    try:
        resp = await _start_sse(request)
        if opening is not None:
            await resp.write(_sse(opening))
        chunk: TokenChunk | None = first
        while chunk is not None:
            last = chunk
            n_out += len(chunk.token_ids)
            if chunk.token_ids:
                await resp.write(_sse(make_chunk(st.detokenize(chunk.token_ids), None)))
            if chunk.finish_reason is not None:
                await resp.write(_sse(make_chunk(None, _finish_str(chunk))))
                break
            chunk = await anext(rest, None)
        if include_usage:
            await resp.write(_sse({**head, "choices": [], "usage": _usage(last, n_out)}))
    except DropConnection:
        await _drop(request)
        return resp
    except EngineError as exc:
        err = {
            "object": "error",
            "message": str(exc),
            "type": "InternalServerError",
            "param": None,
            "code": exc.status,
        }
        await resp.write(_sse({"error": err}))
    except ConnectionResetError:  # the client went away: closing `rest` aborts the request
        return resp
    finally:
        await rest.aclose()  # type: ignore[attr-defined]
    return await _end_sse(resp)


async def completions(request: web.Request) -> web.StreamResponse:
    st = request.app[STATE]
    try:
        d = await _body(request)
        prompt = d.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]
        if isinstance(prompt, str):
            tokens = st.tokenizer.encode(prompt)
        elif isinstance(prompt, list):
            tokens = _token_list(prompt, "prompt")
        else:
            raise ApiError("prompt must be a string or a list of token ids")
        req = _openai_common(st, d, tokens, "cmpl")
        first, rest = await _first_and_rest(st.core, req)
    except ApiError as exc:
        return _openai_error(str(exc), exc.status)
    except EngineError as exc:
        return _openai_error(
            str(exc), exc.status, "BadRequestError" if exc.status == 400 else "InternalServerError"
        )
    head = {"id": req.rid, "object": "text_completion", "created": int(time.time()), "model": st.model}
    if not req.stream:
        try:
            ids, last = await _collect(first, rest)
        except EngineError as exc:
            return _openai_error(str(exc), exc.status, "InternalServerError")
        choice = {
            "index": 0,
            "text": st.detokenize(ids),
            "logprobs": None,
            "finish_reason": _finish_str(last),
            "matched_stop": None,
        }
        return _json({**head, "choices": [choice], "usage": _usage(last, len(ids))})

    def make(text: str | None, finish: str | None) -> dict[str, Any]:
        choice = {
            "index": 0,
            "text": text or "",
            "logprobs": None,
            "finish_reason": finish,
            "matched_stop": None,
        }
        return {**head, "choices": [choice], "usage": None}

    return await _openai_stream(request, first, rest, make, head, _include_usage(d), None)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    st = request.app[STATE]
    try:
        d = await _body(request)
        messages = d.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError("messages must be a non-empty list")
        try:
            tokens = st.tokenizer.apply_chat_template(messages)
        except ValueError as exc:
            raise ApiError(str(exc)) from exc
        req = _openai_common(st, d, tokens, "chatcmpl")
        first, rest = await _first_and_rest(st.core, req)
    except ApiError as exc:
        return _openai_error(str(exc), exc.status)
    except EngineError as exc:
        return _openai_error(
            str(exc), exc.status, "BadRequestError" if exc.status == 400 else "InternalServerError"
        )
    head = {"id": req.rid, "object": "chat.completion", "created": int(time.time()), "model": st.model}
    if not req.stream:
        try:
            ids, last = await _collect(first, rest)
        except EngineError as exc:
            return _openai_error(str(exc), exc.status, "InternalServerError")
        msg = {
            "role": "assistant",
            "content": st.detokenize(ids),
            "reasoning_content": None,
            "tool_calls": None,
        }
        choice = {
            "index": 0,
            "message": msg,
            "logprobs": None,
            "finish_reason": _finish_str(last),
            "matched_stop": None,
        }
        return _json({**head, "choices": [choice], "usage": _usage(last, len(ids))})
    head = {**head, "object": "chat.completion.chunk"}

    def make(text: str | None, finish: str | None) -> dict[str, Any]:
        delta: dict[str, Any] = {} if text is None else {"content": text}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish, "matched_stop": None}
        return {**head, "choices": [choice], "usage": None}

    opening = {
        **head,
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
        "usage": None,
    }
    return await _openai_stream(request, first, rest, make, head, _include_usage(d), opening)


async def models(request: web.Request) -> web.Response:
    st = request.app[STATE]
    f = st.core.facts
    card = {
        "id": st.model,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "sglang",
        "root": f.model_path,
        "max_model_len": f.context_length,
    }
    return _json({"object": "list", "data": [card]})


# ---- health and state ------------------------------------------------------------------------------
async def health(request: web.Request) -> web.Response:
    core = request.app[STATE].core
    return web.Response(status=200 if core.is_ready() else 503)


async def health_generate(request: web.Request) -> web.Response:
    """SGLang runs a one-token generation; bounded so a stalled engine answers 503, not never."""
    core = request.app[STATE].core
    if not core.is_ready():
        return web.Response(status=503)
    if core.facts.disaggregation_mode != "null":
        return web.Response(status=200)  # SGLang's PD servers skip the probe generation too
    req = GenerateRequest(rid=f"HEALTH_CHECK_{uuid.uuid4().hex}", input_ids=[0], max_new_tokens=1)

    async def run() -> None:
        async for c in core.generate(req):
            if c.finish_reason is not None:
                return

    try:
        await asyncio.wait_for(run(), timeout=float(request.query.get("timeout", 20)))
    except (TimeoutError, EngineError):
        return web.Response(status=503)
    return web.Response(status=200)


def _server_info(request: web.Request) -> dict[str, Any]:
    st = request.app[STATE]
    f = st.core.facts
    load = st.core.load()
    sock = request.transport.get_extra_info("sockname") if request.transport else None
    host, port = (sock[0], sock[1]) if sock else ("127.0.0.1", None)
    kv = f.kv_events
    info: dict[str, Any] = {
        "model_path": f.model_path,
        "tokenizer_path": f.model_path,
        "served_model_name": st.model,
        "host": host,
        "port": port,
        "page_size": f.page_size,
        "max_total_tokens": f.max_total_tokens,
        "context_length": f.context_length,
        "chunked_prefill_size": f.chunked_prefill_size,
        "max_running_requests": f.max_running_requests,
        "disaggregation_mode": f.disaggregation_mode,
        "disaggregation_bootstrap_port": f.disaggregation_bootstrap_port,
        "disaggregation_transfer_backend": "mooncake",
        "enable_cache_report": True,
        "tp_size": 1,
        "dp_size": 1,
        "kv_events_config": None
        if kv is None
        else json.dumps(
            {
                "publisher": "zmq",
                "endpoint": kv.endpoint,
                "topic": kv.topic,
                "replay_endpoint": kv.replay_endpoint,
            }
        ),
        "max_total_num_tokens": f.max_total_tokens,
        "max_req_input_len": f.context_length - 1,
        "internal_states": [{"last_gen_throughput": load.gen_throughput, "memory_usage": {}}],
        "version": SGLANG_VERSION,
        **f.extra,
        **st.extra_server_info,
    }
    if kv is not None:
        info["kv_event_sources"] = [kv.as_dict()]  # 0.5.23's scheduler_info entry
        info["kv_events"] = kv.as_dict()
    return info


async def server_info(request: web.Request) -> web.Response:
    return _json(_server_info(request))


async def model_info(request: web.Request) -> web.Response:
    st = request.app[STATE]
    return _json(
        {
            "model_path": st.core.facts.model_path,
            "tokenizer_path": st.core.facts.model_path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
        }
    )


async def get_load(request: web.Request) -> web.Response:
    ld = request.app[STATE].core.load()
    return _json(
        [
            {
                "rid": None,
                "http_worker_ipc": None,
                "dp_rank": 0,
                "num_reqs": ld.num_running_reqs + ld.num_waiting_reqs,
                "num_waiting_reqs": ld.num_waiting_reqs,
                "num_tokens": ld.num_used_tokens,
                "ts_tic": time.time(),
            }
        ]
    )


async def v1_loads(request: web.Request) -> web.Response:
    """0.5.10's /v1/loads (the newer, richer load report)."""
    ld = request.app[STATE].core.load()
    util = ld.token_usage
    one = {
        "dp_rank": 0,
        "num_running_reqs": ld.num_running_reqs,
        "num_waiting_reqs": ld.num_waiting_reqs,
        "num_used_tokens": ld.num_used_tokens,
        "max_total_num_tokens": ld.max_total_num_tokens,
        "token_usage": round(util, 4),
        "gen_throughput": round(ld.gen_throughput, 2),
        "cache_hit_rate": round(ld.cache_hit_rate, 4),
        "utilization": round(util, 4),
        "max_running_requests": request.app[STATE].core.facts.max_running_requests,
        "num_total_reqs": ld.num_running_reqs + ld.num_waiting_reqs,
    }
    aggregate = {
        "total_running_reqs": one["num_running_reqs"],
        "total_waiting_reqs": one["num_waiting_reqs"],
        "total_reqs": one["num_total_reqs"],
        "avg_token_usage": one["token_usage"],
        "avg_throughput": one["gen_throughput"],
        "avg_utilization": one["utilization"],
    }
    return _json(
        {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
            "version": SGLANG_VERSION,
            "dp_rank_count": 1,
            "loads": [one],
            "aggregate": aggregate,
        }
    )


async def flush_cache(request: web.Request) -> web.Response:
    ok = await request.app[STATE].core.flush_cache()
    if ok:
        return web.Response(
            text="Cache flushed.\nPlease check backend logs for more details. "
            "(When there are running or waiting requests, the operation will not be performed.)\n"
        )
    return web.Response(text="Flush cache failed: requests are running or waiting.\n", status=400)


async def abort_request(request: web.Request) -> web.Response:
    st = request.app[STATE]
    try:
        d = await _body(request)
    except ApiError as exc:
        return _native_error(str(exc))
    rid = d.get("rid")
    if rid is not None and not isinstance(rid, str):
        return _native_error("rid must be a string")
    st.core.abort(rid, abort_all=bool(d.get("abort_all", False)))
    return web.Response(status=200)


class _EngineCollector:
    """Reads the engine's load at scrape time: no metric objects to keep in sync, no global registry."""

    def __init__(self, st: ApiState) -> None:
        self._st = st

    def collect(self) -> Iterable[Metric]:
        ld = self._st.core.load()
        labels = ["model_name", "engine_type", "tp_rank", "pp_rank"]
        lv = [self._st.model, "unified", "0", "0"]

        def gauge(name: str, doc: str, v: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(lv, v)
            return g

        def counter(name: str, doc: str, v: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(lv, v)
            return c

        yield gauge("sglang:num_running_reqs", "The number of running requests.", ld.num_running_reqs)
        yield gauge(
            "sglang:num_queue_reqs", "The number of requests in the waiting queue.", ld.num_waiting_reqs
        )
        yield gauge("sglang:num_used_tokens", "The number of used tokens.", ld.num_used_tokens)
        yield gauge("sglang:max_total_num_tokens", "Size of the KV pool in tokens.", ld.max_total_num_tokens)
        yield gauge("sglang:token_usage", "The token usage.", ld.token_usage)
        yield gauge("sglang:cache_hit_rate", "The prefix cache hit rate.", ld.cache_hit_rate)
        yield gauge("sglang:gen_throughput", "The generation throughput (token/s).", ld.gen_throughput)
        yield counter("sglang:prompt_tokens", "Number of prefill tokens processed.", ld.prompt_tokens_total)
        yield counter(
            "sglang:cached_tokens", "Number of prompt tokens served from the cache.", ld.cached_tokens_total
        )
        yield counter(
            "sglang:generation_tokens", "Number of generation tokens processed.", ld.generation_tokens_total
        )
        yield counter("sglang:num_requests", "Number of requests received.", ld.requests_total)


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[STATE].registry)
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def create_app(
    core: EngineCore,
    *,
    tokenizer: Tokenizer | None = None,
    served_model_name: str | None = None,
    extra_server_info: dict[str, Any] | None = None,
    manage_core: bool = True,
) -> web.Application:
    """The SGLang-compatible app over `core`. With `manage_core`, the app starts and closes the engine."""
    st = ApiState(
        core=core,
        tokenizer=tokenizer or _byte_tokenizer(),
        served_model_name=served_model_name,
        extra_server_info=dict(extra_server_info or {}),
    )
    st.registry.register(_EngineCollector(st))
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATE] = st
    r = app.router
    r.add_route("POST", "/generate", generate)
    r.add_route("PUT", "/generate", generate)
    r.add_post("/v1/completions", completions)
    r.add_post("/v1/chat/completions", chat_completions)
    r.add_get("/v1/models", models)
    r.add_get("/health", health)
    r.add_get("/health_generate", health_generate)
    r.add_get("/server_info", server_info)
    r.add_get("/get_server_info", server_info)
    r.add_get("/model_info", model_info)
    r.add_get("/get_model_info", model_info)
    r.add_get("/get_load", get_load)
    r.add_get("/v1/loads", v1_loads)
    r.add_route("POST", "/flush_cache", flush_cache)
    r.add_get("/flush_cache", flush_cache)
    r.add_post("/abort_request", abort_request)
    r.add_get("/metrics", metrics)
    if manage_core:

        async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
            await core.start()
            yield
            await core.close()

        app.cleanup_ctx.append(lifecycle)
    return app

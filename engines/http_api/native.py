"""SGLang's native endpoints: /generate, health, server and model info, load reports, flush, abort."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from kvroute.engines.core import DropConnection, EngineError, GenerateRequest, TokenChunk
from kvroute.engines.http_api.common import (
    SGLANG_VERSION,
    STATE,
    ApiError,
    ApiState,
    apply_bootstrap,
    apply_dp_rank,
    collect,
    drop_connection,
    first_and_rest,
    int_field,
    json_response,
    native_error,
    read_body,
    token_list,
)
from kvroute.engines.http_api.sse import end_sse, sse_event, start_sse


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
    if c.time_stats is not None:
        m.update(c.time_stats)
    if c.finish_reason is not None and c.e2e_latency is not None:
        m["e2e_latency"] = c.e2e_latency
    return m


PER_ITEM = ("rid", "sampling_params", "bootstrap_host", "bootstrap_port", "bootstrap_room")
"""Batch fields that may be a list with one value per item (SGLang's GenerateReqInput normalisation)."""


def _batch_items(d: dict[str, Any]) -> list[dict[str, Any]] | None:
    """A batch `/generate` (`text` a list, or `input_ids` a list of lists) as one request dict per item.

    As SGLang's `io_struct.py`: a list field gives one value per item (its length must match), a scalar
    `rid` becomes `rid_i`, a scalar `bootstrap_room` becomes `room + i`, other scalars are shared.
    Returns None for a single request.
    """
    text, ids = d.get("text"), d.get("input_ids")
    if isinstance(text, list):
        key, prompts = "text", text
    elif isinstance(ids, list) and ids and isinstance(ids[0], list):
        key, prompts = "input_ids", ids
    else:
        return None
    n = len(prompts)
    if n == 0:
        raise ApiError(f"{key} must not be an empty list")
    shared = {k: v for k, v in d.items() if k not in PER_ITEM and k not in ("text", "input_ids")}
    items = [{**shared, key: prompt} for prompt in prompts]
    for name in PER_ITEM:
        v = d.get(name)
        if isinstance(v, list):
            if len(v) != n:
                raise ApiError(f"{name} has {len(v)} values for a batch of {n}")
            values = v
        elif v is None:
            continue
        elif name == "rid":
            values = [f"{v}_{i}" for i in range(n)]
        elif name == "bootstrap_room" and isinstance(v, int) and not isinstance(v, bool):
            values = [v + i for i in range(n)]
        else:
            values = [v] * n
        for item, value in zip(items, values, strict=True):
            item[name] = value
    return items


def _parse_generate(st: ApiState, d: dict[str, Any]) -> GenerateRequest:
    text, ids = d.get("text"), d.get("input_ids")
    if (text is None) == (ids is None):
        raise ApiError("Either text or input_ids should be provided.")
    if text is not None and not isinstance(text, str):
        raise ApiError("text must be a string")
    tokens = st.tokenizer.encode(text) if text is not None else token_list(ids, "input_ids")
    sp = d.get("sampling_params") or {}
    if not isinstance(sp, dict):
        raise ApiError("sampling_params must be an object")
    rid = d.get("rid") or uuid.uuid4().hex
    if not isinstance(rid, str):
        raise ApiError("rid must be a string")
    max_new = int_field(sp, "max_new_tokens", 128)
    seed = int_field(sp, "sampling_seed", None)
    req = GenerateRequest(
        rid=rid,
        input_ids=tokens,
        max_new_tokens=128 if max_new is None else max_new,
        seed=seed,
        ignore_eos=bool(sp.get("ignore_eos", False)),
        stream=bool(d.get("stream", False)),
        priority=int_field(d, "priority", None),
    )
    apply_bootstrap(d, req)
    apply_dp_rank(d, req)
    return req


async def generate(request: web.Request) -> web.StreamResponse:
    st = request.app[STATE]
    try:
        d = await read_body(request)
        items = _batch_items(d)
        if items is not None:
            return await _generate_batch(request, st, [_parse_generate(st, item) for item in items])
        req = _parse_generate(st, d)
        first, rest = await first_and_rest(st.core, req)
    except ApiError as exc:
        return native_error(str(exc), exc.status)
    except EngineError as exc:
        return native_error(str(exc), exc.status)
    incremental = bool(st.extra_server_info.get("incremental_streaming_output", False))
    if not req.stream:
        try:
            ids, last = await collect(first, rest)
        except EngineError as exc:
            return native_error(str(exc), exc.status)
        return json_response(
            {"text": st.detokenize(ids), "output_ids": ids, "meta_info": _meta(req.rid, last, len(ids))}
        )
    out: list[int] = []
    resp = web.StreamResponse()
    try:
        resp = await start_sse(request)
        chunk: TokenChunk | None = first
        while chunk is not None:
            out.extend(chunk.token_ids)
            shown = chunk.token_ids if incremental else out
            await resp.write(
                sse_event(
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
        await drop_connection(request)
        return resp
    except EngineError as exc:
        await resp.write(sse_event({"error": {"message": str(exc)}}))
    except ConnectionResetError:  # the client went away: closing `rest` aborts the request
        return resp
    finally:
        await rest.aclose()  # type: ignore[attr-defined]
    return await end_sse(resp)


async def _generate_batch(
    request: web.Request, st: ApiState, reqs: list[GenerateRequest]
) -> web.StreamResponse:
    """All items run at once. Not streamed: a JSON list in item order. Streamed: each item's events as they
    come, tagged with `index` (SGLang's `_handle_batch_request`). An item failing before its first token
    fails the whole request and aborts the others."""
    if len({r.rid for r in reqs}) != len(reqs):
        raise ApiError("rids in a batch must be distinct")
    started = await asyncio.gather(*(first_and_rest(st.core, r) for r in reqs), return_exceptions=True)
    rests = [x[1] for x in started if isinstance(x, tuple)]
    failed = next((x for x in started if isinstance(x, BaseException)), None)
    try:
        if failed is not None:
            if isinstance(failed, ApiError | EngineError):
                return native_error(str(failed), failed.status)
            raise failed
        pairs = [x for x in started if isinstance(x, tuple)]
        if not reqs[0].stream:
            done = await asyncio.gather(*(collect(first, rest) for first, rest in pairs))
            return json_response(
                [
                    {"text": st.detokenize(ids), "output_ids": ids, "meta_info": _meta(r.rid, last, len(ids))}
                    for r, (ids, last) in zip(reqs, done, strict=True)
                ]
            )
        return await _stream_batch(request, st, reqs, pairs)
    except EngineError as exc:
        return native_error(str(exc), exc.status)
    finally:
        for rest in rests:
            await rest.aclose()  # type: ignore[attr-defined]


async def _stream_batch(
    request: web.Request,
    st: ApiState,
    reqs: list[GenerateRequest],
    pairs: list[tuple[TokenChunk, AsyncIterator[TokenChunk]]],
) -> web.StreamResponse:
    queue: asyncio.Queue[tuple[int, TokenChunk | EngineError]] = asyncio.Queue()

    async def pump(i: int, first: TokenChunk, rest: AsyncIterator[TokenChunk]) -> None:
        chunk: TokenChunk | None = first
        try:
            while chunk is not None:
                await queue.put((i, chunk))
                if chunk.finish_reason is not None:
                    return
                chunk = await anext(rest, None)
        except EngineError as exc:
            await queue.put((i, exc))

    incremental = bool(st.extra_server_info.get("incremental_streaming_output", False))
    outs: list[list[int]] = [[] for _ in reqs]
    tasks = [asyncio.create_task(pump(i, f, r)) for i, (f, r) in enumerate(pairs)]
    resp = web.StreamResponse()
    try:
        resp = await start_sse(request)
        left = len(reqs)
        while left:
            i, item = await queue.get()
            if isinstance(item, DropConnection):
                await drop_connection(request)
                return resp
            if isinstance(item, EngineError):
                await resp.write(sse_event({"error": {"message": str(item)}, "index": i}))
                left -= 1
                continue
            outs[i].extend(item.token_ids)
            shown = item.token_ids if incremental else outs[i]
            event = {
                "text": st.detokenize(shown),
                "output_ids": list(shown),
                "meta_info": _meta(reqs[i].rid, item, len(outs[i])),
                "index": i,
            }
            await resp.write(sse_event(event))
            if item.finish_reason is not None:
                left -= 1
    except ConnectionResetError:  # the client went away: the caller closes every item's iterator
        return resp
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return await end_sse(resp)


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
                "endpoint": kv.configured or kv.endpoint,
                "topic": kv.topic,
                "replay_endpoint": kv.replay_endpoint,
                **({} if kv.bind is None else {"bind": kv.bind}),
            }
        ),
        "max_total_num_tokens": f.max_total_tokens,
        "max_req_input_len": f.context_length - 1,
        "internal_states": [{"last_gen_throughput": load.gen_throughput, "memory_usage": {}}],
        "version": SGLANG_VERSION,
        **f.extra,
        **st.extra_server_info,
    }
    if kv is not None and "kv_event_sources" not in info:
        info["kv_event_sources"] = [kv.as_dict()]  # 0.5.23's scheduler_info entry
        info["kv_events"] = kv.as_dict()
    return info


async def server_info(request: web.Request) -> web.Response:
    return json_response(_server_info(request))


async def model_info(request: web.Request) -> web.Response:
    st = request.app[STATE]
    return json_response(
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
    return json_response(
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
    return json_response(
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
        d = await read_body(request)
    except ApiError as exc:
        return native_error(str(exc))
    rid = d.get("rid")
    if rid is not None and not isinstance(rid, str):
        return native_error("rid must be a string")
    st.core.abort(rid, abort_all=bool(d.get("abort_all", False)))
    return web.Response(status=200)

"""The OpenAI-compatible endpoints of SGLang: /v1/completions, /v1/chat/completions, /v1/models.

Usage always carries `prompt_tokens_details.cached_tokens` (SGLang needs --enable-cache-report).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from kvroute.engines.core import DropConnection, EngineError, GenerateRequest, TokenChunk
from kvroute.engines.http_api.common import (
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
    openai_error,
    read_body,
    token_list,
)
from kvroute.engines.http_api.sse import end_sse, sse_event, start_sse


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
    max_new = int_field(d, "max_completion_tokens", None)
    if max_new is None:
        max_new = int_field(d, "max_tokens", None)
    if max_new is None:
        max_new = 16 if prefix == "cmpl" else 128
    rid = d.get("rid") or f"{uuid.uuid4().hex}"
    if not isinstance(rid, str):
        raise ApiError("rid must be a string")
    req = GenerateRequest(
        rid=rid,
        input_ids=tokens,
        max_new_tokens=max_new,
        seed=int_field(d, "seed", None),
        ignore_eos=bool(d.get("ignore_eos", False)),
        stream=bool(d.get("stream", False)),
        priority=int_field(d, "priority", None),
    )
    apply_bootstrap(d, req)
    apply_dp_rank(d, req)
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
        resp = await start_sse(request)
        if opening is not None:
            await resp.write(sse_event(opening))
        chunk: TokenChunk | None = first
        while chunk is not None:
            last = chunk
            n_out += len(chunk.token_ids)
            if chunk.token_ids:
                await resp.write(sse_event(make_chunk(st.detokenize(chunk.token_ids), None)))
            if chunk.finish_reason is not None:
                await resp.write(sse_event(make_chunk(None, _finish_str(chunk))))
                break
            chunk = await anext(rest, None)
        if include_usage:
            await resp.write(sse_event({**head, "choices": [], "usage": _usage(last, n_out)}))
    except DropConnection:
        await drop_connection(request)
        return resp
    except EngineError as exc:
        err = {
            "object": "error",
            "message": str(exc),
            "type": "InternalServerError",
            "param": None,
            "code": exc.status,
        }
        await resp.write(sse_event({"error": err}))
    except ConnectionResetError:  # the client went away: closing `rest` aborts the request
        return resp
    finally:
        await rest.aclose()  # type: ignore[attr-defined]
    return await end_sse(resp)


_Started = tuple[dict[str, Any], GenerateRequest, TokenChunk, AsyncIterator[TokenChunk]]


async def _start(
    request: web.Request, tokens_of: Callable[[dict[str, Any]], list[int]], prefix: str
) -> _Started | web.Response:
    """Read and validate the body, then wait for the first chunk: (body, request, first, rest), or the
    OpenAI error response for anything that failed before a byte went out (one mapping for both routes)."""
    st = request.app[STATE]
    try:
        d = await read_body(request)
        req = _openai_common(st, d, tokens_of(d), prefix)
        first, rest = await first_and_rest(st.core, req)
    except ApiError as exc:
        return openai_error(str(exc), exc.status)
    except EngineError as exc:
        return openai_error(
            str(exc), exc.status, "BadRequestError" if exc.status == 400 else "InternalServerError"
        )
    return d, req, first, rest


async def completions(request: web.Request) -> web.StreamResponse:
    st = request.app[STATE]

    def tokens_of(d: dict[str, Any]) -> list[int]:
        prompt = d.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return st.tokenizer.encode(prompt)
        if isinstance(prompt, list):
            return token_list(prompt, "prompt")
        raise ApiError("prompt must be a string or a list of token ids")

    started = await _start(request, tokens_of, "cmpl")
    if isinstance(started, web.Response):
        return started
    d, req, first, rest = started
    head = {"id": req.rid, "object": "text_completion", "created": int(time.time()), "model": st.model}
    if not req.stream:
        try:
            ids, last = await collect(first, rest)
        except EngineError as exc:
            return openai_error(str(exc), exc.status, "InternalServerError")
        choice = {
            "index": 0,
            "text": st.detokenize(ids),
            "logprobs": None,
            "finish_reason": _finish_str(last),
            "matched_stop": None,
        }
        return json_response({**head, "choices": [choice], "usage": _usage(last, len(ids))})

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

    def tokens_of(d: dict[str, Any]) -> list[int]:
        messages = d.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError("messages must be a non-empty list")
        try:
            return st.tokenizer.apply_chat_template(messages)
        except ValueError as exc:
            raise ApiError(str(exc)) from exc

    started = await _start(request, tokens_of, "chatcmpl")
    if isinstance(started, web.Response):
        return started
    d, req, first, rest = started
    head = {"id": req.rid, "object": "chat.completion", "created": int(time.time()), "model": st.model}
    if not req.stream:
        try:
            ids, last = await collect(first, rest)
        except EngineError as exc:
            return openai_error(str(exc), exc.status, "InternalServerError")
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
        return json_response({**head, "choices": [choice], "usage": _usage(last, len(ids))})
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
    return json_response({"object": "list", "data": [card]})

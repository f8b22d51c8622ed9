"""SGLang's other OpenAI-compatible endpoints: /v1/embeddings, /v1/responses, /v1/rerank, /v1/classify,
/v1/score and /v1/models/{model}, with SGLang 0.5.10's response shapes (`entrypoints/openai/protocol.py`).

Every prompt runs through the engine core as a one-token request (max_new_tokens=1 for the pooling
routes), so the prefix cache, its KV events and `cached_tokens` behave as for generation; the vectors,
labels and scores are deterministic functions of the tokens (a simulator has no model to pool).
"""

from __future__ import annotations

import base64
import struct
import time
import uuid
from typing import Any

import xxhash
from aiohttp import web

from kvroute.engines.core import EngineError, GenerateRequest, TokenChunk
from kvroute.engines.http_api.common import (
    STATE,
    ApiError,
    ApiState,
    collect,
    first_and_rest,
    int_field,
    json_response,
    openai_error,
    read_body,
    token_list,
)

_DIM = 16  # embedding width when the request names none


async def _run(st: ApiState, tokens: list[int], max_new: int) -> tuple[list[int], TokenChunk]:
    req = GenerateRequest(rid=uuid.uuid4().hex, input_ids=tokens, max_new_tokens=max_new)
    first, rest = await first_and_rest(st.core, req)
    return await collect(first, rest)


def _tokens(st: ApiState, v: Any, name: str) -> list[int]:
    if isinstance(v, str):
        if not v:
            raise ApiError(f"'{name}' must not be empty")
        return st.tokenizer.encode(v)
    if isinstance(v, list):
        return token_list(v, name)
    raise ApiError(f"'{name}' must be a string or a list of token ids")


def _items(v: Any, name: str) -> list[Any]:
    """One input or a batch: a string, a list of strings, token ids or a list of token-id lists."""
    if isinstance(v, list) and v and isinstance(v[0], str | list):
        return list(v)
    if v is None or v == [] or v == "":
        raise ApiError(f"'{name}' is required")
    return [v]


def _unit(tokens: list[int], i: int) -> float:
    return xxhash.xxh3_64_intdigest(struct.pack(f"<{len(tokens)}I", *tokens), seed=i) / 2**64


def _vector(tokens: list[int], dim: int) -> list[float]:
    raw = [_unit(tokens, i) - 0.5 for i in range(dim)]
    norm = sum(x * x for x in raw) ** 0.5 or 1.0
    return [x / norm for x in raw]


def _error(exc: Exception) -> web.Response:
    status = getattr(exc, "status", 400)
    return openai_error(str(exc), status, "BadRequestError" if status == 400 else "InternalServerError")


async def embeddings(request: web.Request) -> web.Response:
    st = request.app[STATE]
    try:
        d = await read_body(request)
        dim = int_field(d, "dimensions", _DIM) or _DIM
        fmt = d.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise ApiError("encoding_format must be 'float' or 'base64'")
        data: list[dict[str, Any]] = []
        prompt_tokens = 0
        for i, item in enumerate(_items(d.get("input"), "input")):
            tokens = _tokens(st, item, "input")
            await _run(st, tokens, 1)
            prompt_tokens += len(tokens)
            vec = _vector(tokens, dim)
            emb: Any = vec if fmt == "float" else base64.b64encode(struct.pack(f"<{dim}f", *vec)).decode()
            data.append({"object": "embedding", "embedding": emb, "index": i})
    except (ApiError, EngineError) as exc:
        return _error(exc)
    usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return json_response({"object": "list", "data": data, "model": st.model, "usage": usage})


async def responses(request: web.Request) -> web.Response:
    """The Responses API, non-streamed: `input` a string or a list of `{role, content}` messages."""
    st = request.app[STATE]
    try:
        d = await read_body(request)
        if d.get("stream"):
            raise ApiError("stream is not supported by this engine's /v1/responses")
        inp = d.get("input")
        if isinstance(inp, list):
            messages = [m for m in inp if isinstance(m, dict) and "role" in m]
            if isinstance(d.get("instructions"), str):
                messages.insert(0, {"role": "system", "content": d["instructions"]})
            tokens = st.tokenizer.apply_chat_template(messages)
        else:
            tokens = _tokens(st, inp, "input")
        ids, last = await _run(st, tokens, int_field(d, "max_output_tokens", 16) or 16)
    except (ApiError, EngineError, ValueError) as exc:
        return _error(exc)
    rid = f"resp_{uuid.uuid4().hex}"
    text = st.detokenize(ids)
    content = [{"type": "output_text", "text": text, "annotations": []}]
    message = {"type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": "completed", "role": "assistant"}
    usage = {
        "input_tokens": last.prompt_tokens,
        "input_tokens_details": {"cached_tokens": last.cached_tokens},
        "output_tokens": len(ids),
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": last.prompt_tokens + len(ids),
    }
    return json_response(
        {
            "id": rid,
            "object": "response",
            "created_at": int(time.time()),
            "status": "completed",
            "model": st.model,
            "output": [{**message, "content": content}],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": usage,
        }
    )


async def rerank(request: web.Request) -> web.Response:
    """`{query, documents}` -> SGLang's list of `{score, document, index, meta_info}`, best first."""
    st = request.app[STATE]
    try:
        d = await read_body(request)
        query = d.get("query")
        docs = d.get("documents")
        if not isinstance(query, str) or not query:
            raise ApiError("'query' must be a non-empty string")
        if not isinstance(docs, list) or not docs or not all(isinstance(x, str) for x in docs):
            raise ApiError("'documents' must be a non-empty list of strings")
        out = []
        for i, doc in enumerate(docs):
            tokens = st.tokenizer.encode(query) + st.tokenizer.encode(doc)
            _, last = await _run(st, tokens, 1)
            meta = {"prompt_tokens": last.prompt_tokens, "cached_tokens": last.cached_tokens}
            out.append({"score": _unit(tokens, 0), "document": doc, "index": i, "meta_info": meta})
    except (ApiError, EngineError) as exc:
        return _error(exc)
    out.sort(key=lambda r: -float(r["score"]))
    return json_response(out)


async def classify(request: web.Request) -> web.Response:
    st = request.app[STATE]
    try:
        d = await read_body(request)
        data = []
        prompt_tokens = 0
        for i, item in enumerate(_items(d.get("input", d.get("text")), "input")):
            tokens = _tokens(st, item, "input")
            await _run(st, tokens, 1)
            prompt_tokens += len(tokens)
            p = _unit(tokens, 0)
            data.append({"index": i, "label": "LABEL_1" if p >= 0.5 else "LABEL_0", "probs": [1 - p, p]})
            data[-1]["num_classes"] = 2
    except (ApiError, EngineError) as exc:
        return _error(exc)
    usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens, "completion_tokens": 0}
    return json_response(
        {
            "id": f"classify-{uuid.uuid4().hex}",
            "object": "list",
            "created": int(time.time()),
            "model": st.model,
            "data": data,
            "usage": usage,
        }
    )


async def score(request: web.Request) -> web.Response:
    """`{query, items, label_token_ids}` -> `{scores: [[p per label] per item]}` (SGLang's scoring)."""
    st = request.app[STATE]
    try:
        d = await read_body(request)
        query = d.get("query")
        items = _items(d.get("items"), "items")
        labels = d.get("label_token_ids")
        if not isinstance(labels, list) or not labels:
            raise ApiError("'label_token_ids' must be a non-empty list")
        scores = []
        prompt_tokens = 0
        for item in items:
            tokens = (_tokens(st, query, "query") if query else []) + _tokens(st, item, "items")
            await _run(st, tokens, 1)
            prompt_tokens += len(tokens)
            raw = [_unit(tokens + [int(t)], 0) for t in labels]
            total = sum(raw) or 1.0
            scores.append([x / total for x in raw])
    except (ApiError, EngineError, TypeError, ValueError) as exc:
        return _error(exc)
    usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens, "completion_tokens": 0}
    return json_response({"scores": scores, "model": st.model, "usage": usage, "object": "scoring"})


async def retrieve_model(request: web.Request) -> web.Response:
    st = request.app[STATE]
    model = request.match_info["model"]
    if model != st.model:
        return json_response(
            {
                "error": {
                    "message": f"The model '{model}' does not exist",
                    "type": "invalid_request_error",
                    "param": "model",
                    "code": "model_not_found",
                }
            },
            404,
        )
    return json_response(
        {
            "id": model,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "sglang",
            "root": model,
            "max_model_len": st.core.facts.context_length,
        }
    )


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/embeddings", embeddings)
    r.add_post("/v1/responses", responses)
    r.add_post("/v1/rerank", rerank)
    r.add_post("/v1/classify", classify)
    r.add_post("/v1/score", score)
    r.add_get("/v1/models/{model:.+}", retrieve_model)

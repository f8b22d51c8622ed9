"""What every handler shares: the app state, request parsing helpers, errors, and the engine seam.

The engine seam (`first_and_rest`, `collect`) waits for the first chunk before any byte goes out, so an
error before it becomes a real HTTP status; closing the iterator aborts the request in the engine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry

from kvroute.cache_index.hashing import ByteTokenizer, Tokenizer
from kvroute.engines.core import EngineCore, EngineError, GenerateRequest, TokenChunk

SGLANG_VERSION = "0.5.10.post1"
"""The SGLang release whose API shapes this layer reproduces."""


class ApiError(Exception):
    """A request the API rejects before it reaches the engine (400 unless told)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def byte_tokenizer() -> Tokenizer:
    # ByteTokenizer's `name` is a frozen field, the Protocol declares a plain attribute: same at run time.
    return cast(Tokenizer, ByteTokenizer())


def bytes_detokenize(ids: list[int]) -> str:
    return bytes(i & 0xFF for i in ids).decode("utf-8", errors="replace")


@dataclass
class ApiState:
    """What the handlers share: the engine, the tokenizer, the Prometheus registry of this one app."""

    core: EngineCore
    tokenizer: Tokenizer = field(default_factory=lambda: byte_tokenizer())
    detokenize: Callable[[list[int]], str] = bytes_detokenize
    served_model_name: str | None = None
    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=False))
    extra_server_info: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> str:
        return self.served_model_name or self.core.facts.model_path


STATE = web.AppKey("kvroute_api_state", ApiState)


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def openai_error(message: str, status: int = 400, err_type: str = "BadRequestError") -> web.Response:
    return json_response(
        {"object": "error", "message": message, "type": err_type, "param": None, "code": status}, status
    )


def native_error(message: str, status: int = 400) -> web.Response:
    return json_response({"error": {"message": message}}, status)


async def read_body(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json(loads=orjson.loads)
    except (ValueError, orjson.JSONDecodeError) as exc:
        raise ApiError(f"Invalid JSON body: {exc}") from exc
    if not isinstance(data, dict):
        raise ApiError("The request body must be a JSON object")
    return data


def int_field(d: dict[str, Any], name: str, default: int | None) -> int | None:
    v = d.get(name, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(f"{name} must be an integer, got {v!r}")
    return v


def token_list(v: Any, name: str) -> list[int]:
    if not isinstance(v, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v
    ):
        raise ApiError(f"{name} must be a list of non-negative integers")
    return v


def apply_dp_rank(d: dict[str, Any], req: GenerateRequest) -> None:
    """SGLang 0.5.10's `routed_dp_rank`, or its deprecated spelling `data_parallel_rank`."""
    rank = d.get("routed_dp_rank", d.get("data_parallel_rank"))
    if rank is None:
        return
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise ApiError("routed_dp_rank must be a non-negative integer")
    req.dp_rank = rank


def apply_bootstrap(d: dict[str, Any], req: GenerateRequest) -> None:
    for name in ("bootstrap_host", "bootstrap_port", "bootstrap_room"):
        v = d.get(name)
        if isinstance(v, list):  # native /generate splits batches per item first (native._batch_items)
            raise ApiError(f"a list of {name} needs a batch request (a list of prompts)")
        if v is not None:
            if name != "bootstrap_host" and (isinstance(v, bool) or not isinstance(v, int)):
                raise ApiError(f"{name} must be an integer")
            setattr(req, name, v)


# ---- the engine seam: iterate chunks, mapping disconnects to aborts ---------------------------------
async def first_and_rest(
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


async def drop_connection(request: web.Request) -> None:
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


async def collect(first: TokenChunk, rest: AsyncIterator[TokenChunk]) -> tuple[list[int], TokenChunk]:
    chunks = [first]
    if first.finish_reason is None:
        async for c in rest:
            chunks.append(c)
    return _merge(chunks)

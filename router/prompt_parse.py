"""A request body -> (JSON object, routing fields, routing request): on the loop for small bodies, in a
helper process for large ones.

Why a process: a 30 MB prompt (under the default 32 MiB body limit) costs ~1 s of JSON parsing,
tokenizing and hashing, and its biggest steps (`orjson.loads`, `str.encode`) are single C calls that
hold the GIL, so a thread does not free the event loop (issue #18: four such prompts stalled `/health`
for 5.7 s). The helper is one spawned process per router process, started on the first large body;
it rebuilds the router's tokenizer and hashing from a `ParseSpec` (the byte tokenizer or a local
Hugging Face tokenizer path), so its block hashes equal the loop's.
"""

from __future__ import annotations

import functools
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

from kvroute.cache_index.hashing import ByteTokenizer, HFTokenizer
from kvroute.router.errors import ApiError, bad_request, json_object
from kvroute.router.wire import RoutingFields, extract_fields

Parsed = tuple[dict[str, Any], RoutingFields, Any]


@dataclass(frozen=True)
class ParseSpec:
    """What a helper process needs to tokenize and hash exactly as the router's core does."""

    block_size: int
    seed: int
    tokenizer_path: str | None  # None: the byte tokenizer
    text_fallback: bool
    text_chunk_bytes: int
    max_prompt_blocks: int


def parse(
    router: Any, kind: str, body: bytes, session_header: str | None, with_blocks: bool | None
) -> Parsed:
    """ApiError (400) for what the client got wrong."""
    data = json_object(body)
    f = extract_fields(kind, data)
    try:
        rr = router.routing_request(
            input_ids=f.input_ids,
            text=f.text,
            messages=f.messages,
            session_key=session_header or f.user,
            model=f.model,
            max_tokens=f.max_tokens,
            with_blocks=with_blocks,
        )
    except ValueError as exc:
        raise bad_request(f"cannot route this prompt: {exc}", "invalid_prompt") from exc
    return data, f, rr


def spec_of(router: Any, tokenizer_path: str | None) -> ParseSpec | None:
    """The spec rebuilding `router`'s hashing in another process; None when its tokenizer cannot be
    rebuilt there (a tokenizer object handed to the library in-process)."""
    tok = router.tokenizer
    if isinstance(tok, ByteTokenizer) and tok.offset == 0:
        path = None
    elif isinstance(tok, HFTokenizer) and tokenizer_path:
        path = tokenizer_path
    else:
        return None
    return ParseSpec(
        router.block_size,
        router.seed,
        path,
        router.text_fallback,
        router.text_chunk_bytes,
        router.max_prompt_blocks,
    )


@functools.lru_cache(maxsize=4)
def _router_for(spec: ParseSpec) -> Any:
    from kvroute.router.core import Router

    r = Router(
        block_size=spec.block_size,
        policy="random",
        tokenizer=HFTokenizer(spec.tokenizer_path) if spec.tokenizer_path else None,
        text_chunk_bytes=spec.text_chunk_bytes,
        text_fallback=spec.text_fallback,
        max_prompt_blocks=spec.max_prompt_blocks,
    )
    r.seed = spec.seed
    return r


def parse_in_helper(
    spec: ParseSpec, kind: str, body: bytes, session_header: str | None, with_blocks: bool
) -> Parsed | tuple[int, str, str, str]:
    """Runs in the helper process. An ApiError comes back as (status, message, type, code): its
    constructor's arguments do not survive pickling."""
    try:
        return parse(_router_for(spec), kind, body, session_header, with_blocks)
    except ApiError as err:
        return (err.status, err.message, err.type, err.code)


def unwrap(result: Parsed | tuple[int, str, str, str]) -> Parsed:
    if isinstance(result[0], int):
        status, message, type_, code = result
        raise ApiError(status, message, type_, code)
    return result


def helper_pool() -> ProcessPoolExecutor:
    """One spawned process (not forked: the router has threads and an event loop)."""
    return ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))

"""Body rewriting for SGLang's bootstrap protocol (pure): rooms, bootstrap fields, rids, field insertion.

Both sides of a pair get the byte-identical body this produces, hence the same room(s); a batch gets one
room (and one rid) per item.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Mapping
from typing import Any

import orjson
from yarl import URL

from kvroute.router.pd.model import PDError

BOOTSTRAP_KEYS = ("bootstrap_host", "bootstrap_port", "bootstrap_room")
ROOM_BITS = 63  # SGLang keeps rooms as signed int64; the router draws a fresh non-negative one


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
    """An `rid` (per item for batches) when the client gave none, so `/abort_request` can name it.

    Returns (fields to add, the rids the engines will know). A client's scalar rid on a batch is known
    to SGLang as `rid_0 .. rid_{n-1}` (`io_struct.py` `_normalize_rid`), so those are the ones to abort.
    """
    rid = parsed.get("rid")
    n = batch_size(parsed, path)
    if isinstance(rid, str):
        return {}, [rid] if n is None else [f"{rid}_{i}" for i in range(n)]
    if isinstance(rid, list) and all(isinstance(r, str) for r in rid):
        return {}, list(rid)
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

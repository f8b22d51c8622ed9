"""What the proxy reads off the wire without changing it: routing fields of a request body, end-to-end
headers, and the SSE side-parser of a streamed answer.

Pure functions and small classes (no I/O), so the proxy's rules are testable alone. Bodies are parsed
with orjson only to read these fields; the bytes forwarded are always the client's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from multidict import CIMultiDict, CIMultiDictProxy

from kvroute.router.errors import bad_request

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


# Forwarded-only OpenAI/SGLang routes (embeddings, responses, rerank, classify, score): the field that
# carries the prompt, in the order looked for. Routed by it (prefix affinity and load), never checked: the
# engine validates these bodies.
PLAIN_KINDS = frozenset({"embeddings", "responses", "rerank", "classify", "score"})
_PLAIN_PROMPT_FIELDS = ("input", "query", "text", "text_1", "prompt", "items")
_PLAIN_KEY_CHARS = 65536  # a structured prompt's routing key: its JSON, cut here


def _plain_fields(
    body: Mapping[str, Any], model: str | None, user: str | None, rid: str | None
) -> RoutingFields:
    """The routing fields of a forwarded-only route: the first prompt-like field as text or token ids; a
    structured one (Responses API items, lists of documents) by its JSON, so equal prefixes stay together."""
    mt = body.get("max_output_tokens", body.get("max_tokens"))
    max_tokens = mt if isinstance(mt, int) and not isinstance(mt, bool) and mt >= 0 else None
    for key in _PLAIN_PROMPT_FIELDS:
        v = body.get(key)
        if isinstance(v, list) and v and isinstance(v[0], str | list):
            v = v[0]  # a batch is routed by its first item
        if isinstance(v, str) and v:
            return RoutingFields(text=v, model=model, max_tokens=max_tokens, user=user, rid=rid)
        if (
            isinstance(v, list)
            and v
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v)
        ):
            return RoutingFields(input_ids=list(v), model=model, max_tokens=max_tokens, user=user, rid=rid)
        if v:
            key_text = orjson.dumps(v).decode()[:_PLAIN_KEY_CHARS]
            return RoutingFields(text=key_text, model=model, max_tokens=max_tokens, user=user, rid=rid)
    raise bad_request(
        f"the request has no prompt field (one of {', '.join(_PLAIN_PROMPT_FIELDS)})", "missing_prompt"
    )


def extract_fields(kind: str, body: Mapping[str, Any]) -> RoutingFields:
    """Read and type-check the routing fields; a batch is routed by its first item."""
    _opt(body, "stream", bool, "a boolean")
    model = _opt(body, "model", str, "a string")
    user = _opt(body, "user", str, "a string")
    rid = body.get("rid")
    rid = rid if isinstance(rid, str) else None
    if kind in PLAIN_KINDS:
        return _plain_fields(body, model, user, rid)
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


def _connection_tokens(headers: CIMultiDict[str] | CIMultiDictProxy[str]) -> set[str]:
    """Header names listed in every `Connection` line (a client may send several; each names
    hop-by-hop headers to drop)."""
    return {
        h.strip().lower() for line in headers.getall("Connection", ()) for h in line.split(",") if h.strip()
    }


def forward_headers(headers: CIMultiDictProxy[str], request_id_header: str, rid: str) -> CIMultiDict[str]:
    """End-to-end headers of the client's request, minus hop-by-hop ones (and those named in Connection)."""
    extra = _connection_tokens(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in headers.items():
        lk = k.lower()
        if lk not in _HOP_BY_HOP and lk not in extra:
            out.add(k, v)
    out[request_id_header] = rid
    return out


def response_headers(headers: CIMultiDict[str] | CIMultiDictProxy[str]) -> CIMultiDict[str]:
    extra = _connection_tokens(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in headers.items():
        lk = k.lower()
        if lk not in _RESPONSE_DROP and lk not in extra:
            out.add(k, v)
    return out


class SseObserver:
    """Reads an SSE stream on the side: first token time, event count, inter-token gaps, the last event.

    Never alters or holds back bytes; parses JSON only for the first and the last data event.
    `gaps`: (seconds per event, events) for every event after the first, one entry per chunk (cheap on
    the hot path): the time since the previous data event is split evenly over the events of one chunk
    (an engine streaming with `stream_interval` > 1, or a slow reader, delivers several at once);
    events in the first event's chunk count as gap 0 (the client got them together).
    """

    __slots__ = (
        "_rest",
        "events",
        "first_at",
        "last_at",
        "last_data",
        "first_data",
        "ends_clean",
        "done",
        "gaps",
    )

    def __init__(self) -> None:
        self._rest = b""
        self.events = 0
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.first_data: bytes | None = None
        self.last_data: bytes | None = None
        self.ends_clean = True  # the bytes so far end at an event boundary ("\n\n")
        self.done = False
        self.gaps: list[tuple[float, int]] = []

    def feed(self, chunk: bytes, now: float) -> bool:
        """Returns True when this chunk carried the first data event."""
        last_at = self.last_at
        if (
            last_at is not None
            and not self._rest
            and chunk.startswith(b"data:")
            and chunk.find(b"\n") == len(chunk) - 2
            and chunk.endswith(b"\n\n")
        ):
            # Fast path, one token per chunk: exactly one whole `data:` event after the first one.
            payload = chunk[5:-2].strip()
            if payload and payload != b"[DONE]":
                self.ends_clean = True
                self.events += 1
                self.last_data = payload
                self.gaps.append((now - last_at, 1))
                self.last_at = now
                return False
        data = self._rest + chunk if self._rest else chunk
        self.ends_clean = data.endswith(b"\n\n") or data.endswith(b"\r\n\r\n")
        lines = data.split(b"\n")
        self._rest = lines.pop()
        first = False
        before = self.events
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
        new = self.events - before - (1 if first else 0)  # events after the stream's first one
        if new > 0:  # events that came with the stream's first one arrived with no gap at all
            self.gaps.append(((now - self.last_at) / new if self.last_at is not None else 0.0, new))
        if self.events > before:
            self.last_at = now
        return first


@dataclass
class Usage:
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    output_tokens: int | None = None
    rid: str | None = None
    itl_gaps: list[tuple[float, int]] = field(default_factory=list)  # SseObserver.gaps of a stream
    engine_meta: dict[str, Any] | None = None  # native `meta_info` (engine timings; router.observability)


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
            total.engine_meta = total.engine_meta or u.engine_meta
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
            engine_meta=meta,
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


def loads_or_none(b: bytes | None) -> Any:
    """The JSON value of `b`, or None when it is empty or not JSON (engine answers are read best-effort)."""
    if not b:
        return None
    try:
        return orjson.loads(b)
    except orjson.JSONDecodeError:
        return None

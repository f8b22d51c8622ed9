"""OpenTelemetry tracing: one span per request, with child spans for the routing decision and the
upstream exchange(s), exported to an OTLP/HTTP collector (`--otlp-traces-endpoint`).

Off by default; when off the proxy pays one `is None` test per request.
W3C trace context: a client's `traceparent` makes the request span its child (and its sampled flag is
followed); the engine gets the upstream span's `traceparent` (SGLang `--enable-trace` joins it), also
for unsampled requests (flag 00), so both sides agree on what is traced.

Why not opentelemetry-sdk's spans and exporter: measured on the router's hot path they cost ~1 ms of
CPU per request (live Span objects, attribute validation under locks, then a pure-Python protobuf
encoder), five times the router's whole per-request budget. Here a request carries only ids and its
`RequestPhases` stamps; its finished spans are built once as OTLP/JSON objects (the OTLP/HTTP JSON
encoding every OpenTelemetry collector accepts: ids in hex, enums as numbers), batched, serialised
with orjson and POSTed from the event loop. Bounded: past `max_queue` spans waiting (a collector
down), new spans are dropped and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Any

import orjson
from multidict import CIMultiDict

from kvroute.router.observability.phases import RequestPhases

log = logging.getLogger("kvroute.tracing")

_MASK64 = (1 << 64) - 1
# OTLP enums (opentelemetry/proto/trace/v1/trace.proto)
KIND_INTERNAL, KIND_SERVER, KIND_CLIENT = 1, 2, 3
STATUS_ERROR = 2


@dataclass(slots=True)
class TraceState:
    """A traced request's ids until its spans are built."""

    trace_id: int
    root_id: int
    parent_id: int | None  # the client's span, when it sent a traceparent
    sampled: bool
    tracestate: str | None
    upstream_id: int | None = None
    upstream_url: str = ""
    upstream_start: float = 0.0
    failed: list[tuple[int, str, float, float]] = field(default_factory=list)  # earlier attempts


def parse_traceparent(value: str) -> tuple[int, int, bool] | None:
    """(trace id, parent span id, sampled) of a W3C `traceparent`, None when malformed."""
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == "ff" or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3][:2], 16)
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, bool(flags & 1)


def _attrs(d: dict[str, str | int | float | bool]) -> list[dict[str, Any]]:
    out = []
    for k, v in d.items():
        if isinstance(v, bool):
            out.append({"key": k, "value": {"boolValue": v}})
        elif isinstance(v, int):
            out.append({"key": k, "value": {"intValue": v}})
        elif isinstance(v, float):
            out.append({"key": k, "value": {"doubleValue": v}})
        else:
            out.append({"key": k, "value": {"stringValue": str(v)}})
    return out


# OTLP/JSON span templates, filled with %-formatting (JSON's braces make str.format unreadable)
# (the fields and order of opentelemetry/proto/trace/v1/trace.proto's Span).
_ROUTE = (
    '{"traceId":"%s","spanId":"%016x","parentSpanId":"%s","name":"route","kind":1,'
    '"startTimeUnixNano":%d,"endTimeUnixNano":%d}'
)
_UP = (
    '{"traceId":"%s","spanId":"%016x","parentSpanId":"%s","name":"upstream","kind":3,'
    '"startTimeUnixNano":%d,"endTimeUnixNano":%d,"attributes":[%s]%s}'
)
_BODY = '{"resourceSpans":[{"resource":%s,"scopeSpans":[{"scope":{"name":"kvroute"},"spans":[%s]}]}]}'
_ROOT = (
    '{"traceId":"%s","spanId":"%s"%s,"name":%s,"kind":2,'
    '"startTimeUnixNano":%d,"endTimeUnixNano":%d,"attributes":[%s]%s}'
)


def _str_attr(key: str, value: str) -> str:
    return '{"key":"%s","value":{"stringValue":%s}}' % (key, orjson.dumps(value).decode())  # noqa: UP031 (JSON braces)


def _int_attr(key: str, value: int) -> str:
    return '{"key":"%s","value":{"intValue":%d}}' % (key, value)  # noqa: UP031 (JSON braces)


def _num_attr(key: str, value: float) -> str:
    return '{"key":"%s","value":{"doubleValue":%r}}' % (key, float(value))  # noqa: UP031 (JSON braces)


def _status(message: str) -> str:
    return ',"status":{"code":%d,"message":%s}' % (STATUS_ERROR, orjson.dumps(message).decode())  # noqa: UP031 (JSON braces)


_RETRIED = _status("attempt failed; retried on another worker")


class Tracing:
    """Trace ids for requests, their spans, and the batching OTLP/HTTP exporter.

    `sample_ratio`: fraction of new traces recorded (by trace id, as OpenTelemetry's TraceIdRatioBased);
    a client's traceparent decides for its trace. Export: a batch leaves when `batch_size` spans wait or
    `flush_interval_s` after the first of them; one POST at a time.
    """

    def __init__(
        self,
        endpoint: str,
        sample_ratio: float = 1.0,
        service_name: str = "kvroute",
        *,
        batch_size: int = 512,
        flush_interval_s: float = 1.0,
        max_queue: int = 8192,
        timeout_s: float = 10.0,
    ) -> None:
        self.endpoint = endpoint
        self._bound = round(min(max(sample_ratio, 0.0), 1.0) * (1 << 64))
        self._rand = random.Random(os.urandom(16))
        self._resource_json = orjson.dumps(
            {"attributes": _attrs({"service.name": service_name, "telemetry.sdk.name": "kvroute"})}
        ).decode()
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self._pending: list[str] = []  # encoded spans
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._session: Any = None
        self.exported = 0  # spans the collector accepted
        self.dropped = 0  # spans dropped: queue full or the collector refused them
        self._warned = False
        self._consts: dict[tuple[str, str | int], str] = {}
        self._route_names: dict[str, str] = {}

    # ---- request hooks -------------------------------------------------------------------------
    @staticmethod
    def _ns(ph: RequestPhases, perf: float) -> int:
        return int((ph.started_at + (perf - ph.t0)) * 1e9)

    def _id64(self) -> int:
        return self._rand.getrandbits(64) or 1

    def begin(self, ph: RequestPhases, incoming: Any) -> None:
        """Give the request its trace ids (the client's trace when it sent a valid traceparent)."""
        tp = incoming.get("traceparent")
        parsed = parse_traceparent(tp) if tp else None
        if parsed is not None:
            trace_id, parent, sampled = parsed
            state = incoming.get("tracestate")
        else:
            trace_id = self._rand.getrandbits(128) or 1
            parent, state = None, None
            sampled = (trace_id & _MASK64) < self._bound
        ph.span = TraceState(trace_id, self._id64(), parent, sampled, state)
        if sampled:
            ph.trace_id = f"{trace_id:032x}"

    def before_send(self, ph: RequestPhases, url: str, headers: CIMultiDict[str]) -> None:
        """A new upstream span for this attempt; its `traceparent` (and the client's `tracestate`) go
        on the engine request."""
        ts: TraceState | None = ph.span
        if ts is None:
            return
        assert ph.sent_at is not None
        if ts.upstream_id is not None:  # a failed earlier attempt
            ts.failed.append((ts.upstream_id, ts.upstream_url, ts.upstream_start, ph.sent_at))
        ts.upstream_id, ts.upstream_url, ts.upstream_start = self._id64(), url, ph.sent_at
        headers.popall("traceparent", None)
        headers.popall("tracestate", None)
        headers["traceparent"] = f"00-{ts.trace_id:032x}-{ts.upstream_id:016x}-{'01' if ts.sampled else '00'}"
        if ts.tracestate:
            headers["tracestate"] = ts.tracestate

    def _const(self, key: str, value: str | int) -> str:
        """An attribute whose values repeat (worker, policy, route, status): encoded once."""
        a = self._consts.get((key, value))
        if a is None:
            a = _int_attr(key, value) if isinstance(value, int) else _str_attr(key, value)
            if len(self._consts) < 4096:
                self._consts[(key, value)] = a
        return a

    def end(self, ph: RequestPhases) -> None:
        """Encode the request's spans (sampled requests only) and queue them for export.

        This runs on the event loop for every traced request, so the spans are written straight as
        OTLP/JSON text from fixed templates (no intermediate objects), with few attributes: the phase
        split is in the span timings and the ring, not repeated as attributes."""
        ts: TraceState | None = ph.span
        ph.span = None
        if ts is None or not ts.sampled:
            return
        if len(self._pending) >= self.max_queue:
            self.dropped += 2 + (ph.route_s is not None) + len(ts.failed)
            return
        trace = f"{ts.trace_id:032x}"
        root = f"{ts.root_id:016x}"
        ns = self._ns
        end = ns(ph, ph.end_at if ph.end_at is not None else ph.t0)
        failed = ph.error is not None or ph.status >= 500
        err = _status(ph.error or str(ph.status)) if failed else ""
        out = self._pending
        if ph.route_s is not None:
            start = ph.t0 + ph.admission_s
            out.append(_ROUTE % (trace, self._id64(), root, ns(ph, start), ns(ph, start + ph.route_s)))
        for span_id, url, t_start, t_stop in ts.failed:
            attrs = self._const("kvroute.worker", url)
            out.append(_UP % (trace, span_id, root, ns(ph, t_start), ns(ph, t_stop), attrs, _RETRIED))
        if ts.upstream_id is not None:
            attrs = self._const("kvroute.worker", ts.upstream_url)
            if ph.engine_queue_s is not None:
                attrs += "," + _num_attr("kvroute.engine.queue_s", ph.engine_queue_s)
            if ph.engine_prefill_s is not None:
                attrs += "," + _num_attr("kvroute.engine.prefill_s", ph.engine_prefill_s)
            out.append(_UP % (trace, ts.upstream_id, root, ns(ph, ts.upstream_start), end, attrs, err))
        parts = [
            self._const("http.response.status_code", ph.status),
            self._const("kvroute.worker", ph.worker),
            self._const("kvroute.policy", ph.policy),
            _str_attr("kvroute.request_id", ph.rid),
            _str_attr("kvroute.decision_reason", ph.reason),
        ]
        if ph.cached_tokens is not None:
            parts.append(_int_attr("kvroute.cached_tokens", ph.cached_tokens))
        if ph.prompt_tokens is not None:
            parts.append(_int_attr("kvroute.prompt_tokens", ph.prompt_tokens))
        ttft = ph.ttft_s
        if ttft is not None:
            parts.append(_num_attr("kvroute.ttft_s", ttft))
        if failed:
            parts.append(_str_attr("kvroute.error", ph.error or str(ph.status)))
        name = self._route_names.get(ph.route)
        if name is None:
            name = self._route_names[ph.route] = orjson.dumps(f"POST {ph.route}").decode()
        parent = f',"parentSpanId":"{ts.parent_id:016x}"' if ts.parent_id is not None else ""
        out.append(_ROOT % (trace, root, parent, name, ns(ph, ph.t0), end, ",".join(parts), err))
        self._schedule()

    # ---- export ------------------------------------------------------------------------------------
    def _schedule(self) -> None:
        if self._task is not None and not self._task.done():
            return  # the running export takes the next batch when it ends
        if len(self._pending) >= self.batch_size:
            self._start_export()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._timer = loop.call_later(self.flush_interval_s, self._start_export)

    def _start_export(self) -> None:
        self._timer = None
        if self._pending and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._export_loop(), name="otlp-export")

    def body(self, spans: list[str]) -> bytes:
        """An OTLP/HTTP JSON ExportTraceServiceRequest of encoded spans."""
        return (_BODY % (self._resource_json, ",".join(spans))).encode()

    async def _export_loop(self, drain: bool = False) -> None:
        """POST batches while a whole one waits (everything when `drain`); a remainder waits for the
        timer."""
        import aiohttp

        while self._pending:
            batch, self._pending = self._pending[: self.batch_size], self._pending[self.batch_size :]
            if self._session is None:
                self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
            try:
                async with self._session.post(
                    self.endpoint, data=self.body(batch), headers={"Content-Type": "application/json"}
                ) as resp:
                    await resp.read()
                    ok = resp.status < 300
                    why = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                ok, why = False, f"{type(exc).__name__}: {exc}"
            if ok:
                self.exported += len(batch)
                self._warned = False
            else:
                self.dropped += len(batch)
                if not self._warned:  # once per outage
                    log.warning(
                        "OTLP export to %s failed (%s); spans dropped until it recovers", self.endpoint, why
                    )
                    self._warned = True
            if not drain and len(self._pending) < self.batch_size:
                break
        if self._pending and self._timer is None and not drain:
            self._timer = asyncio.get_running_loop().call_later(self.flush_interval_s, self._start_export)

    async def aclose(self) -> None:
        """Export what is left (bounded by the timeout), then close the client session."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
        if self._pending:
            with contextlib.suppress(Exception):
                await self._export_loop(drain=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

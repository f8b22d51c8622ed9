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

from router.observability.phases import RequestPhases

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
        self._resource = {
            "attributes": _attrs({"service.name": service_name, "telemetry.sdk.name": "kvroute"})
        }
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self._pending: list[dict[str, Any]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._session: Any = None
        self.exported = 0  # spans the collector accepted
        self.dropped = 0  # spans dropped: queue full or the collector refused them
        self._warned = False
        self._consts: dict[tuple[str, str | int], dict[str, Any]] = {}
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

    def _const(self, key: str, value: str | int) -> dict[str, Any]:
        """An attribute whose values repeat (worker, policy, route, status): built once, shared."""
        a = self._consts.get((key, value))
        if a is None:
            kind = "intValue" if isinstance(value, int) else "stringValue"
            a = {"key": key, "value": {kind: value}}
            if len(self._consts) < 4096:
                self._consts[(key, value)] = a
        return a

    def end(self, ph: RequestPhases) -> None:
        """Build the request's spans (sampled requests only) and queue them for export.

        Few attributes, built directly in OTLP/JSON form: this runs on the event loop per traced
        request (the phase split is in the span timings and the ring, not repeated as attributes)."""
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
        spans = self._pending
        if ph.route_s is not None:
            start = ph.t0 + ph.admission_s
            spans.append(
                {
                    "traceId": trace,
                    "spanId": f"{self._id64():016x}",
                    "parentSpanId": root,
                    "name": "route",
                    "kind": KIND_INTERNAL,
                    "startTimeUnixNano": ns(ph, start),
                    "endTimeUnixNano": ns(ph, start + ph.route_s),
                }
            )
        for span_id, url, start, stop in ts.failed:
            spans.append(
                {
                    "traceId": trace,
                    "spanId": f"{span_id:016x}",
                    "parentSpanId": root,
                    "name": "upstream",
                    "kind": KIND_CLIENT,
                    "startTimeUnixNano": ns(ph, start),
                    "endTimeUnixNano": ns(ph, stop),
                    "attributes": [self._const("kvroute.worker", url)],
                    "status": {"code": STATUS_ERROR, "message": "attempt failed; retried on another worker"},
                }
            )
        if ts.upstream_id is not None:
            up: list[dict[str, Any]] = [self._const("kvroute.worker", ts.upstream_url)]
            if ph.engine_queue_s is not None:
                up.append({"key": "kvroute.engine.queue_s", "value": {"doubleValue": ph.engine_queue_s}})
            if ph.engine_prefill_s is not None:
                up.append({"key": "kvroute.engine.prefill_s", "value": {"doubleValue": ph.engine_prefill_s}})
            span: dict[str, Any] = {
                "traceId": trace,
                "spanId": f"{ts.upstream_id:016x}",
                "parentSpanId": root,
                "name": "upstream",
                "kind": KIND_CLIENT,
                "startTimeUnixNano": ns(ph, ts.upstream_start),
                "endTimeUnixNano": end,
                "attributes": up,
            }
            if failed:
                span["status"] = {"code": STATUS_ERROR, "message": ph.error or str(ph.status)}
            spans.append(span)
        attrs = [
            self._const("http.response.status_code", ph.status),
            self._const("kvroute.worker", ph.worker),
            self._const("kvroute.policy", ph.policy),
            {"key": "kvroute.request_id", "value": {"stringValue": ph.rid}},
            {"key": "kvroute.decision_reason", "value": {"stringValue": ph.reason}},
        ]
        if ph.cached_tokens is not None:
            attrs.append({"key": "kvroute.cached_tokens", "value": {"intValue": ph.cached_tokens}})
        if ph.prompt_tokens is not None:
            attrs.append({"key": "kvroute.prompt_tokens", "value": {"intValue": ph.prompt_tokens}})
        ttft = ph.ttft_s
        if ttft is not None:
            attrs.append({"key": "kvroute.ttft_s", "value": {"doubleValue": ttft}})
        span = {
            "traceId": trace,
            "spanId": root,
            "name": self._route_names.get(ph.route)
            or self._route_names.setdefault(ph.route, f"POST {ph.route}"),
            "kind": KIND_SERVER,
            "startTimeUnixNano": ns(ph, ph.t0),
            "endTimeUnixNano": end,
            "attributes": attrs,
        }
        if ts.parent_id is not None:
            span["parentSpanId"] = f"{ts.parent_id:016x}"
        if failed:
            span["status"] = {"code": STATUS_ERROR, "message": ph.error or str(ph.status)}
            attrs.append({"key": "kvroute.error", "value": {"stringValue": ph.error or str(ph.status)}})
        spans.append(span)
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

    def body(self, spans: list[dict[str, Any]]) -> bytes:
        """An OTLP/HTTP JSON ExportTraceServiceRequest."""
        return orjson.dumps(
            {
                "resourceSpans": [
                    {
                        "resource": self._resource,
                        "scopeSpans": [{"scope": {"name": "kvroute"}, "spans": spans}],
                    }
                ]
            }
        )

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

"""OpenTelemetry tracing (optional extra `kvroute[tracing]`): one span per request, with child spans for
the routing decision and the upstream exchange, exported over OTLP/HTTP.

Off by default; when off nothing here is imported and the proxy pays one `is None` test per request.
The upstream span's W3C `traceparent` goes to the engine (SGLang `--enable-trace` joins it), and a
client's own `traceparent` becomes the request span's parent. Spans are built from the request's
`RequestPhases` stamps: the routing span is recorded at the end with its real start and end times.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from multidict import CIMultiDict

from router.config import ConfigError
from router.observability.phases import RequestPhases


class TracingUnavailable(ConfigError):
    """Tracing was asked for but opentelemetry-sdk / the OTLP exporter are not installed."""


@dataclass(slots=True)
class _Spans:
    root: Any
    upstream: Any = None


class Tracing:
    """A tracer provider of its own (never the process-global one: tests run many apps in one process).

    `exporter`: a SpanExporter to use instead of OTLP (tests pass an in-memory one; spans are then
    exported synchronously).
    """

    def __init__(
        self,
        endpoint: str | None,
        sample_ratio: float = 1.0,
        service_name: str = "kvroute",
        exporter: Any = None,
    ) -> None:
        try:
            from opentelemetry import trace
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
            from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError as exc:
            raise TracingUnavailable(
                "tracing needs opentelemetry-sdk and opentelemetry-exporter-otlp-proto-http "
                "(pip install 'kvroute[tracing]')"
            ) from exc
        self._trace = trace
        self._propagator = TraceContextTextMapPropagator()
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": service_name}),
            sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
        )
        if exporter is None:
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            except ImportError as exc:
                raise TracingUnavailable(
                    "tracing needs opentelemetry-exporter-otlp-proto-http (pip install 'kvroute[tracing]')"
                ) from exc
            self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        else:
            self.provider.add_span_processor(SimpleSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("kvroute")
        self._server = trace.SpanKind.SERVER
        self._client = trace.SpanKind.CLIENT

    @staticmethod
    def _ns(ph: RequestPhases, perf: float) -> int:
        return int((ph.started_at + (perf - ph.t0)) * 1e9)

    def begin(self, ph: RequestPhases, incoming: Any) -> None:
        """Open the request span (child of the client's `traceparent`, if it sent one)."""
        parent = self._propagator.extract(carrier=incoming) if "traceparent" in incoming else None
        root = self.tracer.start_span(
            f"POST {ph.route}", context=parent, kind=self._server, start_time=self._ns(ph, ph.t0)
        )
        ctx = root.get_span_context()
        if ctx.trace_flags.sampled:
            ph.trace_id = f"{ctx.trace_id:032x}"
        ph.span = _Spans(root)

    def before_send(self, ph: RequestPhases, url: str, headers: CIMultiDict[str]) -> None:
        """Open the upstream span for this attempt and put its `traceparent` on the engine request."""
        spans: _Spans | None = ph.span
        if spans is None:
            return
        if spans.upstream is not None:  # a failed earlier attempt
            spans.upstream.set_status(self._trace.Status(self._trace.StatusCode.ERROR, "retried"))
            spans.upstream.end()
        ctx = self._trace.set_span_in_context(spans.root)
        assert ph.sent_at is not None
        up = self.tracer.start_span(
            "upstream", context=ctx, kind=self._client, start_time=self._ns(ph, ph.sent_at)
        )
        up.set_attribute("kvroute.worker", url)
        spans.upstream = up
        for k in ("traceparent", "tracestate"):
            headers.popall(k, None)
        self._propagator.inject(headers, context=self._trace.set_span_in_context(up))

    def end(self, ph: RequestPhases) -> None:
        """Record the routing span and close the upstream and request spans with their attributes."""
        spans: _Spans | None = ph.span
        if spans is None:
            return
        ph.span = None
        root = spans.root
        end = ph.end_at if ph.end_at is not None else ph.t0
        if ph.route_s is not None:
            start = ph.t0 + ph.admission_s
            route = self.tracer.start_span(
                "route",
                context=self._trace.set_span_in_context(root),
                start_time=self._ns(ph, start),
            )
            route.set_attribute("kvroute.policy", ph.policy)
            route.set_attribute("kvroute.reason", ph.reason)
            route.end(end_time=self._ns(ph, start + ph.route_s))
        if spans.upstream is not None:
            up = spans.upstream
            for key, v in (
                ("kvroute.engine.queue_s", ph.engine_queue_s),
                ("kvroute.engine.prefill_s", ph.engine_prefill_s),
                ("kvroute.first_byte_s", ph.first_byte_s),
            ):
                if v is not None:
                    up.set_attribute(key, v)
            up.end(end_time=self._ns(ph, end))
        attrs: dict[str, Any] = {
            "kvroute.request_id": ph.rid,
            "kvroute.worker": ph.worker,
            "kvroute.policy": ph.policy,
            "kvroute.decision_reason": ph.reason,
            "kvroute.cached_blocks_predicted": ph.cached_blocks_predicted,
            "kvroute.attempts": ph.attempts,
            "http.response.status_code": ph.status,
        }
        for key, v in (
            ("kvroute.cached_tokens", ph.cached_tokens),
            ("kvroute.prompt_tokens", ph.prompt_tokens),
            ("kvroute.output_tokens", ph.output_tokens),
            ("kvroute.ttft_s", ph.ttft_s),
        ):
            if v is not None:
                attrs[key] = v
        for k, v in (ph.ttft_breakdown() or {}).items():
            attrs[f"kvroute.ttft.{k}_s"] = v
        root.set_attributes(attrs)
        if ph.error is not None or ph.status >= 500:
            root.set_status(self._trace.Status(self._trace.StatusCode.ERROR, ph.error or str(ph.status)))
        root.end(end_time=self._ns(ph, end))

    def shutdown(self) -> None:
        self.provider.shutdown()

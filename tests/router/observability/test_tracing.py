"""Tracing: the request span with its routing and upstream children, W3C traceparent propagated to the
engine and continued from the client, sampling, and export to an OTLP/HTTP collector on loopback (the
body checked against OpenTelemetry's own OTLP protobuf schema)."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web

from kvroute.router.app import OBSERVABILITY
from kvroute.router.observability.tracing import parse_traceparent
from tests.router.conftest import wait_until

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


class Collector:
    """An OTLP/HTTP traces endpoint: keeps every POSTed body; `status` is what it answers."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.status = 200
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/json"
        self.bodies.append(orjson.loads(await request.read()))
        return web.Response(status=self.status, body=b"{}", content_type="application/json")

    def spans(self) -> list[dict[str, Any]]:
        return [
            s
            for b in self.bodies
            for rs in b["resourceSpans"]
            for ss in rs["scopeSpans"]
            for s in ss["spans"]
        ]


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    c = Collector()
    app = web.Application()
    app.router.add_post("/v1/traces", c.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    c.url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/traces"
    yield c
    await runner.cleanup()


def _attrs(span: dict[str, Any]) -> dict[str, Any]:
    return {a["key"]: next(iter(a["value"].values())) for a in span["attributes"]}


def test_parse_traceparent() -> None:
    assert parse_traceparent(f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01") == (
        int(CLIENT_TRACE, 16),
        int(CLIENT_SPAN, 16),
        True,
    )
    assert parse_traceparent(f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00")[2] is False  # type: ignore[index]
    for bad in (
        "",
        "00-xyz-abc-01",
        f"ff-{CLIENT_TRACE}-{CLIENT_SPAN}-01",
        f"00-{'0' * 32}-{CLIENT_SPAN}-01",
    ):
        assert parse_traceparent(bad) is None


async def test_spans_traceparent_and_otlp_export(engines, start_router, collector) -> None:  # type: ignore[no-untyped-def]
    eng = await engines(cached_tokens=7)
    r = await start_router(worker_urls=(eng.url,), otlp_traces_endpoint=collector.url)
    await r.wait_healthy(1)
    body = {"text": "hello", "sampling_params": {"max_new_tokens": 4}, "stream": True}
    headers = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01", "tracestate": "vendor=x"}
    async with r.session.post(r.url + "/generate", json=body, headers=headers) as resp:
        assert resp.status == 200
        await resp.read()
    async with r.session.post(r.url + "/generate", json={"text": "no parent"}) as resp:
        assert resp.status == 200
    await wait_until(lambda: len(collector.spans()) == 6, timeout=10, what="6 spans exported")

    spans = collector.spans()
    ours = [s for s in spans if s["traceId"] == CLIENT_TRACE]
    by_name = {s["name"]: s for s in ours}
    assert set(by_name) == {"POST /generate", "route", "upstream"}
    root, route, up = by_name["POST /generate"], by_name["route"], by_name["upstream"]
    assert (root["kind"], route["kind"], up["kind"]) == (2, 1, 3)  # SERVER, INTERNAL, CLIENT
    assert root["parentSpanId"] == CLIENT_SPAN  # continues the client's trace
    assert route["parentSpanId"] == root["spanId"] and up["parentSpanId"] == root["spanId"]
    a = _attrs(root)
    assert a["kvroute.worker"] == eng.url and a["kvroute.cached_tokens"] == 7 and a["kvroute.decision_reason"]
    assert a["http.response.status_code"] == 200
    t = [int(x) for x in (root["startTimeUnixNano"], route["startTimeUnixNano"], route["endTimeUnixNano"],
                          up["startTimeUnixNano"], up["endTimeUnixNano"])]  # fmt: skip
    assert t == sorted(t) and int(root["endTimeUnixNano"]) >= t[-1]
    # The engine got the upstream span's context (and the client's tracestate), not the client's span.
    assert eng.seen[0].headers["traceparent"] == f"00-{CLIENT_TRACE}-{up['spanId']}-01"
    assert eng.seen[0].headers["tracestate"] == "vendor=x"
    other = [s for s in spans if s["traceId"] != CLIENT_TRACE]
    assert len({s["traceId"] for s in other}) == 1 and all(
        "parentSpanId" not in s for s in other if s["name"].startswith("POST")
    )
    async with r.session.get(r.url + "/admin/requests/recent") as resp:
        recent = (await resp.json())["requests"]
    assert recent[1]["trace_id"] == CLIENT_TRACE and recent[0]["trace_id"] == other[0]["traceId"]

    # The body is a valid OTLP ExportTraceServiceRequest (OTLP/JSON's hex ids -> proto3 JSON's base64).
    trace_pb2 = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")
    json_format = pytest.importorskip("google.protobuf.json_format")
    doc = collector.bodies[0]
    for s in doc["resourceSpans"][0]["scopeSpans"][0]["spans"]:
        for k in ("traceId", "spanId", "parentSpanId"):
            if k in s:
                s[k] = base64.b64encode(bytes.fromhex(s[k])).decode()
    msg = json_format.ParseDict(doc, trace_pb2.ExportTraceServiceRequest())
    assert msg.resource_spans[0].scope_spans[0].spans[0].trace_id.hex() in (CLIENT_TRACE, other[0]["traceId"])


async def test_unsampled_requests_still_propagate_and_export_nothing(
    engines, start_router, collector
) -> None:  # type: ignore[no-untyped-def]
    eng = await engines()
    r = await start_router(worker_urls=(eng.url,), otlp_traces_endpoint=collector.url, trace_sample_ratio=0.0)
    await r.wait_healthy(1)
    async with r.session.post(r.url + "/generate", json={"text": "hi"}) as resp:
        assert resp.status == 200
    sent = parse_traceparent(eng.seen[0].headers["traceparent"])
    assert sent is not None and sent[2] is False  # flag 00: the engine does not trace it either
    tracing = r.app[OBSERVABILITY].tracing
    assert tracing is not None
    await tracing.aclose()
    assert collector.bodies == [] and tracing.exported == 0


async def test_collector_down_drops_spans_never_requests(engines, start_router, collector) -> None:  # type: ignore[no-untyped-def]
    collector.status = 503
    eng = await engines()
    r = await start_router(worker_urls=(eng.url,), otlp_traces_endpoint=collector.url)
    await r.wait_healthy(1)
    for _ in range(3):
        async with r.session.post(r.url + "/generate", json={"text": "hi"}) as resp:
            assert resp.status == 200
    tracing = r.app[OBSERVABILITY].tracing
    assert tracing is not None
    await tracing.aclose()
    assert tracing.dropped == 9 and tracing.exported == 0 and collector.bodies


async def test_tracing_off_sends_the_clients_headers_unchanged(engines, start_router) -> None:  # type: ignore[no-untyped-def]
    eng = await engines()
    r = await start_router(worker_urls=(eng.url,))
    await r.wait_healthy(1)
    assert r.app[OBSERVABILITY].tracing is None  # off by default
    tp = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    async with r.session.post(r.url + "/generate", json={"text": "hi"}, headers={"traceparent": tp}) as resp:
        assert resp.status == 200
    assert eng.seen[-1].headers["traceparent"] == tp  # an end-to-end header, forwarded as is

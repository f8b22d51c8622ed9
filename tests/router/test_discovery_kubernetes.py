"""Kubernetes discovery against Kubernetes API responses (tests/router/data/k8s_api.json) served on loopback
by a small API server stand-in; there is no cluster here. The client is the real kubernetes_asyncio."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from kvroute.engines.sim.fleet import free_port
from kvroute.router.app import DISCOVERY_SOURCE, create_app
from kvroute.router.discovery.base import Snapshot
from kvroute.router.discovery.kubernetes import KubernetesSource
from kvroute.router.types import WorkerRole
from tests.router.conftest import RunningRouter, sse_data, test_config, wait_until

pytest.importorskip("kubernetes_asyncio")
from kubernetes_asyncio import client  # noqa: E402

RECORDED = json.loads((Path(__file__).parent / "data" / "k8s_api.json").read_text())


@dataclass
class FakeApiServer:
    """Serves recorded PodLists (in order, the last one repeated) and watch streams whose events the test
    releases one by one (`step`); a 403 Status while `forbidden` is set."""

    scenarios: dict[str, str]  # label selector -> scenario name in RECORDED
    requests: list[dict[str, str]] = field(default_factory=list)
    released: dict[str, asyncio.Queue[Any]] = field(default_factory=dict)
    lists_served: dict[str, int] = field(default_factory=dict)
    forbidden: bool = False
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> FakeApiServer:
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self.pods)
        app.router.add_get("/api/v1/pods", self.pods)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self

    def step(self, selector: str, n: int = 1) -> None:
        """Release the next `n` recorded watch events of that selector's stream."""
        events = RECORDED[self.scenarios[selector]]["watch"]
        q = self.released.setdefault(selector, asyncio.Queue())
        for _ in range(n):
            q.put_nowait(events[self._next_event(selector)])

    def _next_event(self, selector: str) -> int:
        i = self.lists_served.get("_event:" + selector, 0)
        self.lists_served["_event:" + selector] = i + 1
        return i

    async def pods(self, request: web.Request) -> web.StreamResponse:
        q = dict(request.query)
        q["path"] = request.path
        self.requests.append(q)
        if self.forbidden:
            return web.json_response(RECORDED["forbidden"], status=403)
        selector = q.get("labelSelector", "")
        scenario = RECORDED[self.scenarios[selector]]
        if q.get("watch", "").lower() != "true":
            n = self.lists_served.get(selector, 0)
            self.lists_served[selector] = n + 1
            return web.json_response(scenario["lists"][min(n, len(scenario["lists"]) - 1)])
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        queue = self.released.setdefault(selector, asyncio.Queue())
        while True:
            event = await queue.get()
            await resp.write(orjson.dumps(event) + b"\n")
            if event["type"] == "ERROR":
                break
        await resp.write_eof()
        return resp

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def api_server() -> AsyncIterator[Any]:
    servers: list[FakeApiServer] = []

    async def make(scenarios: dict[str, str]) -> FakeApiServer:
        s = await FakeApiServer(scenarios).start()
        servers.append(s)
        return s

    yield make
    for s in servers:
        await s.close()


class RecordingSink:
    def __init__(self) -> None:
        self.snapshots: list[Snapshot] = []
        self.errors: list[str] = []

    def publish(self, workers: Snapshot) -> None:
        self.snapshots.append(dict(workers))

    def error(self, message: str) -> None:
        self.errors.append(message)


def source_for(server: FakeApiServer, selectors: list[tuple[WorkerRole, str]], port: int) -> KubernetesSource:
    return KubernetesSource(
        selectors,
        port=port,
        namespace="inference",
        configuration=client.Configuration(host=server.url),
        backoff_s=(0.01, 0.05),
    )


async def test_pd_selectors_roles_bootstrap_annotation_and_api_errors(api_server) -> None:
    server = await api_server({"app=sglang,role=prefill": "prefill", "app=sglang,role=decode": "decode"})
    src = source_for(
        server,
        [(WorkerRole.PREFILL, "app=sglang,role=prefill"), (WorkerRole.DECODE, "app=sglang,role=decode")],
        30000,
    )
    sink = RecordingSink()
    task = asyncio.create_task(src.run(sink))
    try:
        await wait_until(lambda: bool(sink.snapshots) and len(sink.snapshots[-1]) == 3, what="3 pods")
        snap = sink.snapshots[-1]
        assert snap["http://127.0.0.4:30000"].role is WorkerRole.PREFILL
        assert snap["http://127.0.0.4:30000"].bootstrap_port == 8998  # from sglang.ai/bootstrap-port
        assert snap["http://127.0.0.5:30000"].bootstrap_port is None  # unparsable: /server_info's is used
        assert snap["http://127.0.0.6:30000"].role is WorkerRole.DECODE
        assert snap["http://127.0.0.6:30000"].bootstrap_port is None  # only prefill pods have one
        lists = [r for r in server.requests if r.get("watch", "").lower() != "true"]
        assert {r["labelSelector"] for r in lists} == {"app=sglang,role=prefill", "app=sglang,role=decode"}
        assert all(r["path"] == "/api/v1/namespaces/inference/pods" for r in server.requests)
        await wait_until(
            lambda: any(r.get("watch", "").lower() == "true" for r in server.requests), what="watch"
        )
        watch = next(r for r in server.requests if r.get("watch", "").lower() == "true")
        assert watch["resourceVersion"] == "2000" and "timeoutSeconds" in watch
        assert not sink.errors
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_forbidden_is_reported_and_retried(api_server) -> None:
    server = await api_server({"app=sglang-worker": "regular"})
    server.forbidden = True
    sink = RecordingSink()
    task = asyncio.create_task(
        source_for(server, [(WorkerRole.REGULAR, "app=sglang-worker")], 30000).run(sink)
    )
    try:
        await wait_until(lambda: len(sink.errors) >= 2, what="two failed lists")
        assert "Kubernetes API 403 Forbidden" in sink.errors[0] and not sink.snapshots
        server.forbidden = False
        await wait_until(lambda: bool(sink.snapshots), what="a list after RBAC was fixed")
        assert list(sink.snapshots[-1]) == ["http://127.0.0.2:30000"]  # pending pod-9 is not a worker
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.slow
async def test_pods_appear_and_vanish_while_requests_stream(api_server, engines) -> None:
    """Recorded watch: pod-1 is added (pending, then ready), pod-0 terminates while a request streams
    from it (drained, its stream finishes, then removed), then a 410 relists."""
    port = free_port()
    pod0 = await engines(host="127.0.0.2", port=port, mode="slow_stream")
    pod1 = await engines(host="127.0.0.3", port=port)
    server = await api_server({"app=sglang-worker": "regular"})
    config = test_config(
        service_discovery=True,
        selector="app=sglang-worker",
        service_discovery_namespace="inference",
        service_discovery_port=port,
    )
    app = create_app(config)
    assert isinstance(app[DISCOVERY_SOURCE], KubernetesSource)  # what the flags build; pointed at our server:
    app[DISCOVERY_SOURCE] = source_for(server, [(WorkerRole.REGULAR, "app=sglang-worker")], port)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, rport = runner.addresses[0][:2]
    r = RunningRouter(f"http://{host}:{rport}", app, aiohttp.ClientSession())
    try:
        await _pods_appear_and_vanish(r, server, pod0, pod1)
    finally:
        await r.session.close()
        await runner.cleanup()


async def _pods_appear_and_vanish(r: RunningRouter, server: FakeApiServer, pod0: Any, pod1: Any) -> None:
    await r.wait_healthy(1)
    assert r.registry.urls() == [pod0.url]

    async def stream() -> tuple[str, list[bytes]]:
        body = {"text": "hi", "stream": True}
        async with r.session.post(r.url + "/generate", json=body) as resp:
            return resp.headers["X-Kvroute-Worker"], sse_data(await resp.read())

    streaming = asyncio.create_task(stream())
    await wait_until(lambda: r.core.load.open_tickets(pod0.url) == 1, what="a stream on pod-0")
    server.step("app=sglang-worker", 2)  # pod-1 ADDED (pending), MODIFIED (IP, not ready): not a worker
    await wait_until(lambda: server.released["app=sglang-worker"].empty(), what="events consumed")
    assert pod1.url not in r.registry.urls()
    server.step("app=sglang-worker", 2)  # pod-1 Ready, a bookmark
    await wait_until(lambda: pod1.url in r.registry.healthy_urls(), what="pod-1 registered")
    server.step("app=sglang-worker")  # pod-0 terminating (deletionTimestamp)
    await wait_until(lambda: r.registry.describe(pod0.url)["state"] == "draining", what="pod-0 draining")
    worker, events = await stream()
    assert worker == pod1.url and events[-1] == b"[DONE]"
    server.step("app=sglang-worker")  # pod-0 DELETED: still in flight, still registered
    await wait_until(lambda: server.released["app=sglang-worker"].empty(), what="events consumed")
    assert pod0.url in r.registry.urls()
    for _ in range(pod0.chunks):
        pod0.gate.put_nowait(None)
    worker, events = await streaming
    assert worker == pod0.url and len(events) == pod0.chunks + 1 and events[-1] == b"[DONE]"
    await wait_until(lambda: pod0.url not in r.registry.urls(), what="pod-0 removed once idle")

    server.step("app=sglang-worker")  # 410 Gone: the source lists again (second recorded list)
    await wait_until(lambda: server.lists_served["app=sglang-worker"] == 2, what="a relist")
    watches = [q for q in server.requests if q.get("watch", "").lower() == "true"]
    assert watches[0]["resourceVersion"] == "1000" and watches[-1]["resourceVersion"] == "1200"
    assert r.registry.urls() == [pod1.url]

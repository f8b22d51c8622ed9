"""The Kubernetes scaler against Kubernetes API responses served on loopback (no cluster here): reads and
sets the Deployments' scale subresource with the resourceVersion it read, marks drained pods for
deletion first, and turns 409/5xx into ScalerErrors the loop retries with backoff."""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from kvroute.router.autoscale.base import ScaleRequest, ScalerError
from kvroute.router.autoscale.decide import DecisionRules, PoolLimits
from kvroute.router.autoscale.kubernetes import DELETION_COST, KubernetesScaler
from kvroute.router.autoscale.loop import Autoscaler, AutoscaleSettings
from kvroute.router.planner import ObservedLoad
from kvroute.router.types import WorkerRole
from tests.router.test_autoscale import PROFILE, Clock, FakeRegistry, FakeWindow

kubernetes_asyncio = pytest.importorskip("kubernetes_asyncio")

DATA = Path(__file__).parent / "data" / "k8s"
NS = "llm"
DEPLOY = {WorkerRole.PREFILL: "sglang-prefill", WorkerRole.DECODE: "sglang-decode"}


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DATA / name).read_text())
    return data


@dataclass
class FakeApiServer:
    """Answers the four calls the scaler makes; `put_status` scripts the next PUT answers."""

    scales: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {
            "sglang-prefill": _load("scale_prefill.json"),
            "sglang-decode": _load("scale_decode.json"),
        }
    )
    put_status: list[int] = field(default_factory=list)
    puts: list[dict[str, Any]] = field(default_factory=list)
    patches: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    selectors: list[str] = field(default_factory=list)
    url: str = ""

    async def get_scale(self, request: web.Request) -> web.Response:
        assert request.match_info["ns"] == NS
        return web.json_response(self.scales[request.match_info["name"]])

    async def put_scale(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.puts.append(body)
        status = self.put_status.pop(0) if self.put_status else 200
        if status == 409:
            return web.json_response(_load("conflict_409.json"), status=409)
        if status >= 500:
            return web.json_response(_load("unavailable_503.json"), status=status)
        cur = self.scales[request.match_info["name"]]
        if body["metadata"]["resourceVersion"] != cur["metadata"]["resourceVersion"]:
            return web.json_response(_load("conflict_409.json"), status=409)
        new = copy.deepcopy(cur)
        new["spec"]["replicas"] = body["spec"]["replicas"]
        new["metadata"]["resourceVersion"] = str(int(cur["metadata"]["resourceVersion"]) + 1)
        self.scales[request.match_info["name"]] = new
        return web.json_response(new)

    async def list_pods(self, request: web.Request) -> web.Response:
        self.selectors.append(request.query.get("labelSelector", ""))
        return web.json_response(_load("pods_decode.json"))

    async def patch_pod(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.patches.append((request.match_info["name"], body))
        pod = next(
            p
            for p in _load("pods_decode.json")["items"]
            if p["metadata"]["name"] == request.match_info["name"]
        )
        pod["metadata"]["annotations"].update(body["metadata"]["annotations"])
        return web.json_response({"kind": "Pod", "apiVersion": "v1", **pod})


@pytest.fixture
async def api() -> AsyncIterator[tuple[FakeApiServer, Any]]:
    from kubernetes_asyncio import client

    srv = FakeApiServer()
    app = web.Application()
    base = "/apis/apps/v1/namespaces/{ns}/deployments/{name}/scale"
    app.router.add_get(base, srv.get_scale)
    app.router.add_put(base, srv.put_scale)
    app.router.add_get("/api/v1/namespaces/{ns}/pods", srv.list_pods)
    app.router.add_patch("/api/v1/namespaces/{ns}/pods/{name}", srv.patch_pod)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    srv.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    conf = client.Configuration(host=srv.url)
    api_client = client.ApiClient(conf)
    try:
        yield srv, api_client
    finally:
        await api_client.close()
        await runner.cleanup()


async def test_sizes_and_scale_up_write_replicas_with_the_version_read(api: Any) -> None:
    srv, c = api
    s = KubernetesScaler(NS, DEPLOY, api_client=c)
    assert await s.sizes() == {WorkerRole.PREFILL: 3, WorkerRole.DECODE: 2}
    assert await s.scale(ScaleRequest(WorkerRole.DECODE, 2, 4, reason="plan wants 4")) == []
    assert srv.puts[-1]["spec"]["replicas"] == 4
    assert srv.puts[-1]["metadata"]["resourceVersion"] == "918273"  # optimistic concurrency
    assert srv.patches == []  # a scale-up marks no pod
    assert (await s.sizes())[WorkerRole.DECODE] == 4


async def test_scale_down_marks_the_drained_pod_before_lowering_replicas(api: Any) -> None:
    srv, c = api
    s = KubernetesScaler(NS, DEPLOY, api_client=c)
    await s.scale(ScaleRequest(WorkerRole.DECODE, 2, 1, remove=("http://10.42.2.9:30000",)))
    assert srv.selectors == ["app.kubernetes.io/name=sglang,kvroute.io/pool=decode"]
    assert srv.patches == [
        ("sglang-decode-7d9f8c6b5-p9w4d", {"metadata": {"annotations": {DELETION_COST: "-1000"}}})
    ]
    assert srv.puts[-1]["spec"]["replicas"] == 1


async def test_a_drained_worker_without_a_pod_stops_the_scale_down(api: Any) -> None:
    srv, c = api
    s = KubernetesScaler(NS, DEPLOY, api_client=c)
    with pytest.raises(ScalerError, match="found 0 of the 1"):
        await s.scale(ScaleRequest(WorkerRole.DECODE, 2, 1, remove=("http://10.42.9.9:30000",)))
    assert srv.puts == []  # Kubernetes would have picked a pod itself: nothing written


@pytest.mark.parametrize("status, text", [(409, "HTTP 409 conflict"), (503, "HTTP 503")])
async def test_conflict_and_server_errors_are_retryable_scaler_errors(
    api: Any, status: int, text: str
) -> None:
    srv, c = api
    srv.put_status = [status]
    s = KubernetesScaler(NS, DEPLOY, api_client=c)
    with pytest.raises(ScalerError, match=text) as info:
        await s.scale(ScaleRequest(WorkerRole.DECODE, 2, 3))
    assert info.value.retryable


async def test_the_loop_retries_a_failing_kubernetes_scaler_with_backoff(api: Any) -> None:
    """409 then 503 from the API server: two reported failures, growing waits, then the scale lands."""
    srv, c = api
    srv.put_status = [409, 503]
    scaler = KubernetesScaler(
        NS, {WorkerRole.DECODE: "sglang-decode", WorkerRole.PREFILL: "sglang-prefill"}, c
    )
    reg, clock = FakeRegistry(), Clock()
    for i in range(3):
        reg.add(f"http://10.42.0.{i}:30000", WorkerRole.PREFILL)
    for i in range(2):
        reg.add(f"http://10.42.1.{i}:30000", WorkerRole.DECODE)
    settings = AutoscaleSettings(
        interval_s=10,
        limits={WorkerRole.PREFILL: PoolLimits(3, 3), WorkerRole.DECODE: PoolLimits(3, 6)},
        rules=DecisionRules(up_cooldown_s=0, down_cooldown_s=0),
        retry_base_s=5,
        retry_max_s=60,
    )
    loop = Autoscaler(settings, scaler, reg, lambda: reg.workers, FakeWindow(ObservedLoad(0.5, 1000, 100)),
                      PROFILE, clock=clock)  # fmt: skip
    waits = []
    for _ in range(3):
        await loop.step()
        retry = loop.status()["pools"]["decode"]["retry_in_s"]
        waits.append(retry)
        clock.t += retry or 0
    assert waits == [5.0, 10.0, None]  # failed, failed (backoff doubled), done
    assert [f["error"].split(":")[1].strip() for f in loop.failures] == [
        "HTTP 409 conflict",
        "HTTP 503 Service Unavailable",
    ]
    assert (await scaler.sizes())[WorkerRole.DECODE] == 3  # below min 3: grown once the API answered

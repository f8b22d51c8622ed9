"""PD disaggregation served by the real app (`kvroute serve --pd-disaggregation`) over a simulated fleet."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
import pytest

from kvroute.engines.sim.fleet import SimFleet
from kvroute.router.pd import PREFILL_WORKER_HEADER, WORKER_HEADER
from kvroute.router.types import WorkerRole
from tests.router.conftest import pd_sim_fleet, sse_data, test_config, wait_until

pytestmark = pytest.mark.slow

LONG = "The quick brown fox jumps over the lazy dog. " * 12


@pytest.fixture
async def fleet() -> AsyncIterator[SimFleet]:
    f = pd_sim_fleet()
    await f.start()
    try:
        yield f
    finally:
        await f.close()


def _pd_config(fleet: SimFleet, **kw: object):  # type: ignore[no-untyped-def]
    ports = {w.url: w.bootstrap_port for w in fleet.workers()}
    return test_config(
        pd_disaggregation=True,
        prefill_urls=tuple((u, ports[u]) for u in fleet.prefill_urls),
        decode_urls=tuple(fleet.decode_urls),
        **kw,
    )


async def test_serve_routes_through_a_prefill_decode_pair(fleet: SimFleet, start_router) -> None:
    r = await start_router(_pd_config(fleet))
    await r.wait_healthy(4, timeout=10)
    roles = {w["url"]: w["role"] for w in r.registry.describe_all()}
    assert roles == {
        **{u: "prefill" for u in fleet.prefill_urls},
        **{u: "decode" for u in fleet.decode_urls},
    }
    body = {"text": LONG, "sampling_params": {"max_new_tokens": 6, "ignore_eos": True}, "stream": True}
    async with r.session.post(r.url + "/generate", json=body, headers={"X-Request-Id": "rid-pd-1"}) as resp:
        raw = await resp.read()
        assert resp.status == 200, raw
        assert resp.headers[WORKER_HEADER] in fleet.decode_urls
        assert resp.headers[PREFILL_WORKER_HEADER] in fleet.prefill_urls
        assert resp.headers["X-Request-Id"] == "rid-pd-1"
    events = sse_data(raw)
    assert events[-1] == b"[DONE]"
    assert orjson.loads(events[-2])["meta_info"]["completion_tokens"] == 6

    body2 = {"model": "m", "messages": [{"role": "user", "content": LONG}], "max_tokens": 3}
    async with r.session.post(r.url + "/v1/chat/completions", json=body2) as resp:
        out = await resp.json()
        assert resp.status == 200, out
        assert resp.headers[WORKER_HEADER] in fleet.decode_urls
        assert resp.headers["X-Request-Id"]  # created by the router
    async with r.session.get(r.url + "/metrics") as resp:
        text = await resp.text()
    assert 'kvroute_requests_total{policy="pd",route="/generate",status="200"' in text
    assert 'kvroute_pd_requests_total{mode="disaggregated",outcome="ok"} 2.0' in text
    await wait_until(lambda: all(w.load.in_flight == 0 for w in r.core.workers()), what="loads released")


async def test_admin_adds_workers_by_role_and_plans(fleet: SimFleet, start_router) -> None:
    ports = {w.url: w.bootstrap_port for w in fleet.workers()}
    r = await start_router(test_config(pd_disaggregation=True, decode_urls=tuple(fleet.decode_urls)))
    p_url = fleet.prefill_urls[0]
    async with r.session.post(
        r.url + "/admin/workers", json={"url": p_url, "role": "prefill", "bootstrap_port": ports[p_url]}
    ) as resp:
        assert resp.status == 202, await resp.text()
    async with r.session.post(
        r.url + "/admin/workers",
        json={"url": fleet.decode_urls[0] + "/x", "role": "decode", "bootstrap_port": 1},
    ) as resp:
        assert resp.status == 400  # a bootstrap port belongs to a prefill server
    await r.wait_healthy(3, timeout=10)
    w = r.core.get_worker(p_url)
    assert w is not None and (w.role, w.bootstrap_port) == (WorkerRole.PREFILL, ports[p_url])
    body = {"text": LONG, "sampling_params": {"max_new_tokens": 2}}
    async with r.session.post(r.url + "/generate", json=body) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers[PREFILL_WORKER_HEADER] == p_url
    async with r.session.get(r.url + "/admin/plan") as resp:
        plan = await resp.json()
        assert resp.status == 200, plan
    assert plan["observed"]["current_prefill"] == 1 and plan["observed"]["current_decode"] == 2
    assert {"prefill_workers", "decode_workers"} <= set(plan["plan"])


async def test_plan_needs_pd_mode(engines, start_router) -> None:
    eng = await engines()
    r = await start_router(worker_urls=(eng.url,))
    async with r.session.get(r.url + "/admin/plan") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "no_pd"

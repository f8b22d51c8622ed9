"""Engines behind SGLang's `--api-key`: kvroute sends the key on every call, or rejects the worker (why)."""

from __future__ import annotations

from typing import Any

import openai

from kvroute.engines.sim.fleet import SimFleet
from tests.router.conftest import wait_until

KEY = "sk-engine-key"


async def test_key_on_every_engine_call(start_router: Any) -> None:
    """Registration (info, events), loads, generation and flush all pass the engine's auth: the worker is
    healthy with its page size and model read, it publishes events, and a client with no key of its own
    (or another key, for the router) is served."""
    async with SimFleet(workers=2, time_scale=0.01, api_key=KEY) as fleet:
        r = await start_router(worker_urls=tuple(fleet.urls), engine_api_key=KEY, policy="kv_aware")
        await r.wait_healthy(2)
        for url in fleet.urls:
            d = r.registry.describe(url)
            assert d["page_size"] == 16 and d["model"] and d["kv_events_subscribed"] is True, d
        async with openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="router-side", max_retries=0) as client:
            out = await client.completions.create(model="m", prompt="hello " * 40, max_tokens=4)
            assert out.choices[0].text
            stream = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi " * 30}], max_tokens=3, stream=True
            )
            chunks = [c async for c in stream]
            assert chunks
        async with r.session.get(r.url + "/get_loads") as resp:
            loads = await resp.json()
        assert all("error" not in w["engine"] for w in loads["workers"]), loads
        async with r.session.post(r.url + "/flush_cache") as resp:
            assert resp.status == 200, await resp.text()
        # the engines really check: a call without the key is refused
        async with r.session.get(fleet.urls[0] + "/server_info") as resp:
            assert resp.status == 401


async def test_worker_without_the_key_is_rejected_with_the_reason(start_router: Any) -> None:
    """SGLang leaves /health open, so the worker looks alive; its /server_info answers 401. It must not be
    marked healthy-but-blind: it is REJECTED, the reason names the flag to use."""
    async with SimFleet(workers=1, time_scale=0.01, api_key=KEY) as fleet:
        r = await start_router(worker_urls=tuple(fleet.urls))
        url = fleet.urls[0]
        await wait_until(lambda: r.registry.describe(url)["state"] == "rejected", 5.0, "rejected")
        reason = r.registry.describe(url)["reason"]
        assert "401" in reason and "--api-key" in reason
        r2 = await start_router(worker_urls=tuple(fleet.urls), engine_api_key="wrong")
        await wait_until(lambda: r2.registry.describe(url)["state"] == "rejected", 5.0, "rejected")
        assert "not the engine's" in r2.registry.describe(url)["reason"]


async def test_startup_timeout_rejects_a_worker_that_never_comes_up(start_router: Any) -> None:
    async with SimFleet(workers=1, time_scale=0.01) as fleet:
        await fleet.set_faults(0, slow_start_s=60.0)  # /health answers 503 for a minute
        r = await start_router(worker_urls=tuple(fleet.urls), worker_startup_timeout_s=0.3)
        url = fleet.urls[0]
        await wait_until(lambda: r.registry.describe(url)["state"] == "rejected", 5.0, "rejected")
        reason = r.registry.describe(url)["reason"]
        assert "--worker-startup-timeout-secs 0.3" in reason and "/health" in reason


async def test_pd_pairs_behind_api_keys(start_router: Any) -> None:
    """Prefill/decode disaggregation: both sides get the engine key (and the client's is not passed on)."""
    from tests.router.conftest import pd_sim_fleet

    async with pd_sim_fleet(api_key=KEY) as fleet:
        r = await start_router(
            pd_disaggregation=True,
            prefill_urls=tuple((u, None) for u in fleet.prefill_urls),
            decode_urls=tuple(fleet.decode_urls),
            engine_api_key=KEY,
            policy="round_robin",
        )
        await r.wait_healthy(4)
        body = {"text": "pd with keys " * 10, "sampling_params": {"max_new_tokens": 3}}
        headers = {"Authorization": "Bearer router-side"}
        async with r.session.post(r.url + "/generate", json=body, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["text"]

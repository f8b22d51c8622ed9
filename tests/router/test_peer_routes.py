"""The routes SGLang's router and gateway serve beyond generation, end to end over a simulated fleet:
forwarded with load accounting (the official `openai` client where it has a method), probes, engine
metrics, and smg's /workers API."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from kvroute.engines.sim.fleet import SimFleet
from kvroute.router.peer_routes import MetricsMerger, worker_id
from tests.router.conftest import wait_until


async def _served(r: Any, route: str) -> float:
    async with r.session.get(r.url + "/metrics") as resp:
        text = await resp.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("kvroute_requests_total{")
        and f'route="{route}"' in line
        and 'status="200"' in line
    )


async def test_forwarded_routes_with_the_openai_client(start_router: Any) -> None:
    async with SimFleet(workers=2, time_scale=0.01) as fleet:
        r = await start_router(worker_urls=tuple(fleet.urls), policy="kv_aware")
        await r.wait_healthy(2)
        async with openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="k", max_retries=0) as client:
            emb = await client.embeddings.create(model="m", input=["shared prefix " * 20, "other"])
            assert len(emb.data) == 2 and len(emb.data[0].embedding) == 16
            resp = await client.responses.create(model="m", input="tell me " * 10, max_output_tokens=4)
            assert resp.output_text and resp.usage is not None and resp.usage.input_tokens > 0
            models = await client.models.list()
            model_id = models.data[0].id
            assert (await client.models.retrieve(model_id)).id == model_id
            with pytest.raises(openai.NotFoundError) as err:
                await client.models.retrieve("no-such-model")
            assert err.value.code == "model_not_found"
        # no method in the openai client for these: plain HTTP, SGLang's bodies
        for path, body in (
            ("/v1/rerank", {"query": "what is kv", "documents": ["cache", "router", "engine"]}),
            ("/v1/classify", {"model": "m", "input": "classify this text " * 5}),
            ("/v1/score", {"query": "q " * 10, "items": ["a", "b"], "label_token_ids": [1, 2]}),
        ):
            async with r.session.post(r.url + path, json=body) as resp:
                assert resp.status == 200, (path, await resp.text())
                assert resp.headers["X-Kvroute-Worker"] in fleet.urls
                await resp.json()
        for route in ("/v1/embeddings", "/v1/responses", "/v1/rerank", "/v1/classify", "/v1/score"):
            assert await _served(r, route) >= 1, route
        # load accounting: everything reserved was released
        assert all(w.load.in_flight == 0 for w in r.core.workers())
        # a body the router cannot route is the client's error, in OpenAI's format
        async with r.session.post(r.url + "/v1/embeddings", json={"model": "m"}) as resp:
            assert resp.status == 400 and (await resp.json())["error"]["code"] == "missing_prompt"


async def test_embeddings_follow_the_cache(start_router: Any) -> None:
    """Routed by prompt like generation: the same long input goes back to the worker that has it."""
    async with SimFleet(workers=3, time_scale=0.01) as fleet:
        r = await start_router(worker_urls=tuple(fleet.urls), policy="kv_aware")
        await r.wait_healthy(3)
        text = "a long shared document " * 40
        seen = set()
        for i in range(4):
            async with r.session.post(r.url + "/v1/embeddings", json={"input": text}) as resp:
                assert resp.status == 200
                seen.add(resp.headers["X-Kvroute-Worker"])
                cached = int(resp.headers["X-Kvroute-Cached-Blocks"])
            if i == 0:
                # The first request's in-flight prediction ends with it; the worker "has it" once the
                # engine's BlockStored event has reached the index (a loaded CI host can be slower than
                # the next request).
                first = resp.headers["X-Kvroute-Worker"]
                hashes = r.core.routing_request(text=text).block_hashes
                held = lambda u=first, h=hashes: r.core.overlap(u, h) > 0  # noqa: E731
                await wait_until(held, 5.0, "the first input's KV events")
        assert len(seen) == 1 and cached > 0


async def test_health_generate_and_engine_metrics(start_router: Any) -> None:
    async with SimFleet(workers=2, time_scale=0.01) as fleet:
        empty = await start_router()
        async with empty.session.get(empty.url + "/health_generate") as resp:
            assert resp.status == 503 and (await resp.json())["message"] == "no healthy worker"
        r = await start_router(worker_urls=tuple(fleet.urls))
        await r.wait_healthy(2)
        async with r.session.get(r.url + "/health_generate") as resp:
            body = await resp.json()
            assert resp.status == 200 and body["worker"] in fleet.urls
        async with r.session.get(r.url + "/engine_metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
        for url in fleet.urls:
            assert f'worker="{url}"' in text
        from prometheus_client.parser import text_string_to_metric_families

        families = list(text_string_to_metric_families(text))  # valid exposition, families not split
        names = [f.name for f in families]
        assert len(names) == len(set(names)) and names


def test_metrics_merger_keeps_families_together() -> None:
    m = MetricsMerger()
    a = '# HELP x_total X\n# TYPE x_total counter\nx_total{a="1"} 2\n# TYPE y gauge\ny 3\n'
    m.add("http://w1:1", a)
    m.add("http://w2:1", a)
    lines = m.text().splitlines()
    assert lines == [
        "# HELP x_total X",
        "# TYPE x_total counter",
        'x_total{worker="http://w1:1",a="1"} 2',
        'x_total{worker="http://w2:1",a="1"} 2',
        "# TYPE y gauge",
        'y{worker="http://w1:1"} 3',
        'y{worker="http://w2:1"} 3',
    ]


async def test_workers_api_in_smg_shapes(start_router: Any) -> None:
    async with SimFleet(workers=2, time_scale=0.01) as fleet:
        r = await start_router(worker_urls=(fleet.urls[0],), admin_token="t")
        auth = {"Authorization": "Bearer t"}
        async with r.session.get(r.url + "/workers") as resp:
            assert resp.status == 401 and (await resp.json())["code"] == "UNAUTHORIZED"
        async with r.session.post(r.url + "/workers", json={"url": fleet.urls[1]}, headers=auth) as resp:
            body = await resp.json()
            assert resp.status == 202 and body["success"] is True
            assert body["worker"]["url"] == fleet.urls[1] and body["worker"]["id"] == worker_id(fleet.urls[1])
        async with r.session.post(r.url + "/workers", json={"url": fleet.urls[1]}, headers=auth) as resp:
            assert resp.status == 409 and (await resp.json())["code"] == "WORKER_ALREADY_EXISTS"
        async with r.session.post(r.url + "/workers", json={"worker_type": "x"}, headers=auth) as resp:
            assert resp.status == 400 and (await resp.json())["code"] == "BAD_REQUEST"
        await r.wait_healthy(2)
        async with r.session.get(r.url + "/workers", headers=auth) as resp:
            listing = await resp.json()
        assert listing["total"] == 2 and listing["stats"]["healthy_workers"] == 2
        assert listing["stats"]["by_type"] == {"regular": 2, "prefill": 0, "decode": 0}
        w = listing["workers"][0]
        assert {"id", "url", "model_id", "worker_type", "is_healthy", "load", "connection_mode"} <= set(w)
        async with r.session.get(r.url + f"/workers/{w['id']}", headers=auth) as resp:
            assert (await resp.json())["url"] == w["url"]
        async with r.session.delete(r.url + f"/workers/{worker_id(fleet.urls[1])}", headers=auth) as resp:
            assert resp.status == 200 and (await resp.json())["success"] is True
        assert fleet.urls[1] not in r.registry.urls()
        async with r.session.delete(r.url + "/workers/nope", headers=auth) as resp:
            assert resp.status == 404 and (await resp.json())["code"] == "WORKER_NOT_FOUND"
        # sglang-router's older calls
        async with r.session.post(r.url + "/add_worker", params={"url": fleet.urls[1]}, headers=auth) as resp:
            assert resp.status == 200 and "Successfully added" in await resp.text()
        async with r.session.get(r.url + "/list_workers", headers=auth) as resp:
            assert set((await resp.json())["urls"]) == set(fleet.urls)
        async with r.session.post(
            r.url + "/remove_worker", params={"url": fleet.urls[1]}, headers=auth
        ) as resp:
            assert resp.status == 200
        await wait_until(lambda: fleet.urls[1] not in r.registry.urls(), 2.0, "removed")


async def test_request_id_headers_in_order(start_router: Any) -> None:
    """`--request-id-headers x-request-id x-trace-id`: the first header present names the request, to the
    engine and in the answer (under the first name); none present: one is made."""
    async with SimFleet(workers=1, time_scale=0.01) as fleet:
        r = await start_router(
            worker_urls=tuple(fleet.urls),
            request_id_header="x-request-id",
            request_id_headers=("x-trace-id",),
        )
        await r.wait_healthy(1)
        body = {"text": "hello " * 10, "sampling_params": {"max_new_tokens": 1}}
        async with r.session.post(r.url + "/generate", json=body, headers={"x-trace-id": "trace-7"}) as resp:
            assert resp.status == 200 and resp.headers["x-request-id"] == "trace-7"
        both = {"x-trace-id": "trace-8", "x-request-id": "req-8"}
        async with r.session.post(r.url + "/generate", json=body, headers=both) as resp:
            assert resp.headers["x-request-id"] == "req-8"
        async with r.session.post(r.url + "/generate", json=body) as resp:
            assert resp.headers["x-request-id"] not in ("", "trace-7", "req-8")

"""The proxy over real loopback HTTP: pass-through, streaming, request ids, retries, broken streams."""

from __future__ import annotations

import asyncio

import orjson

from tests.router.conftest import refused_url, wait_until


async def test_body_forwarded_byte_for_byte_with_custom_headers(engines, start_router) -> None:
    eng = await engines()
    r = await start_router(worker_urls=(eng.url,))
    await r.wait_healthy(1)
    # Odd spacing, key order, unicode escapes and unknown fields must survive untouched.
    body = (
        b'{ "text" :"hello world, this is a prompt",\n "zz_unknown": {"a":[1,2.50,null]},'
        b' "sampling_params":{}, "x":"\\u00e9" }'
    )
    async with r.session.post(
        r.url + "/generate",
        data=body,
        headers={
            "Content-Type": "application/json",
            "X-Custom-Thing": "42",
            "Keep-Alive": "timeout=5",
            "Proxy-Authorization": "Basic c2VjcmV0",
        },
    ) as resp:
        assert resp.status == 200
        payload = await resp.json()
        assert resp.headers["X-Kvroute-Worker"] == eng.url
        assert resp.headers["X-Engine"] == "fake"  # engine's own headers come back
        assert int(resp.headers["X-Kvroute-Cached-Blocks"]) >= 0
    assert payload["meta_info"]["cached_tokens"] == 7
    seen = eng.seen[-1]
    assert seen.body == body
    assert seen.headers["X-Custom-Thing"] == "42"
    assert "Keep-Alive" not in seen.headers and "Proxy-Authorization" not in seen.headers


async def test_request_id_propagated_or_created(engines, start_router) -> None:
    eng = await engines()
    r = await start_router(worker_urls=(eng.url,))
    await r.wait_healthy(1)
    async with r.session.post(
        r.url + "/generate", json={"text": "abc"}, headers={"X-Request-Id": "req-1"}
    ) as resp:
        assert resp.status == 200
        assert resp.headers["X-Request-Id"] == "req-1"
    assert eng.seen[-1].headers["X-Request-Id"] == "req-1"
    async with r.session.post(r.url + "/generate", json={"text": "abc"}) as resp:
        created = resp.headers["X-Request-Id"]
    assert len(created) == 32 and eng.seen[-1].headers["X-Request-Id"] == created


async def test_stream_is_relayed_chunk_by_chunk(engines, start_router) -> None:
    eng = await engines(mode="slow_stream", chunks=3)
    r = await start_router(worker_urls=(eng.url,))
    await r.wait_healthy(1)
    async with r.session.post(r.url + "/generate", json={"text": "y" * 64, "stream": True}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        # The engine holds chunk 2 until we release it: the first must already be here (no buffering).
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
        assert orjson.loads(first[6:])["meta_info"]["completion_tokens"] == 1
        eng.gate.put_nowait(None)
        second = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
        assert orjson.loads(second[6:])["meta_info"]["completion_tokens"] == 2
        eng.gate.put_nowait(None)
        rest = await asyncio.wait_for(resp.content.read(), 5)
    assert rest.endswith(b"data: [DONE]\n\n")
    # The side parser saw the engine's cached_tokens and released the load.
    await wait_until(lambda: r.core.get_worker(eng.url).load.in_flight == 0, what="load released")
    assert r.core.worker_stats(eng.url).cached_tokens == 7


async def test_openai_client_streams_through_router(engines, start_router) -> None:
    import openai

    eng = await engines(chunks=5)
    r = await start_router(worker_urls=(eng.url,))
    await r.wait_healthy(1)
    async with openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="unused", max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hi there"}], stream=True
        )
        parts = [c.choices[0].delta.content async for c in stream if c.choices]
        models = await client.models.list()
    assert parts == ["x"] * 5
    assert [m.id for m in models.data] == ["fake-model"]
    assert eng.seen[-1].path == "/v1/chat/completions"


async def test_retries_around_a_refusing_worker(engines, start_router) -> None:
    good, bad = await engines(), await engines()
    r = await start_router(worker_urls=(good.url, bad.url), max_retries=1)
    await r.wait_healthy(2)
    await bad.close()  # now refuses connections, but the registry still believes it healthy
    workers = set()
    for i in range(6):
        async with r.session.post(
            r.url + "/v1/completions", json={"prompt": f"p{i}", "max_tokens": 2}
        ) as resp:
            assert resp.status == 200, await resp.text()
            workers.add(resp.headers["X-Kvroute-Worker"])
    assert workers == {good.url}
    metrics = await (await r.session.get(r.url + "/metrics")).text()
    assert 'kvroute_retries_total{reason="upstream_unreachable",route="/v1/completions"}' in metrics


async def test_all_workers_failing_gives_openai_error(engines, start_router) -> None:
    eng = await engines(mode="error500")
    r = await start_router(worker_urls=(eng.url,), max_retries=2)
    await r.wait_healthy(1)
    async with r.session.post(
        r.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
    ) as resp:
        assert resp.status == 502
        err = (await resp.json())["error"]
    assert err["code"] == "upstream_500" and err["type"] == "upstream_error" and "message" in err


async def test_worker_killed_mid_stream_ends_cleanly(engines, start_router) -> None:
    eng = await engines(mode="die_mid_stream", chunks=5)
    r = await start_router(worker_urls=(eng.url,))
    await r.wait_healthy(1)
    async with r.session.post(r.url + "/v1/completions", json={"prompt": "abc", "stream": True}) as resp:
        assert resp.status == 200
        data = await asyncio.wait_for(resp.content.read(), 10)  # never hangs
    events = [e for e in data.split(b"\n\n") if e]
    assert len(events) == 4  # two relayed chunks, the error event, [DONE]
    assert orjson.loads(events[2][6:])["error"]["code"] == "stream_broken"
    assert events[3] == b"data: [DONE]"
    await wait_until(lambda: r.core.get_worker(eng.url).load.in_flight == 0, what="load released")


async def test_no_healthy_worker_is_503_and_readiness(engines, start_router) -> None:
    r = await start_router(worker_urls=(refused_url(),))
    async with r.session.get(r.url + "/readiness") as resp:
        assert resp.status == 503
    async with r.session.get(r.url + "/liveness") as resp:
        assert resp.status == 200
    async with r.session.post(r.url + "/generate", json={"text": "abc"}) as resp:
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "no_worker"
    eng = await engines()
    async with r.session.post(r.url + "/admin/workers", json={"url": eng.url}) as resp:
        assert resp.status == 202
    await r.wait_healthy(1)
    async with r.session.get(r.url + "/readiness") as resp:
        assert resp.status == 200


async def test_client_disconnect_aborts_upstream(engines, start_router) -> None:
    eng = await engines(mode="slow_stream", chunks=3)
    r = await start_router(worker_urls=(eng.url,))
    await r.wait_healthy(1)
    resp = await r.session.post(r.url + "/generate", json={"text": "abc", "stream": True, "rid": "gone-1"})
    await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
    resp.close()  # the client leaves mid-stream
    await wait_until(lambda: "gone-1" in eng.aborts, what="abort_request sent to the engine")
    await wait_until(lambda: eng.disconnected.is_set(), what="upstream connection closed")
    await wait_until(lambda: r.core.get_worker(eng.url).load.in_flight == 0, what="load released")


async def test_flush_cache_fan_out_and_loads(engines, start_router) -> None:
    a, b = await engines(), await engines()
    r = await start_router(worker_urls=(a.url, b.url))
    await r.wait_healthy(2)
    async with r.session.post(r.url + "/flush_cache") as resp:
        assert resp.status == 200
        assert set((await resp.json())["workers"]) == {a.url, b.url}
    async with r.session.get(r.url + "/get_model_info") as resp:
        assert (await resp.json())["model_path"] == "fake-model"
    async with r.session.get(r.url + "/get_loads") as resp:
        loads = (await resp.json())["workers"]
    assert {w["url"] for w in loads} == {a.url, b.url}
    assert all(w["engine"]["running"] == 0 for w in loads)


async def test_metrics_exposition(engines, start_router) -> None:
    eng = await engines()
    r = await start_router(worker_urls=(eng.url,))
    await r.wait_healthy(1)
    async with r.session.post(r.url + "/generate", json={"text": "x" * 64, "stream": True}) as resp:
        await resp.read()
    text = await (await r.session.get(r.url + "/metrics")).text()
    assert (
        'kvroute_requests_total{policy="round_robin",route="/generate",status="200",'
        f'worker="{eng.url}"}} 1.0' in text
    )
    assert f'kvroute_cached_tokens_total{{worker="{eng.url}"}} 7.0' in text
    assert "kvroute_ttft_seconds_bucket" in text and "kvroute_worker_in_flight" in text
    # 4 streamed events: 3 inter-token gaps, however the chunks were cut on the way
    assert f'kvroute_itl_seconds_count{{policy="round_robin",worker="{eng.url}"}} 3.0' in text


def test_bulk_histogram_observe_matches_repeated_observe() -> None:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from kvroute.router.metrics import observe_n

    regs = (CollectorRegistry(), CollectorRegistry())
    bulk, loop = (
        Histogram("h", "h", ["w"], buckets=(0.001, 0.01, 1.0), registry=r).labels("x") for r in regs
    )
    for amount, n in [(0.0, 3), (0.001, 2), (0.0011, 5), (1.0, 2), (7.0, 4)]:
        observe_n(bulk, amount, n)
        for _ in range(n):
            loop.observe(amount)

    def lines(r: CollectorRegistry) -> list[str]:
        return [x for x in generate_latest(r).decode().splitlines() if "_created" not in x]

    assert lines(regs[0]) == lines(regs[1]) and 'h_count{w="x"} 16.0' in lines(regs[0])

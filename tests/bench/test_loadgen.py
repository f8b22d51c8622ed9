"""The load generator against a minimal streaming SGLang/OpenAI stand-in on a real loopback socket."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from kvroute.bench.loadgen import LoadgenConfig, LoadgenError, read_results, run_load
from kvroute.bench.workloads import Request

SEEN = web.AppKey("seen", list)


async def _fake_engine() -> web.Application:
    """Streams `max_new_tokens` tokens, reports cached_tokens = half the prompt, names a worker."""
    app = web.Application()
    app[SEEN] = []

    async def generate(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        app[SEEN].append(body)
        n = body["sampling_params"]["max_new_tokens"]
        prompt = len(body["input_ids"]) if "input_ids" in body else len(body["text"])
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Kvroute-Worker": "w1"})
        await resp.prepare(request)
        for i in range(1, n + 1):
            meta = {"completion_tokens": i, "prompt_tokens": prompt, "cached_tokens": prompt // 2}
            await resp.write(f"data: {json.dumps({'text': 'x' * i, 'meta_info': meta})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        app[SEEN].append(body)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(body["max_tokens"]):
            await resp.write(f"data: {json.dumps({'choices': [{'text': 'y'}]})}\n\n".encode())
        usage = {
            "prompt_tokens": 9,
            "completion_tokens": body["max_tokens"],
            "prompt_tokens_details": {"cached_tokens": 4},
        }
        await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def failing(request: web.Request) -> web.Response:
        return web.Response(status=503, text="no worker")

    app.router.add_post("/generate", generate)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", failing)
    return app


@pytest.fixture
async def engine_url() -> AsyncIterator[tuple[str, web.Application]]:
    app = await _fake_engine()
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        await runner.cleanup()


def _reqs() -> list[Request]:
    return [
        Request("r0", 0.0, "abcdefgh", output_tokens=4),
        Request("r1", 0.05, "abcdefghij", output_tokens=1),
        Request("r2", 0.10, "zz", output_tokens=3, messages=({"role": "user", "content": "zz"},)),
    ]


async def test_generate_streaming_measures_each_request(
    engine_url: tuple[str, web.Application], tmp_path: Path
) -> None:
    url, app = engine_url
    out = tmp_path / "r.jsonl"
    res = await run_load(_reqs(), LoadgenConfig(url, label="x", progress=False), out)
    assert [r.rid for r in res] == ["r0", "r1", "r2"]
    assert all(r.ok and r.status == 200 and r.worker == "w1" for r in res)
    assert [r.output_tokens for r in res] == [4, 1, 3]
    assert [len(r.itl_s) for r in res] == [3, 0, 2]  # one gap per token after the first
    assert [r.cached_tokens for r in res] == [4, 5, 1]
    for r in res:
        assert r.ttft_s is not None and r.e2e_s is not None and 0 < r.ttft_s <= r.e2e_s
    assert read_results(out) and sorted(r.rid for r in read_results(out)) == ["r0", "r1", "r2"]
    assert [b["text"] for b in app[SEEN]] == ["abcdefgh", "abcdefghij", "zz"]  # sent in arrival order
    assert app[SEEN][0]["sampling_params"] == {"max_new_tokens": 4, "ignore_eos": True, "temperature": 0.0}


async def test_open_loop_time_scale_and_input_ids(engine_url: tuple[str, web.Application]) -> None:
    url, app = engine_url
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    res = await run_load(_reqs(), LoadgenConfig(url, input_ids=True, time_scale=2.0, progress=False))
    # Arrivals at 0.1 s of workload time are sent at 0.2 s of wall time.
    assert loop.time() - t0 >= 0.2
    assert app[SEEN][0]["input_ids"] == list(b"abcdefgh")
    # Latencies are reported in engine time: wall / 2.
    assert all(r.ok and r.e2e_s is not None for r in res)


async def test_openai_completions_usage_and_errors(engine_url: tuple[str, web.Application]) -> None:
    url, _ = engine_url
    res = await run_load(_reqs()[:1], LoadgenConfig(url, api="completions", progress=False))
    assert res[0].ok and res[0].output_tokens == 4 and res[0].cached_tokens == 4
    res = await run_load(_reqs()[2:], LoadgenConfig(url, api="chat", progress=False))
    assert not res[0].ok and res[0].status == 503 and "no worker" in (res[0].error or "")


async def test_loopback_only() -> None:
    with pytest.raises(LoadgenError):
        await run_load(_reqs(), LoadgenConfig("http://10.0.0.1:1", progress=False))

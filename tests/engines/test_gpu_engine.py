"""The GPU engine on the CPU (tiny config, plain-torch attention): paging, prefix caching, chunked prefill,
abort, flush, SGLang's HTTP API and KV events over real loopback sockets, and the launcher."""

from __future__ import annotations

import asyncio

import pytest

torch = pytest.importorskip("torch")

import aiohttp  # noqa: E402
import msgspec  # noqa: E402
import zmq  # noqa: E402
import zmq.asyncio  # noqa: E402

from kvroute.engines.core import BadRequest, GenerateRequest, TokenChunk  # noqa: E402
from kvroute.engines.gpu.config import PRESETS, EngineConfig  # noqa: E402
from kvroute.engines.gpu.engine import GpuEngine  # noqa: E402


async def collect(e: GpuEngine, rid: str, ids: list[int], n: int) -> tuple[list[int], TokenChunk]:
    toks: list[int] = []
    last = None
    async for c in e.generate(GenerateRequest(rid=rid, input_ids=ids, max_new_tokens=n)):
        toks += c.token_ids
        last = c
    assert last is not None
    return toks, last


def engine(pages: int = 64, ps: int = 4, max_batch_tokens: int = 32, **kw: object) -> GpuEngine:
    cfg = EngineConfig(page_size=ps, max_batch_tokens=max_batch_tokens, device="cpu")
    return GpuEngine(PRESETS["tiny"], cfg, num_pages=pages, **kw)  # type: ignore[arg-type]


async def test_prefix_cache_hit_gives_same_tokens_and_truthful_cached_tokens() -> None:
    e = engine()
    await e.start()
    try:
        prompt = list(range(1, 40))
        a, la = await collect(e, "a", prompt, 6)
        b, lb = await collect(e, "b", prompt, 6)
        assert la.cached_tokens == 0 and lb.cached_tokens == 36  # whole pages of 4, last token recomputed
        assert a == b  # attention over cached pages = attention over recomputed ones
        assert la.finish_reason == {"type": "length", "length": 6} and la.completion_tokens == 6
        # A chunked prefill (39 tokens, 8-token budget) gives the same tokens as an unchunked one.
        e2 = engine(max_batch_tokens=8)
        await e2.start()
        try:
            c, _ = await collect(e2, "c", prompt, 6)
        finally:
            await e2.close()
        assert c == a
        assert e.sched is not None
        e.sched.check_invariants()
        load = e.load()
        assert load.cached_tokens_total == 36 and load.prompt_tokens_total == 78
    finally:
        await e.close()


async def test_concurrent_requests_batch_and_pool_accounting_holds() -> None:
    e = engine(pages=48)
    await e.start()
    try:
        prompts = [[7] * 20 + [i] * (5 + i) for i in range(8)]
        solo = [await collect(e, f"s{i}", p, 5) for i, p in enumerate(prompts[:2])]
        outs = await asyncio.gather(*(collect(e, f"r{i}", p, 5) for i, p in enumerate(prompts)))
        assert [o[0] for o in outs[:2]] == [s[0] for s in solo]  # batching does not change results
        assert max(r.num_decode for r in e.step_log) > 1  # decodes really were batched
        assert any(r.num_decode and r.prefill_tokens for r in e.step_log)  # and mixed with prefill
        assert e.sched is not None
        e.sched.check_invariants()
        assert all(o[1].cached_tokens >= 20 for o in outs)  # the shared 20-token prefix (5 pages)
    finally:
        await e.close()


async def test_too_long_prompt_is_bad_request_and_abort_ends_stream() -> None:
    e = engine(pages=16)
    await e.start()
    try:
        with pytest.raises(BadRequest):
            await collect(e, "x", list(range(100)), 10)  # 110 tokens > 64-token pool
        gen = e.generate(GenerateRequest(rid="long", input_ids=[1, 2, 3], max_new_tokens=50))
        first = await anext(gen)
        assert first.finish_reason is None
        assert e.abort(rid="long") == 1
        last = first
        async for c in gen:
            last = c
        assert last.finish_reason is not None and last.finish_reason["type"] == "abort"
        assert await e.flush_cache() is True
        assert e.pool is not None and e.pool.free_pages == e.pool.num_pages
    finally:
        await e.close()


async def test_http_api_and_kv_events_over_loopback() -> None:
    from aiohttp import web

    from kvroute.cache_index.events import decode_batch
    from kvroute.engines.http_api import create_app

    e = engine(pages=12, kv_events_endpoint="tcp://127.0.0.1:0")
    app = create_app(e)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    try:
        info = e.facts.kv_events
        assert info is not None
        sub.connect(info.endpoint)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/server_info") as r:
                si = await r.json()
            assert si["page_size"] == 4 and si["max_total_num_tokens"] == 48
            # PUB/SUB joins asynchronously: send until the subscriber sees a batch (bounded).
            text = "abcdefghijklmnop"  # 16 bytes = 4 pages
            got = None
            for _ in range(50):
                async with s.post(
                    url + "/generate", json={"text": text, "sampling_params": {"max_new_tokens": 2}}
                ) as r:
                    body = await r.json()
                assert r.status == 200 and len(body["output_ids"]) == 2
                try:
                    got = await asyncio.wait_for(sub.recv_multipart(), 0.2)
                    break
                except TimeoutError:
                    await s.post(url + "/flush_cache")
            assert got is not None
            topic, seq, payload = got
            batch = decode_batch(payload)
            stored = [ev for ev in batch.events if type(ev).__name__ == "BlockStored"]
            assert stored and list(stored[0].token_ids) == list(text.encode())[:4]
            assert stored[0].parent_block_hash is None and stored[0].block_size == 4
            # A prompt that needs more pages than are free evicts: BlockRemoved events follow.
            async with s.post(
                url + "/generate", json={"text": "Z" * 40, "sampling_params": {"max_new_tokens": 2}}
            ) as r:
                assert r.status == 200
            removed = []
            for _ in range(20):
                frames = await asyncio.wait_for(sub.recv_multipart(), 5)
                evs = decode_batch(frames[2]).events
                removed += [ev for ev in evs if type(ev).__name__ == "BlockRemoved"]
                if removed:
                    break
            assert removed
    finally:
        sub.close(linger=0)
        ctx.term()
        await runner.cleanup()


async def test_launcher_serves_two_engines_sharing_weights() -> None:
    from kvroute.engines.gpu import launch

    args = launch.parse_args(
        [
            "--device",
            "cpu",
            "--model-config",
            "tiny",
            "--port",
            "0",
            "--num-engines",
            "2",
            "--page-size",
            "4",
            "--num-pages",
            "32",
            "--events-port",
            "0",
        ]
    )
    stop = asyncio.Event()
    ready: asyncio.Future[list[dict[str, str]]] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(launch.serve(args, stop, ready))
    try:
        info = await asyncio.wait_for(asyncio.shield(ready), 60)
        assert len(info) == 2 and info[0]["url"] != info[1]["url"]
        assert info[0]["kv_events"] != info[1]["kv_events"] and info[0]["kv_events"].startswith("tcp://")
        outs = []
        async with aiohttp.ClientSession() as s:
            for eng in info:
                async with s.get(eng["url"] + "/server_info") as r:
                    assert (await r.json())["page_size"] == 4
                body = {"input_ids": [5, 6, 7, 8, 9], "sampling_params": {"max_new_tokens": 3}}
                async with s.post(eng["url"] + "/generate", json=body) as r:
                    outs.append((await r.json())["output_ids"])
        assert outs[0] == outs[1]  # same weights in both engines
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def test_kv_event_payload_matches_sglang_shape() -> None:
    from kvroute.engines.kv_publisher import KvEventPublisher
    from kvroute.engines.prefix_cache import PagesRemoved, PageStored
    from kvroute.engines.sim.kv_notes import notes_to_events

    ev = notes_to_events([PageStored(5, None, (1, 2, 3, 4)), PagesRemoved((5, 6))], 4, merge_chains=False)
    payload = KvEventPublisher("tcp://127.0.0.1:0").encode(ev, ts=1.0)
    wire = msgspec.msgpack.decode(payload)
    assert wire[1][0] == ["BlockStored", [5], None, [1, 2, 3, 4], 4, None, "GPU"]
    assert wire[1][1:] == [["BlockRemoved", [5], "GPU"], ["BlockRemoved", [6], "GPU"]]  # one per page

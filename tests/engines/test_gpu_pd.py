"""PD disaggregation on the GPU engine, CPU path (tiny model, torch): the bootstrap protocol as the router
sends it, KV transfer between paged pools, page bookkeeping on both sides, failure semantics, KV events,
and the whole fleet behind the router. The CUDA checks (Triton copy kernel, CUDA IPC between processes)
run where CUDA is present and skip elsewhere."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
from collections.abc import AsyncIterator

import pytest

torch = pytest.importorskip("torch")

import aiohttp  # noqa: E402
import zmq  # noqa: E402
import zmq.asyncio  # noqa: E402

from kvroute.engines.core import BadRequest, BootstrapTimeout, EngineError, GenerateRequest, TokenChunk  # noqa: E402
from kvroute.engines.gpu.config import PRESETS, EngineConfig  # noqa: E402
from kvroute.engines.gpu.engine import GpuEngine  # noqa: E402
from kvroute.engines.gpu.kv_pool import KVPool  # noqa: E402
from kvroute.engines.gpu.transfer import PoolDirectory, SourceKv, copy_pages  # noqa: E402

CUDA = torch.cuda.is_available()


# On CUDA: Llama-3.2-1B shapes (head dim 64, GQA 32/8) cut to 4 layers, bf16, Triton kernels.
GPU_MODEL = dataclasses.replace(PRESETS["llama3-1b"], name="llama3-1b-4l", num_layers=4, max_position=8192)


def make(
    mode: str, ps: int, pools: PoolDirectory, pages: int = 64, device: str = "cpu", **kw: object
) -> GpuEngine:
    cfg = EngineConfig(
        page_size=ps,
        max_batch_tokens=kw.pop("max_batch_tokens", 64),  # type: ignore[arg-type]
        device=device,
        disaggregation_mode=mode,
        bootstrap_timeout_s=kw.pop("timeout", 30.0),  # type: ignore[arg-type]
    )
    model = PRESETS["tiny"] if device == "cpu" else GPU_MODEL
    return GpuEngine(model, cfg, num_pages=pages, pools=pools, **kw)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def engines(*es: GpuEngine) -> AsyncIterator[None]:
    for e in es:
        await e.start()
    try:
        yield
    finally:
        for e in es:
            await e.close()


async def run(e: GpuEngine, req: GenerateRequest) -> tuple[list[int], TokenChunk]:
    toks: list[int] = []
    last = None
    async for c in e.generate(req):
        toks += c.token_ids
        last = c
    assert last is not None
    return toks, last


def pd_req(rid: str, ids: list[int], n: int, p: GpuEngine, room: int | None = None) -> GenerateRequest:
    return GenerateRequest(
        rid=rid,
        input_ids=ids,
        max_new_tokens=n,
        bootstrap_host="127.0.0.1",
        bootstrap_port=p.facts.disaggregation_bootstrap_port,
        bootstrap_room=random.getrandbits(63) if room is None else room,
    )


async def pd_pair(p: GpuEngine, d: GpuEngine, rid: str, ids: list[int], n: int) -> tuple[list[int], ...]:
    """What the router does: the same request, one room, to both sides at once."""
    req = pd_req(rid, ids, n, p)
    (pt, pl), (dt, dl) = await asyncio.gather(run(p, req), run(d, req))
    assert pl.finish_reason == {"type": "length", "length": 1} and len(pt) == 1
    assert dl.finish_reason == {"type": "length", "length": n} and dl.completion_tokens == n
    assert dt[0] == pt[0]  # the decode side streams the prefill's first token first
    return pt, dt


async def settled(*es: GpuEngine) -> None:
    """Wait (bounded) until every lent page is back and the step threads have applied it."""
    for _ in range(500):
        if all(e.lent_rooms() == 0 and (e.sched is None or not e.sched.lent) for e in es):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("lent pages were not released")


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ps", [1, 16, 64])
async def test_pd_tokens_equal_aggregated_for_ragged_lengths(ps: int, device: str) -> None:
    """Greedy tokens after a KV transfer = tokens of an aggregated engine with the same weights."""
    pools = PoolDirectory()
    pages = 2048 // ps
    w = None
    if device == "cuda":  # one set of weights for the three engines, as the launcher shares them
        from kvroute.engines.gpu.model import LlamaWeights

        w = LlamaWeights.random(GPU_MODEL, torch.device("cuda"), 0)
    agg, p, d = (make(m, ps, pools, pages, device, weights=w) for m in ("null", "prefill", "decode"))
    rng = random.Random(ps)
    async with engines(agg, p, d):
        for i, n in enumerate([1, 2, ps - 1 or 3, ps + 1, 3 * ps + 5, 150]):
            ids = [rng.randrange(1, 500) for _ in range(n)]
            want = []
            async for c in agg.generate(GenerateRequest(rid=f"a{i}", input_ids=ids, max_new_tokens=7)):
                want += c.token_ids
            _, got = await pd_pair(p, d, f"r{i}", ids, 7)
            assert got == want, (ps, n)
        await settled(p, d)
        assert len(d.transfer_log) == 6 and all(t.transport == "local" for t in d.transfer_log)
        assert d.transfer_log[-1].pages == -(-150 // ps)
        per_token = d.model_cfg.kv_bytes_per_token()
        assert d.transfer_log[-1].nbytes == d.transfer_log[-1].pages * ps * per_token
        for e in (p, d):
            assert e.sched is not None
            e.sched.check_invariants()
            assert not e.sched.running and not e.sched.waiting
        # Pages given back: the pool holds only what the caches keep, and a flush empties both pools.
        assert await p.flush_cache() and await d.flush_cache()
        assert p.pool is not None and d.pool is not None
        assert p.pool.free_pages == p.pool.num_pages and d.pool.free_pages == d.pool.num_pages
        assert p._registry is not None and p._registry.pending() == 0


async def test_prefix_cache_on_prefill_side_and_decode_reports_it() -> None:
    pools = PoolDirectory()
    p, d = make("prefill", 4, pools), make("decode", 4, pools)
    async with engines(p, d):
        shared = list(range(10, 50))  # 10 pages of 4
        await pd_pair(p, d, "x", shared + [1, 2, 3], 3)
        req = pd_req("y", shared + [7, 8, 9], 3, p)
        (_, pl), (_, dl) = await asyncio.gather(run(p, req), run(d, req))
        assert pl.cached_tokens == 40 and dl.cached_tokens == 40  # hit on the prefill side, reported by both
        assert d.transfer_log[-1].pages == 11  # the whole prompt crosses, cached or not
        await settled(p, d)
        load = d.load()
        assert load.prompt_tokens_total == 86 and load.cached_tokens_total == 40


async def test_chunked_prefill_and_concurrent_pairs() -> None:
    pools = PoolDirectory()
    agg = make("null", 16, pools, max_batch_tokens=24)
    p, d = make("prefill", 16, pools, max_batch_tokens=24), make("decode", 16, pools)
    async with engines(agg, p, d):
        prompts = [[(7 * i + j) % 500 + 1 for j in range(20 + 13 * i)] for i in range(6)]
        # 40 tokens each: the decodes overlap whatever the machine's load (the prefills take ~15 steps).
        want = [
            (await run(agg, GenerateRequest(rid=f"a{i}", input_ids=ids, max_new_tokens=40)))[0]
            for i, ids in enumerate(prompts)
        ]
        outs = await asyncio.gather(*(pd_pair(p, d, f"r{i}", ids, 40) for i, ids in enumerate(prompts)))
        assert [o[1] for o in outs] == want
        assert max(r.num_decode for r in d.step_log) > 1  # transferred requests decode as one batch
        await settled(p, d)
        for e in (p, d):
            assert e.sched is not None
            e.sched.check_invariants()


async def test_bootstrap_failures_answer_like_sglang() -> None:
    pools = PoolDirectory()
    p = make("prefill", 4, pools, 256, max_batch_tokens=4, timeout=0.5)
    d = make("decode", 4, pools, 256, timeout=0.5)
    async with engines(p, d):
        ids = list(range(1, 30))
        with pytest.raises(BadRequest):  # PD servers need a room
            await run(d, GenerateRequest(rid="a", input_ids=ids, max_new_tokens=2))
        with pytest.raises(BadRequest):
            await run(p, GenerateRequest(rid="b", input_ids=ids, max_new_tokens=2))
        with pytest.raises(BadRequest):  # the decode side must know where to reach the prefill
            await run(d, GenerateRequest(rid="c", input_ids=ids, max_new_tokens=2, bootstrap_room=5))
        # No prefill ever comes: the decode side times out with 500 (SGLang aborts the same way).
        with pytest.raises(BootstrapTimeout) as ti:
            await run(d, pd_req("t", ids, 2, p))
        assert ti.value.status == 500
        # Nobody listens on the bootstrap port.
        dead = GenerateRequest(
            rid="u",
            input_ids=ids,
            max_new_tokens=2,
            bootstrap_host="127.0.0.1",
            bootstrap_port=1,
            bootstrap_room=9,
        )
        with pytest.raises(EngineError) as ei:
            await run(d, dead)
        assert "bootstrap" in str(ei.value)
        # The prefill is aborted before it finishes: the waiting decode fails at once with 500.
        long = [i % 400 + 1 for i in range(1000)]  # 250 chunked steps of 4 tokens: the abort lands mid-way
        req = pd_req("ab", long, 4, p)
        dtask = asyncio.create_task(run(d, req))
        pgen = p.generate(req)
        ptask = asyncio.create_task(run_gen(pgen))
        await wait_until(lambda: p.sched is not None and any(r.rid == "ab" for r in p.sched.running))
        assert p.abort(rid="ab") == 1
        last = await ptask
        assert last.finish_reason is not None and last.finish_reason["type"] == "abort"
        with pytest.raises(EngineError) as ea:
            await dtask
        assert ea.value.status == 500 and "prefill failed" in str(ea.value)
        # The decode side got a different prompt than the prefill side for the same room.
        room = random.getrandbits(63)
        ptask = asyncio.create_task(run(p, pd_req("m", ids, 3, p, room)))
        with pytest.raises(BadRequest):
            await run(d, pd_req("m", ids + [1], 3, p, room))
        await ptask
        await settled(p, d)
        assert p._registry is not None
        await wait_until(lambda: p._registry is not None and p._registry.pending() == 0, 3.0)
        for e in (p, d):
            assert e.sched is not None
            e.sched.check_invariants()
            assert not e.sched.running


async def run_gen(gen: AsyncIterator[TokenChunk]) -> TokenChunk:
    last = None
    async for c in gen:
        last = c
    assert last is not None
    return last


async def wait_until(cond: object, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():  # type: ignore[operator]
        if loop.time() > end:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.002)


async def test_unclaimed_room_pages_are_taken_back_and_decode_abort_while_waiting() -> None:
    pools = PoolDirectory()
    p = make("prefill", 4, pools, timeout=0.3)
    d = make("decode", 4, pools, timeout=5.0)
    async with engines(p, d):
        # A prefill whose decode never comes: its pages are lent, then taken back after the hold.
        await run(p, pd_req("lonely", list(range(1, 23)), 4, p))
        assert p.lent_rooms() == 1
        await settled(p)
        assert p.sched is not None and not p.sched.lent
        p.sched.check_invariants()
        # A decode aborted while it waits for its room ends with an abort, and leaves nothing behind.
        gen = d.generate(pd_req("wait", list(range(1, 23)), 4, p))
        task = asyncio.create_task(run_gen(gen))
        await wait_until(lambda: d.load().num_waiting_reqs == 1)
        assert d.abort(rid="wait") == 1
        last = await task
        assert last.finish_reason is not None and last.finish_reason["type"] == "abort"
        assert d.load().num_waiting_reqs == 0


async def test_kv_events_from_both_sides() -> None:
    from kvroute.cache_index.events import decode_batch

    pools = PoolDirectory()
    p = make("prefill", 4, pools, kv_events_endpoint="tcp://127.0.0.1:0")
    d = make("decode", 4, pools, kv_events_endpoint="tcp://127.0.0.1:0")
    ctx = zmq.asyncio.Context()
    subs = []
    async with engines(p, d):
        try:
            for e in (p, d):
                info = e.facts.kv_events
                assert info is not None
                s = ctx.socket(zmq.SUB)
                s.setsockopt(zmq.SUBSCRIBE, b"")
                s.connect(info.endpoint)
                subs.append(s)
            stored: list[list[object]] = [[], []]
            for i in range(50):  # PUB/SUB joins asynchronously: send until both sides' batches arrive
                ids = [100 + i] + list(range(1, 12))  # 3 full pages
                await pd_pair(p, d, f"e{i}", ids, 2)
                for k, s in enumerate(subs):
                    with contextlib.suppress(TimeoutError):
                        while True:
                            frames = await asyncio.wait_for(s.recv_multipart(), 0.05)
                            stored[k] += [
                                ev
                                for ev in decode_batch(frames[2]).events
                                if type(ev).__name__ == "BlockStored"
                            ]
                if stored[0] and stored[1]:
                    break
            assert stored[0] and stored[1]
            first_p = [list(ev.token_ids) for ev in stored[0]]  # type: ignore[attr-defined]
            first_d = [list(ev.token_ids) for ev in stored[1]]  # type: ignore[attr-defined]
            assert any(t in first_p for t in first_d)  # the decode side caches the pages it received
        finally:
            for s in subs:
                s.close(linger=0)
            ctx.term()


def test_copy_pages_torch_path_moves_exactly_the_pages() -> None:
    cfg = PRESETS["tiny"]
    src = KVPool(cfg, 20, 4, "cpu", torch.float32)
    dst = KVPool(cfg, 20, 4, "cpu", torch.float32)
    src.k.normal_()
    src.v.normal_()
    dst.k.fill_(float("nan"))
    dst.v.fill_(float("nan"))
    sp, dp = [3, 17, 0, 9], [11, 2, 19, 5]
    n = copy_pages(SourceKv(src.k, src.v, 4), sp, dst, dp)
    assert n == 4 * 4 * cfg.kv_bytes_per_token()
    for a, b in zip(sp, dp, strict=True):
        assert torch.equal(dst.k[:, b * 4 : b * 4 + 4], src.k[:, a * 4 : a * 4 + 4])
        assert torch.equal(dst.v[:, b * 4 : b * 4 + 4], src.v[:, a * 4 : a * 4 + 4])
    untouched = [i for i in range(20) if i not in dp]
    assert all(torch.isnan(dst.k[:, i * 4]).all() for i in untouched)
    with pytest.raises(ValueError):
        copy_pages(SourceKv(src.k, src.v, 4), [1, 2], dst, [1])


@pytest.mark.slow
async def test_pd_fleet_behind_the_router() -> None:
    """The launcher's 2 prefill + 2 decode + 1 regular engines (one process) behind kvroute's PD path."""
    from aiohttp import web

    from kvroute.engines.gpu import launch
    from kvroute.router.app import create_app
    from kvroute.router.config import RouterConfig

    args = launch.parse_args(
        [
            "--device",
            "cpu",
            "--model-config",
            "tiny",
            "--port",
            "0",
            "--page-size",
            "4",
            "--num-pages",
            "64",
            "--events-port",
            "0",
            "--roles",
            "prefill,prefill,decode,decode,null",
        ]
    )
    stop = asyncio.Event()
    ready: asyncio.Future[list[dict[str, str]]] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(launch.serve(args, stop, ready))
    runner = None
    try:
        info = await asyncio.wait_for(asyncio.shield(ready), 60)
        assert [e["role"] for e in info] == ["prefill", "prefill", "decode", "decode", "null"]
        pre = [e for e in info if e["role"] == "prefill"]
        dec = [e for e in info if e["role"] == "decode"]
        cfg = RouterConfig(
            port=0,
            pd_disaggregation=True,
            prefill_urls=tuple((e["url"], int(e["bootstrap_port"])) for e in pre),
            decode_urls=tuple(e["url"] for e in dec),
            block_size=4,
            health_check_interval_s=5.0,
        )
        runner = web.AppRunner(create_app(cfg), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        rurl = f"http://127.0.0.1:{runner.addresses[0][1]}"
        agg = info[4]["url"]
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
            for _ in range(200):
                async with s.get(rurl + "/readiness") as r:
                    if r.status == 200:
                        break
                await asyncio.sleep(0.05)
            for i in range(6):
                body = {
                    "input_ids": [(i * 31 + j) % 500 + 1 for j in range(9 + 11 * i)],
                    "sampling_params": {"max_new_tokens": 6, "ignore_eos": True},
                }
                async with s.post(agg + "/generate", json=body) as r:
                    want = (await r.json())["output_ids"]
                async with s.post(rurl + "/generate", json=body) as r:
                    assert r.status == 200, await r.text()
                    got = await r.json()
                assert got["output_ids"] == want
                assert got["meta_info"]["completion_tokens"] == 6
            # A batch: one room per item, each item decoded after its own transfer.
            body = {
                "input_ids": [[5, 6, 7, 8, 9], [9, 8, 7, 6, 5, 4, 3]],
                "sampling_params": {"max_new_tokens": 3},
            }
            async with s.post(rurl + "/generate", json=body) as r:
                assert r.status == 200, await r.text()
                items = await r.json()
            assert [len(it["output_ids"]) for it in items] == [3, 3]
    finally:
        if runner is not None:
            await runner.cleanup()
        stop.set()
        await asyncio.wait_for(task, 30)


# ---- CUDA only ----------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("ps", [1, 16, 64])
def test_triton_copy_kernel_matches_torch_path(ps: int) -> None:
    cfg = PRESETS["llama3-1b"]
    dev = torch.device("cuda")
    src = KVPool(cfg, 256, ps, dev, torch.bfloat16)
    dst = KVPool(cfg, 256, ps, dev, torch.bfloat16)
    ref = KVPool(cfg, 256, ps, dev, torch.bfloat16)
    src.k.normal_()
    src.v.normal_()
    for pool in (dst, ref):
        pool.k.fill_(float("nan"))
        pool.v.fill_(float("nan"))
    g = random.Random(ps)
    sp = g.sample(range(256), 100)
    dp = g.sample(range(256), 100)
    copy_pages(SourceKv(src.k, src.v, ps), sp, dst, dp, use_triton=True)
    copy_pages(SourceKv(src.k, src.v, ps), sp, ref, dp, use_triton=False)
    torch.cuda.synchronize()
    assert torch.equal(dst.k.isnan(), ref.k.isnan()) and torch.equal(dst.v.isnan(), ref.v.isnan())
    assert torch.equal(dst.k.nan_to_num(), ref.k.nan_to_num()) and torch.equal(
        dst.v.nan_to_num(), ref.v.nan_to_num()
    )


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
async def test_cuda_ipc_transfer_between_processes(tmp_path: object) -> None:
    """A prefill engine in another process on the same GPU: the decode engine opens its pool's CUDA IPC
    handles; tokens equal the aggregated engine's (same seed, same weights in both processes)."""
    import json
    import pathlib
    import subprocess
    import sys

    from kvroute.engines.gpu.model import LlamaWeights

    cfg_file = pathlib.Path(str(tmp_path)) / "model.json"
    cfg_file.write_text(json.dumps(dataclasses.asdict(GPU_MODEL)))
    repo = pathlib.Path(__file__).resolve().parents[2]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kvroute.engines.gpu.launch",
        "--device",
        "cuda",
        "--model-config",
        str(cfg_file),
        "--port",
        "0",
        "--roles",
        "prefill",
        "--page-size",
        "16",
        "--num-pages",
        "512",
        "--max-batch-tokens",
        "64",  # the chunks of the in-process engines: the same prefill arithmetic, the same K/V bits
        stdout=subprocess.PIPE,
        cwd=repo,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 300)
        pre = json.loads(line)["engines"][0]
        pools = PoolDirectory()
        w = LlamaWeights.random(GPU_MODEL, torch.device("cuda"), 0)
        agg, d = (make(m, 16, pools, 512, "cuda", weights=w) for m in ("null", "decode"))
        async with engines(agg, d), aiohttp.ClientSession() as s:
            rng = random.Random(3)
            for i, n in enumerate([1, 15, 16, 17, 300, 1000]):
                ids = [rng.randrange(1, 120000) for _ in range(n)]
                want, _ = await run(agg, GenerateRequest(rid=f"a{i}", input_ids=ids, max_new_tokens=6))
                req = GenerateRequest(
                    rid=f"r{i}",
                    input_ids=ids,
                    max_new_tokens=6,
                    bootstrap_host="127.0.0.1",
                    bootstrap_port=int(pre["bootstrap_port"]),
                    bootstrap_room=random.getrandbits(63),
                )
                body = {
                    "input_ids": ids,
                    "sampling_params": {"max_new_tokens": 6},
                    "bootstrap_host": "127.0.0.1",
                    "bootstrap_port": req.bootstrap_port,
                    "bootstrap_room": req.bootstrap_room,
                }

                async def prefill(body: dict[str, object] = body) -> list[int]:
                    async with s.post(pre["url"] + "/generate", json=body) as r:
                        assert r.status == 200, await r.text()
                        return list((await r.json())["output_ids"])

                ptoks, (dtoks, _) = await asyncio.gather(prefill(), run(d, req))
                assert dtoks == want and ptoks == want[:1], (n, dtoks, want)
            assert [t.transport for t in d.transfer_log] == ["cuda_ipc"] * 6
    finally:
        proc.terminate()
        await proc.wait()

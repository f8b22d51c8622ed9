"""PD disaggregation on one GPU with kvroute's own engine (issue 15): KV transfer speed, then PD vs aggregated
fleets behind the router.

    python3 bench/gpu_pd.py versions
    python3 bench/gpu_pd.py transfer [--page-sizes 1,16,64 --sizes-mb 1,16,64,256,1024 --ipc]
    python3 bench/gpu_pd.py burst [--model-config llama3-8b --duration 60 --burst-every 20]
    python3 bench/gpu_pd.py prefix [--model-config llama3-8b --policies kv_aware,round_robin ...]

- transfer: the Triton gather/scatter kernel copying a request's prompt pages (all layers, K and V) between
  two 8B-shaped pools, pages scattered at random, against a plain device-to-device copy of a 2 GiB buffer
  (both counted as bytes read + bytes written). `--ipc`: the source pool in a child process, opened
  through CUDA IPC handles (`CudaIpcTransport`).
- burst: `bench/pd_bench.py`'s workload (steady chat + bursts of long unique prompts) on 4 engines of one
  GPU: 2 prefill + 2 decode (kvroute's PD path) against 4 aggregated (kv_aware); p99 ITL of chat in bursts
  vs calm, TTFT.
- prefix: the shared-prefix workload on the 2 + 2 PD fleet, the router's prefill policy kv_aware vs
  round_robin: prefill-side cache hit ratio (reported back through the decode side) and TTFT.

Engines: `kvroute.engines.gpu.launch` in one child process (shared weights, device-to-device transfer); the
router (`kvroute.router.app.create_app`) in another; the load generator here. JSON results under $OUT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("OUT", "/tmp/out"))


# ---- versions ------------------------------------------------------------------------------------
def versions() -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    out["cuda_runtime"] = torch.version.cuda
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        p = torch.cuda.get_device_properties(0)
        out["sm_count"] = p.multi_processor_count
        out["memory_gib"] = round(p.total_memory / 2**30, 1)
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        out["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        out["nvidia_smi"] = repr(exc)
    return out


# ---- transfer ------------------------------------------------------------------------------------
def cuda_median_ms(fn: Any, reps: int = 20) -> float:
    """Median CUDA-event time of `fn` in ms, after one warm-up call (also used by bench/gpu_e2e.py)."""
    import torch

    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1))
    return statistics.median(ts)


def copy_bandwidth_gbs(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy of `nbytes`, counted as read + written (GB/s, 1e9)."""
    import torch

    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    ms = cuda_median_ms(lambda: b.copy_(a))
    return 2 * nbytes / (ms / 1e3) / 1e9


def _pools(model: str, ps: int, pool_bytes: int) -> tuple[Any, Any, int]:
    import torch

    from kvroute.engines.gpu.config import load_model_config
    from kvroute.engines.gpu.kv_pool import KVPool

    cfg = load_model_config(model)
    pages = pool_bytes // (cfg.kv_bytes_per_token(2) * ps)
    src = KVPool(cfg, pages, ps, torch.device("cuda"), torch.bfloat16)
    dst = KVPool(cfg, pages, ps, torch.device("cuda"), torch.bfloat16)
    return src, dst, pages


def _time_copy(
    sk: Any, sv: Any, dst: Any, sp: list[int], dp: list[int], moved: int, copy_gbs: float
) -> dict[str, Any]:
    """The kernel alone (page tables already on the device; CUDA events) and the whole call as the engine
    makes it (page-table upload, launch, synchronise; host clock). Bandwidth counts read + written."""
    import torch

    from kvroute.engines.gpu.kernels import copy_kv_pages
    from kvroute.engines.gpu.transfer import SourceKv, copy_pages

    ps = dst.page_size
    sp_t = torch.tensor(sp, dtype=torch.int32, device="cuda")
    dp_t = torch.tensor(dp, dtype=torch.int32, device="cuda")
    # Device time: the launch captured in a CUDA graph and replayed (no host launch gap inside the events).
    copy_kv_pages(sk, sv, dst.k, dst.v, sp_t, dp_t, ps)  # compile outside the capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            copy_kv_pages(sk, sv, dst.k, dst.v, sp_t, dp_t, ps)
    torch.cuda.current_stream().wait_stream(side)
    kernel_ms = cuda_median_ms(graph.replay)
    launch_ms = cuda_median_ms(lambda: copy_kv_pages(sk, sv, dst.k, dst.v, sp_t, dp_t, ps))
    src = SourceKv(sk, sv, ps)
    ts = []
    for _ in range(20):
        t0 = time.perf_counter()
        copy_pages(src, sp, dst, dp)
        torch.cuda.current_stream().synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    call_ms = statistics.median(ts[2:])
    kgbs = 2 * moved / (kernel_ms / 1e3) / 1e9
    row = {
        "page_size": ps,
        "pages": len(sp),
        "mb": moved / (1 << 20),
        "kernel_ms": kernel_ms,
        "launch_ms": launch_ms,  # one launch from Python, page tables on the device (CUDA events)
        "kernel_gbs": kgbs,
        "of_copy": kgbs / copy_gbs,
        "call_ms": call_ms,
        "call_gbs": 2 * moved / (call_ms / 1e3) / 1e9,
    }
    print(json.dumps(row), flush=True)
    return row


def transfer(a: argparse.Namespace) -> dict[str, Any]:
    """Copy a prompt's pages between two pools for each page size and transfer size; check the bytes."""
    import torch

    from kvroute.engines.gpu.transfer import SourceKv, copy_pages, page_bytes

    copy_gbs = copy_bandwidth_gbs()
    rows: list[dict[str, Any]] = []
    sizes = [int(s) for s in a.sizes_mb.split(",")]
    pool_bytes = max(sizes) * (1 << 20) * 2 + (256 << 20)
    for ps in (int(p) for p in a.page_sizes.split(",")):
        src, dst, pages = _pools(a.model_config, ps, pool_bytes)
        src.k.normal_()
        src.v.normal_()
        pb = page_bytes(src)
        rng = random.Random(ps)
        for mb in sizes:
            n = max(1, mb * (1 << 20) // pb)
            sp = rng.sample(range(pages), n)
            dp = rng.sample(range(pages), n)
            dst.k.fill_(float("nan"))
            dst.v.fill_(float("nan"))
            src_kv = SourceKv(src.k, src.v, ps)
            moved = copy_pages(src_kv, sp, dst, dp)
            torch.cuda.synchronize()
            sp_t = torch.tensor(sp, device="cuda", dtype=torch.long)
            dp_t = torch.tensor(dp, device="cuda", dtype=torch.long)
            ok = all(
                bool(
                    torch.equal(
                        s_.view(s_.shape[0], pages, ps, -1)[:, sp_t],
                        d_.view(d_.shape[0], pages, ps, -1)[:, dp_t],
                    )
                )
                for s_, d_ in ((src.k, dst.k), (src.v, dst.v))
            )
            rows.append(
                {"transport": "local", **_time_copy(src.k, src.v, dst, sp, dp, moved, copy_gbs), "ok": ok}
            )
        del src, dst
        torch.cuda.empty_cache()
    out: dict[str, Any] = {"copy_gbs_rw": copy_gbs, "model": a.model_config, "rows": rows}
    if a.ipc:
        out["ipc"] = asyncio.run(_ipc_transfer(a, copy_gbs))
    return out


async def _ipc_transfer(a: argparse.Namespace, copy_gbs: float) -> list[dict[str, Any]]:
    """Source pool in a child process: opened through CUDA IPC, copied with the same kernel."""
    import torch

    from kvroute.engines.gpu.kv_pool import KVPool
    from kvroute.engines.gpu.transfer import CudaIpcTransport, PoolDescriptor, page_bytes

    sizes = [int(s) for s in a.sizes_mb.split(",")]
    ps = 16
    pool_bytes = max(sizes) * (1 << 20) * 2 + (256 << 20)
    spec = {"model": a.model_config, "page_size": ps, "pool_bytes": pool_bytes}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(Path(__file__).resolve()),
        "ipc-child",
        json.dumps(spec),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=REPO,
    )
    rows: list[dict[str, Any]] = []
    try:
        assert proc.stdout is not None
        desc = PoolDescriptor.from_dict(json.loads(await asyncio.wait_for(proc.stdout.readline(), 300)))
        t = CudaIpcTransport()
        src = t.open(desc)
        pages = src.k.shape[1] // ps
        from kvroute.engines.gpu.config import load_model_config

        dst = KVPool(load_model_config(a.model_config), pages, ps, torch.device("cuda"), torch.bfloat16)
        pb = page_bytes(dst)
        rng = random.Random(7)
        for mb in sizes:
            n = max(1, mb * (1 << 20) // pb)
            sp = rng.sample(range(pages), n)
            dp = rng.sample(range(pages), n)
            moved = t.transfer(desc, sp, dst, dp)
            ok = bool(
                torch.equal(
                    src.v.view(src.v.shape[0], pages, ps, -1)[:, torch.tensor(sp, device="cuda")],
                    dst.v.view(dst.v.shape[0], pages, ps, -1)[:, torch.tensor(dp, device="cuda")],
                )
            )
            rows.append(
                {"transport": "cuda_ipc", **_time_copy(src.k, src.v, dst, sp, dp, moved, copy_gbs), "ok": ok}
            )
        t.close()
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 30)
        if proc.returncode is None:
            proc.kill()
    return rows


def ipc_child(spec: dict[str, Any]) -> None:
    import torch

    from kvroute.engines.gpu.transfer import describe_pool

    src, _dst, _ = _pools(spec["model"], spec["page_size"], spec["pool_bytes"])
    del _dst
    src.k.normal_()
    src.v.normal_()
    torch.cuda.synchronize()
    print(json.dumps(describe_pool(src, "bench-pool", with_ipc=True).as_dict()), flush=True)
    sys.stdin.read()


# ---- fleets ----------------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def engine_fleet(
    a: argparse.Namespace, roles: Sequence[str], pages: int
) -> AsyncIterator[list[dict[str, str]]]:
    cmd = [
        sys.executable,
        "-m",
        "kvroute.engines.gpu.launch",
        "--device",
        a.device,
        "--model-config",
        a.model_config,
        "--port",
        "0",
        "--events-port",
        "0",
        "--roles",
        ",".join(roles),
        "--page-size",
        str(a.page_size),
        "--num-pages",
        str(pages),
        "--max-batch-tokens",
        str(a.max_batch_tokens),
    ]
    log = open(OUT / "gpu_pd_engines.log", "a")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO)
    try:
        assert proc.stdout is not None
        line = await asyncio.to_thread(proc.stdout.readline)
        if not line:
            raise RuntimeError(f"engines exited ({proc.wait()}) before serving; see gpu_pd_engines.log")
        yield json.loads(line)["engines"]
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@contextlib.asynccontextmanager
async def router_process(spec: dict[str, Any]) -> AsyncIterator[str]:
    """The router app in its own process (the load generator must not share its CPU)."""
    from kvroute.bench.compare import json_child

    with open(OUT / "gpu_pd_router.log", "a") as log:
        argv = [str(Path(__file__).resolve()), "router-child", json.dumps(spec)]
        async with json_child(argv, log, 120, "router exited before listening (gpu_pd_router.log)") as ready:
            yield str(ready["url"])


async def _router_child(spec: dict[str, Any]) -> None:
    from aiohttp import web

    from kvroute.router.app import create_app
    from kvroute.router.config import RouterConfig

    kw: dict[str, Any] = dict(spec)
    for key in ("worker_urls", "decode_urls"):
        kw[key] = tuple(kw.get(key, ()))
    kw["prefill_urls"] = tuple((u, p) for u, p in kw.get("prefill_urls", ()))
    kw["policy_params"] = tuple(tuple(x) for x in kw.get("policy_params", ()))
    cfg = RouterConfig(port=0, load_poll_interval_s=1.0, health_check_interval_s=5.0, **kw)
    runner = web.AppRunner(create_app(cfg), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    print(json.dumps({"url": f"http://127.0.0.1:{runner.addresses[0][1]}"}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await runner.cleanup()


async def _post(s: Any, url: str, body: dict[str, Any]) -> Any:
    async with s.post(url, json=body) as r:
        text = await r.text()
        if r.status != 200:
            raise RuntimeError(f"{url}: {r.status} {text[:300]}")
        return json.loads(text)


async def warm_up(engines: list[dict[str, str]], lengths: Sequence[int]) -> None:
    """Compile every kernel shape once on every engine (PD: every prefill x decode pair), then flush."""
    import aiohttp

    pre = [e for e in engines if e["role"] == "prefill"]
    dec = [e for e in engines if e["role"] == "decode"]
    reg = [e for e in engines if e["role"] == "null"]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        for n in lengths:
            ids = [(i * 7) % 250 + 1 for i in range(n)]
            sp = {"max_new_tokens": 8, "ignore_eos": True}
            for e in reg:
                await _post(s, e["url"] + "/generate", {"input_ids": ids, "sampling_params": sp})
            for p in pre:
                for d in dec:
                    body = {
                        "input_ids": ids,
                        "sampling_params": sp,
                        "bootstrap_host": "127.0.0.1",
                        "bootstrap_port": int(p["bootstrap_port"]),
                        "bootstrap_room": random.getrandbits(63),
                    }
                    await asyncio.gather(
                        _post(s, p["url"] + "/generate", body), _post(s, d["url"] + "/generate", body)
                    )
        await asyncio.sleep(1.0)  # lent pages released
        for e in engines:
            async with s.post(e["url"] + "/flush_cache") as r:
                await r.read()


def router_spec(
    engines: list[dict[str, str]], page_size: int, policy: str, prefill_policy: str
) -> dict[str, Any]:
    pre = [e for e in engines if e["role"] == "prefill"]
    dec = [e for e in engines if e["role"] == "decode"]
    reg = [e for e in engines if e["role"] == "null"]
    spec: dict[str, Any] = {"block_size": page_size, "policy": policy}
    if pre:
        spec.update(
            pd_disaggregation=True,
            prefill_urls=[(e["url"], int(e["bootstrap_port"])) for e in pre],
            decode_urls=[e["url"] for e in dec],
            prefill_policy=prefill_policy,
        )
    if reg:
        spec["worker_urls"] = [e["url"] for e in reg]
    return spec


async def _router_ready(url: str) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as s:
        for _ in range(300):
            with contextlib.suppress(aiohttp.ClientError):
                async with s.get(url + "/readiness") as r:
                    if r.status == 200:
                        await asyncio.sleep(1.0)  # KV-event subscriptions join (PUB drops before that)
                        return
            await asyncio.sleep(0.2)
    raise TimeoutError(f"router {url} not ready")


async def engine_counters(engines: list[dict[str, str]]) -> dict[str, dict[str, float]]:
    """Prompt and cached tokens per engine (the prefill side's hit ratio is the one that saves prefill)."""
    import aiohttp

    out: dict[str, dict[str, float]] = {}
    async with aiohttp.ClientSession() as s:
        for e in engines:
            async with s.get(e["url"] + "/metrics") as r:
                text = await r.text()
            vals: dict[str, float] = {}
            for ln in text.splitlines():
                for name in ("sglang:prompt_tokens_total", "sglang:cached_tokens_total"):
                    if ln.startswith(name):
                        vals[name.split(":")[1]] = float(ln.rsplit(" ", 1)[1])
            out[e["url"]] = {"role": e["role"], **vals}  # type: ignore[dict-item]
    return out


def _hit(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]], role: str) -> float:
    p = c = 0.0
    for url, a in after.items():
        if a["role"] != role:
            continue
        b = before.get(url, {})
        p += a.get("prompt_tokens_total", 0) - b.get("prompt_tokens_total", 0)
        c += a.get("cached_tokens_total", 0) - b.get("cached_tokens_total", 0)
    return c / p if p else float("nan")


# ---- burst: PD vs aggregated ---------------------------------------------------------------------
async def burst(a: argparse.Namespace) -> dict[str, Any]:
    from kvroute.bench.loadgen import LoadgenConfig, run_load
    from kvroute.bench.pd_bench import PDBenchConfig, build_workload, summarize, table

    wcfg = PDBenchConfig(
        duration_s=a.duration,
        chat_rate=a.chat_rate,
        chat_output_tokens=a.chat_output,
        burst_every_s=a.burst_every,
        burst_size=a.burst_size,
        burst_prompt_tokens=a.burst_prompt,
        time_scale=1.0,
    )
    reqs, chat, bursts = build_workload(wcfg)
    # One engine process per group: "-split" fleets keep prefill and decode engines (or every aggregated
    # engine) out of each other's interpreter (GIL); PD transfers between processes go through CUDA IPC.
    fleets: dict[str, list[list[str]]] = {
        "aggregated-4": [["null"] * 4],
        "pd-2p2d": [["prefill", "prefill", "decode", "decode"]],
        "aggregated-4-split": [["null"]] * 4,
        "pd-2p2d-split": [["prefill", "prefill"], ["decode", "decode"]],
    }
    sums = []
    extra: dict[str, Any] = {}
    for name in a.configs.split(","):
        async with contextlib.AsyncExitStack() as stack:
            engines = []
            for group in fleets[name]:
                engines += await stack.enter_async_context(engine_fleet(a, group, a.pages))
            await warm_up(engines, [a.burst_prompt, wcfg.chat_system_tokens + wcfg.chat_user_tokens, 100])
            async with router_process(router_spec(engines, a.page_size, "kv_aware", "kv_aware")) as url:
                await _router_ready(url)
                before = await engine_counters(engines)
                lg = LoadgenConfig(url, "generate", label=name, progress=False, request_timeout_s=600.0)
                t0 = time.perf_counter()
                res = await run_load(reqs, lg, OUT / f"gpu_pd_burst_{name}.jsonl")
                wall = time.perf_counter() - t0
                after = await engine_counters(engines)
        s = summarize(name, res, chat, bursts)
        sums.append(s)
        extra[name] = {
            "wall_s": wall,
            "errors": sorted({r.error for r in res if not r.ok and r.error})[:5],
            "prefill_hit": _hit(before, after, "prefill"),
            "regular_hit": _hit(before, after, "null"),
        }
        print(f"# {name}: {len(res)} requests in {wall:.0f} s; {json.dumps(extra[name])}", flush=True)
    print(table(sums).replace("engine milliseconds: wall / time_scale", "milliseconds"))
    return {"workload": asdict(wcfg), "results": [asdict(s) for s in sums], "extra": extra}


# ---- prefix: the router's prefill choice ---------------------------------------------------------
async def prefix(a: argparse.Namespace) -> dict[str, Any]:
    from kvroute.bench.gpu_e2e import summarize
    from kvroute.bench.loadgen import LoadgenConfig, run_load
    from kvroute.bench.workloads import build

    wl = build(
        "shared_prefix",
        groups=a.groups,
        users_per_group=a.users,
        questions_per_user=2,
        context_tokens=a.context,
        question_tokens=a.question,
        output_tokens=a.output,
        rate_per_s=a.rate,
        seed=0,
    ).head(a.count)
    roles = a.roles.split(",")
    out: dict[str, Any] = {"workload": wl.params, "roles": roles, "pages": a.pages, "policies": {}}
    async with engine_fleet(a, roles, a.pages) as engines:
        await warm_up(engines, [a.context + a.question, 300])
        import aiohttp

        for pol in a.policies.split(","):
            async with aiohttp.ClientSession() as s:
                for e in engines:
                    async with s.post(e["url"] + "/flush_cache") as r:
                        await r.read()
            spec = router_spec(engines, a.page_size, pol, pol)
            async with router_process(spec) as url:
                await _router_ready(url)
                before = await engine_counters(engines)
                lg = LoadgenConfig(url, "generate", label=pol, progress=False, request_timeout_s=600.0)
                res = await run_load(wl.requests, lg, OUT / f"gpu_pd_prefix_{pol}.jsonl")
                after = await engine_counters(engines)
            summ = summarize(res)
            summ["prefill_side_hit"] = _hit(before, after, "prefill")
            summ["regular_side_hit"] = _hit(before, after, "null")
            out["policies"][pol] = summ
            print(pol, json.dumps(summ), flush=True)
    return out


# ---- main ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("versions")
    tr = sub.add_parser("transfer")
    tr.add_argument("--model-config", default="llama3-8b")
    tr.add_argument("--page-sizes", default="1,16,64")
    tr.add_argument("--sizes-mb", default="1,16,64,256,1024")
    tr.add_argument("--ipc", action="store_true")
    for name in ("burst", "prefix"):
        p = sub.add_parser(name)
        p.add_argument("--model-config", default="llama3-8b")
        p.add_argument("--device", default="cuda")
        p.add_argument("--page-size", type=int, default=16)
        p.add_argument("--max-batch-tokens", type=int, default=8192)
        if name == "burst":
            p.add_argument("--pages", type=int, default=0, help="KV pages per engine; 0 = from free memory")
            p.add_argument(
                "--configs", default="aggregated-4,pd-2p2d", help="also aggregated-4-split, pd-2p2d-split"
            )
            p.add_argument("--duration", type=float, default=60.0)
            p.add_argument("--chat-rate", type=float, default=4.0)
            p.add_argument("--chat-output", type=int, default=128)
            p.add_argument("--burst-every", type=float, default=20.0)
            p.add_argument("--burst-size", type=int, default=8)
            p.add_argument("--burst-prompt", type=int, default=8192)
        else:
            p.add_argument("--pages", type=int, default=3072, help="KV pages per engine (cache pressure)")
            p.add_argument("--roles", default="prefill,prefill,decode,decode")
            p.add_argument("--policies", default="kv_aware,round_robin")
            p.add_argument("--groups", type=int, default=8)
            p.add_argument("--users", type=int, default=6)
            p.add_argument("--context", type=int, default=16384)
            p.add_argument("--question", type=int, default=128)
            p.add_argument("--output", type=int, default=16)
            p.add_argument("--rate", type=float, default=1.5)
            p.add_argument("--count", type=int, default=96)
    sub.add_parser("router-child").add_argument("spec")
    sub.add_parser("ipc-child").add_argument("spec")
    a = ap.parse_args(argv)
    if a.cmd == "router-child":
        asyncio.run(_router_child(json.loads(a.spec)))
        return 0
    if a.cmd == "ipc-child":
        ipc_child(json.loads(a.spec))
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    if a.cmd == "versions":
        res = versions()
    elif a.cmd == "transfer":
        res = transfer(a)
        print(f"device copy {res['copy_gbs_rw']:.0f} GB/s (read + written)")
        for r in res["rows"] + res.get("ipc", []):
            print(
                f"  {r['transport']:8s} page {r['page_size']:2d} {r['mb']:7.1f} MB  "
                f"kernel {r['kernel_ms']:.3f} ms (launched {r['launch_ms']:.3f}) "
                f"{r['kernel_gbs']:5.0f} GB/s {r['of_copy']:6.1%} of copy | call {r['call_ms']:.3f} ms "
                f"{r['call_gbs']:5.0f} GB/s | bytes equal {r['ok']}"
            )
    elif a.cmd == "burst":
        res = asyncio.run(burst(a))
    else:
        res = asyncio.run(prefix(a))
    (OUT / f"gpu_pd_{a.cmd}.json").write_text(json.dumps(res, indent=1, default=str))
    if a.cmd in ("versions", "prefix"):
        print(json.dumps(res, indent=1, default=str)[:6000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""End-to-end on one GPU: step costs of the real engine vs the simulator's profile, then N engines behind
the router on the shared-prefix workload, round_robin vs cache_aware vs kv_aware.

    python3 bench/gpu_e2e.py step-costs [--model-config llama3-8b]
    python3 bench/gpu_e2e.py e2e [--model-config llama3-8b --num-engines 4 --pages 1536 --count 256]

Writes ``gpu_step_costs.json`` / ``gpu_e2e.json`` (and per-policy JSON lines) under $OUT (or /tmp/out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kvroute.bench.gpu_pd import cuda_median_ms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OUT = Path(os.environ.get("OUT", "/tmp/out"))


# ---- step costs ----------------------------------------------------------------------------------
def step_costs(model_name: str, page_size: int) -> dict[str, Any]:
    """Time whole forward steps (all layers, our kernels, sampling rows) at the profile's grid points."""
    import torch

    from kvroute.engines.gpu.attention import TritonAttention, build_meta
    from kvroute.engines.gpu.config import load_model_config
    from kvroute.engines.gpu.kv_pool import KVPool
    from kvroute.engines.gpu.model import LlamaModel, LlamaWeights, torch_dtype
    from kvroute.engines.sim.profiles import h100_llama3_8b

    cfg = load_model_config(model_name)
    dev = torch.device("cuda")
    w = LlamaWeights.random(cfg, dev, 0)
    attn = TritonAttention()
    model = LlamaModel(w, attn)
    max_tokens = 64 * 4096 + 8192
    pool = KVPool(cfg, max_tokens // page_size + 8, page_size, dev, torch_dtype(cfg.dtype))
    pool.k.normal_()
    pool.v.normal_()
    prof = h100_llama3_8b()

    def timed(fn: Any) -> float:
        return cuda_median_ms(fn, reps=5)

    rows: list[dict[str, Any]] = []
    pages_all = list(range(pool.num_pages))

    def tensors(n: int, rows_: list[int]) -> tuple[Any, Any, Any]:
        ids = torch.randint(0, cfg.vocab_size, (n,), device=dev)
        return ids, torch.tensor(rows_, device=dev)

    for b, c in [(1, 1024), (16, 4096), (64, 1024), (64, 4096)]:
        per = -(-(c + 1) // page_size)
        pages = [pages_all[i * per : (i + 1) * per] for i in range(b)]
        meta = build_meta(page_size, dev, pages, [c] * b, [], [], [])
        ids, srows = tensors(b, list(range(b)))
        pos = torch.full((b,), c - 1, device=dev)
        ms = timed(
            lambda meta=meta, ids=ids, pos=pos, srows=srows: model.forward(
                ids, pos, meta, pool.k, pool.v, srows
            ).argmax(-1)
        )
        pred = prof.step_ms([], b, b * c)
        rows.append(
            {"kind": "decode", "batch": b, "context": c, "ms": ms, "profile_ms": pred, "ratio": ms / pred}
        )
    for n, p in [(512, 0), (2048, 0), (8192, 0), (512, 2048), (2048, 2048), (512, 8192), (8192, 2048)]:
        pages = [pages_all[: -(-(p + n) // page_size)]]
        meta = build_meta(
            page_size, dev, [], [], pages, [p], [n], prefill_block_m=attn.prefill_tuning.block_m
        )
        ids, srows = tensors(n, [n - 1])
        pos = torch.arange(p, p + n, device=dev)
        ms = timed(
            lambda meta=meta, ids=ids, pos=pos, srows=srows: model.forward(
                ids, pos, meta, pool.k, pool.v, srows
            ).argmax(-1)
        )
        pred = prof.step_ms([(n, p)], 0, 0)
        rows.append(
            {"kind": "prefill", "new": n, "cached": p, "ms": ms, "profile_ms": pred, "ratio": ms / pred}
        )
    return {
        "device": torch.cuda.get_device_name(),
        "model": cfg.name,
        "page_size": page_size,
        "profile": prof.source,
        "rows": rows,
    }


# ---- end to end ----------------------------------------------------------------------------------
async def _http(method: str, url: str, **kw: Any) -> tuple[int, Any]:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.request(method, url, **kw) as r:
        body = await r.read()
        try:
            return r.status, json.loads(body)
        except ValueError:
            return r.status, body.decode(errors="replace")


async def _wait_ok(url: str, deadline_s: float) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            st, _ = await _http("GET", url)
            if st == 200:
                return
        except OSError:
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {deadline_s} s")


def summarize(results: list[Any]) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    ttfts = sorted(r.ttft_s for r in ok if r.ttft_s is not None)
    p99 = ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))] if ttfts else float("nan")
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens or 0 for r in ok)
    span = max((r.done_s or 0.0) for r in ok) - min(r.scheduled_s for r in ok) if ok else float("nan")
    out_toks = sum(r.output_tokens for r in ok)
    workers: dict[str, int] = {}
    for r in ok:
        workers[r.worker or "?"] = workers.get(r.worker or "?", 0) + 1
    return {
        "ok": len(ok),
        "total": len(results),
        "ttft_mean_s": statistics.fmean(ttfts) if ttfts else None,
        "ttft_p50_s": ttfts[len(ttfts) // 2] if ttfts else None,
        "ttft_p99_s": p99,
        "cache_hit_ratio": cached / prompt if prompt else 0.0,
        "output_tok_per_s": out_toks / span,
        "req_per_s": len(ok) / span,
        "span_s": span,
        "per_worker": workers,
        "errors": sorted({r.error for r in results if not r.ok and r.error})[:5],
    }


async def e2e(a: argparse.Namespace) -> dict[str, Any]:
    from aiohttp import web

    from kvroute.bench.loadgen import LoadgenConfig, run_load
    from kvroute.bench.workloads import build
    from kvroute.router.app import create_app
    from kvroute.router.config import RouterConfig

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
        "--num-engines",
        str(a.num_engines),
        "--page-size",
        str(a.page_size),
        "--num-pages",
        str(a.pages),
        "--max-batch-tokens",
        str(a.max_batch_tokens),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        assert proc.stdout is not None
        t0 = time.monotonic()
        line = await asyncio.to_thread(proc.stdout.readline)
        if not line:
            raise RuntimeError(f"engines exited ({proc.wait()}) before serving")
        engines = json.loads(line)["engines"]
        start_s = time.monotonic() - t0
        urls = [e["url"] for e in engines]
        for u in urls:
            await _wait_ok(u + "/health", 60)
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
        # Warm up every engine (Triton compiles, allocator) with throwaway prompts, then flush.
        for u in urls:
            for n in (a.context + a.question, 300):
                await _http(
                    "POST",
                    u + "/generate",
                    json={
                        "input_ids": [(i * 7) % 250 + 1 for i in range(n)],
                        "sampling_params": {"max_new_tokens": 8, "ignore_eos": True},
                    },
                )
        out: dict[str, Any] = {
            "engines": engines,
            "engine_start_s": start_s,
            "workload": wl.params,
            "model": a.model_config,
            "pages_per_engine": a.pages,
            "policies": {},
        }
        for label in a.policies.split(","):
            # "name" or "name@key=value;key=value" (policy parameters, typed by the policy).
            policy, _, params = label.partition("@")
            pparams = tuple(tuple(kv.split("=", 1)) for kv in params.split(";") if kv)
            for u in urls:
                await _http("POST", u + "/flush_cache")
            cfg = RouterConfig(
                port=0,
                worker_urls=tuple(urls),
                policy=policy,
                block_size=a.page_size,
                policy_params=pparams,  # type: ignore[arg-type]
                kv_events=tuple((e["url"], e["kv_events"]) for e in engines),
                load_poll_interval_s=1.0,
                health_check_interval_s=5.0,
            )
            runner = web.AppRunner(create_app(cfg), access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            rurl = f"http://127.0.0.1:{runner.addresses[0][1]}"
            try:
                await _wait_ok(rurl + "/readiness", 30)
                await asyncio.sleep(1.0)  # let event subscriptions connect (PUB drops before that)
                lcfg = LoadgenConfig(
                    rurl, "generate", input_ids=False, label=label, progress=False, request_timeout_s=300.0
                )
                fname = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in label)
                res = await run_load(wl.requests, lcfg, OUT / f"gpu_e2e_{fname}.jsonl")
                out["policies"][label] = summarize(res)
            except Exception as exc:  # a policy not available yet must not hide the others
                out["policies"][label] = {"error": repr(exc)[:300]}
            finally:
                await runner.cleanup()
            print(label, json.dumps(out["policies"][label]), flush=True)
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sc = sub.add_parser("step-costs")
    sc.add_argument("--model-config", default="llama3-8b")
    sc.add_argument("--page-size", type=int, default=16)
    ee = sub.add_parser("e2e")
    ee.add_argument("--model-config", default="llama3-8b")
    ee.add_argument("--num-engines", type=int, default=4)
    ee.add_argument("--device", default="cuda")
    ee.add_argument("--page-size", type=int, default=16)
    ee.add_argument("--pages", type=int, default=1536, help="KV pages per engine (cache pressure)")
    ee.add_argument("--max-batch-tokens", type=int, default=8192)
    ee.add_argument(
        "--policies",
        default="round_robin,cache_aware,kv_aware",
        help="comma-separated; name@key=value;key=value passes policy parameters",
    )
    ee.add_argument("--groups", type=int, default=16)
    ee.add_argument("--users", type=int, default=8)
    ee.add_argument("--context", type=int, default=4096)
    ee.add_argument("--question", type=int, default=128)
    ee.add_argument("--output", type=int, default=32)
    ee.add_argument("--rate", type=float, default=4.0)
    ee.add_argument("--count", type=int, default=256)
    a = ap.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    if a.cmd == "step-costs":
        res = step_costs(a.model_config, a.page_size)
        (OUT / "gpu_step_costs.json").write_text(json.dumps(res, indent=1))
        print(
            f"{res['device']}, {res['model']}, page {res['page_size']}: measured step vs profile "
            f"({res['profile']})"
        )
        for r in res["rows"]:
            what = (
                f"decode {r['batch']:3d} x {r['context']:5d}"
                if r["kind"] == "decode"
                else f"prefill {r['new']:5d} new / {r['cached']:5d} cached"
            )
            print(f"  {what}: {r['ms']:8.2f} ms  profile {r['profile_ms']:8.2f} ms  x{r['ratio']:.2f}")
        return 0
    res = asyncio.run(e2e(a))
    (OUT / "gpu_e2e.json").write_text(json.dumps(res, indent=1))
    print(
        f"{a.num_engines} engines of {a.model_config}, {a.pages} pages x {a.page_size} each; "
        f"engines up in {res['engine_start_s']:.0f} s; workload {res['workload']}"
    )
    for pol, s in res["policies"].items():
        if "error" in s:
            print(f"  {pol:28s} ERROR {s['error']}")
            continue
        print(
            f"  {pol:28s} ok {s['ok']}/{s['total']}  TTFT mean {s['ttft_mean_s']:.3f} s  p99 "
            f"{s['ttft_p99_s']:.3f} s  hit {s['cache_hit_ratio']:.1%}  {s['output_tok_per_s']:.0f} tok/s  "
            f"{s['req_per_s']:.2f} req/s  {s['per_worker']}"
        )
    rr = res["policies"].get("round_robin", {})
    for pol, s in res["policies"].items():
        if pol != "round_robin" and rr.get("ttft_mean_s") and s.get("ttft_mean_s"):
            print(f"  {pol}: mean TTFT {rr['ttft_mean_s'] / s['ttft_mean_s']:.2f}x better than round_robin")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

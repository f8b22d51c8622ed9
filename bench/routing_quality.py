"""In-process routing quality: SimEngine fleet (real ZMQ KV events) + Router, bursty shared-prefix load."""
import asyncio, random, statistics, sys, time
sys.path.insert(0, "/work/main")
from router import Router
from router.types import Worker, WorkerState
from engines.core import GenerateRequest
from engines.sim.engine import SimConfig, SimEngine
from engines.sim.profiles import h100_llama3_8b

import os
SCALE = float(os.environ.get('SCALE', '0.1'))
DEBUG = False
N_WORKERS, N_TENANTS, PREFIX, SUFFIX, OUT = 4, 16, 3000, 100, 64
BURST, N_BURSTS, GAP_S = int(os.environ.get('BURST', '8')), int(os.environ.get('NB', '40')), float(os.environ.get('GAP', '0.25'))  # simulated seconds between bursts

async def run(policy: str, params: dict, seed: int) -> dict:
    rng = random.Random(seed)
    tenants = [[rng.randrange(1, 30000) for _ in range(PREFIX)] for _ in range(N_TENANTS)]
    engines, router = [], Router(block_size=16, policy=policy, policy_params=params)
    for i in range(N_WORKERS):
        e = SimEngine(SimConfig(time_scale=SCALE, kv_capacity_tokens=40_000, seed=i), h100_llama3_8b())
        await e.start(); engines.append(e)
        url = f"http://sim{i}"
        router.add_worker(Worker(url, state=WorkerState.HEALTHY))
        await router.subscribe(url, e._kv_info.endpoint)
    await asyncio.sleep(0.3)  # SUB sockets join
    ttft, cached, prompt = [], 0, 0
    per_worker = {f"http://sim{i}": 0 for i in range(N_WORKERS)}

    async def one(rid: str, ids: list[int]) -> None:
        nonlocal cached, prompt
        req = router.routing_request(input_ids=ids)
        d = router.select(req)
        per_worker[d.worker] += 1
        if DEBUG and rid.endswith(("-0", "-1", "-2")) and int(rid.split("-")[0]) % 10 == 5:
            print(rid, d.worker, d.reason, [(s.url[-4:], round(s.cost), s.cached_blocks, {k: round(v) for k, v in s.terms.items() if k in ("pending_prefill_blocks", "decode_load", "indexed_blocks", "inflight_blocks", "hot")}) for s in d.scores])
        t = router.on_routed(d, req)
        eng = engines[int(d.worker[-1])]
        t0 = time.monotonic(); first = True; last = None
        try:
            async for ch in eng.generate(GenerateRequest(rid=rid, input_ids=ids, max_new_tokens=OUT, ignore_eos=True)):
                if first and ch.token_ids:
                    ttft.append((time.monotonic() - t0) / SCALE); router.on_first_token(t); first = False
                last = ch
        finally:
            router.on_finished(t, cached_tokens=last.cached_tokens if last else None)
        cached += last.cached_tokens; prompt += last.prompt_tokens

    tasks = []
    for b in range(N_BURSTS):
        ten = rng.randrange(N_TENANTS)
        for k in range(BURST):
            ids = tenants[ten] + [rng.randrange(1, 30000) for _ in range(SUFFIX)]
            tasks.append(asyncio.create_task(one(f"{b}-{k}", ids)))
        await asyncio.sleep(GAP_S * SCALE)
    await asyncio.gather(*tasks)
    if DEBUG: print({u: (w["blocks"], w["event_batches"]) for u, w in router.index_stats()["workers"].items()})
    await router.close()
    for e in engines: await e.close()
    q = statistics.quantiles(ttft, n=100)
    return {"policy": policy + (f" {params}" if params else ""), "ttft_p50_ms": q[49] * 1e3, "ttft_p90_ms": q[89] * 1e3,
            "ttft_mean_ms": statistics.mean(ttft) * 1e3, "hit": cached / prompt, "spread": sorted(per_worker.values())}

async def main():
    import json
    configs = json.loads(sys.argv[1]) if len(sys.argv) > 1 else [["round_robin", {}], ["cache_aware", {}], ["kv_aware", {}]]
    for pol, params in configs:
        rs = [await run(pol, params, seed) for seed in (1, 2, 3, 4)]
        m = lambda k: statistics.mean(r[k] for r in rs)
        print(f"{rs[0]['policy']:55s} TTFT p50 {m('ttft_p50_ms'):6.1f} ms  p90 {m('ttft_p90_ms'):6.1f} ms  mean {m('ttft_mean_ms'):6.1f} ms  hit {m('hit'):.2f}", flush=True)
asyncio.run(main())

"""Routing quality in one process: a simulated fleet (real ZeroMQ KV events) behind the router library.

Tenants share long system prefixes; each arrival picks a tenant at random and sends `--burst` requests
at once (its prefix + a private suffix), `--gap` simulated seconds apart. Each router policy routes the
same seeded workload; the table gives TTFT on the engines' simulated clocks (arrival to first token,
host delays excluded; arrivals are paced on the wall clock, so a busy host still shifts them a little)
and the fleet's prefix-cache hit rate.
Two scenarios by default: bursts of 8, and a steady stream (bursts of 1 at the same request rate).

    .venv/bin/python bench/routing_quality.py
    .venv/bin/python bench/routing_quality.py --schedule-policy fcfs lpm --seeds 1 2
    .venv/bin/python bench/routing_quality.py --scenario burst8 --policies kv_aware --policy-params \\
        '{"kv_aware": {"overlap_weight": 2.0}}'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
from dataclasses import dataclass

from engines.core import GenerateRequest
from engines.sim.engine import SimConfig, SimEngine
from engines.sim.profiles import h100_llama3_8b
from engines.sim.schedule_policy import SCHEDULE_POLICIES
from router import Router
from router.types import Worker, WorkerState


@dataclass(frozen=True)
class Scenario:
    name: str
    burst: int
    """Requests per arrival (same tenant, sent together)."""
    arrivals: int
    gap_s: float
    """Simulated seconds between arrivals."""


SCENARIOS = {
    "burst8": Scenario("burst8", 8, 40, 0.25),
    "steady": Scenario("steady", 1, 320, 0.25 / 8),  # the same request rate, one at a time
}


@dataclass(frozen=True)
class Result:
    ttft_p50_ms: float
    ttft_p90_ms: float
    ttft_mean_ms: float
    hit: float
    spread: list[int]


async def wait_subscribed(router: Router, engines: list[SimEngine], urls: list[str], timeout: float) -> None:
    """ZeroMQ's slow joiner: flush each engine (an AllBlocksCleared batch) until the router has seen one."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pending = set(range(len(engines)))
    while pending:
        if loop.time() > deadline:
            raise TimeoutError(f"KV events of {[urls[i] for i in sorted(pending)]} never reached the router")
        for i in list(pending):
            st = router.worker_stats(urls[i])
            if st is not None and st.event_batches > 0:
                pending.discard(i)
            else:
                await engines[i].flush_cache()
        await asyncio.sleep(0.01)


async def run_once(args: argparse.Namespace, sc: Scenario, policy: str, sched: str, seed: int) -> Result:
    rng = random.Random(seed)
    tenants = [[rng.randrange(1, 30000) for _ in range(args.prefix)] for _ in range(args.tenants)]
    params = args.policy_params.get(policy, {})
    router = Router(block_size=16, policy=policy, policy_params=params)
    engines: list[SimEngine] = []
    urls = [f"http://sim{i}" for i in range(args.workers)]
    ttft: list[float] = []
    cached = prompt = 0
    per_worker = dict.fromkeys(urls, 0)
    try:
        for i, url in enumerate(urls):
            cfg = SimConfig(
                time_scale=args.scale,
                kv_capacity_tokens=args.kv_tokens,
                seed=i,
                schedule_policy=sched,  # type: ignore[arg-type]
            )
            e = SimEngine(cfg, h100_llama3_8b())
            engines.append(e)
            await e.start()
            router.add_worker(Worker(url, state=WorkerState.HEALTHY))
            info = e.facts.kv_events
            assert info is not None
            await router.subscribe(url, info.endpoint)
        await wait_subscribed(router, engines, urls, timeout=10.0)

        async def one(rid: str, ids: list[int]) -> None:
            nonlocal cached, prompt
            req = router.routing_request(input_ids=ids)
            d = router.select(req)
            per_worker[d.worker] += 1
            ticket = router.on_routed(d, req)
            eng = engines[urls.index(d.worker)]
            first, last = True, None
            try:
                gen = GenerateRequest(rid=rid, input_ids=ids, max_new_tokens=args.output, ignore_eos=True)
                async for ch in eng.generate(gen):
                    if first and ch.token_ids:
                        router.on_first_token(ticket)
                        first = False
                    last = ch
            finally:
                router.on_finished(ticket, cached_tokens=last.cached_tokens if last else None)
            assert last is not None
            rec_ttft = eng.records_by_rid[rid].ttft  # simulated seconds: host delays do not count
            assert rec_ttft is not None
            ttft.append(rec_ttft)
            cached += last.cached_tokens
            prompt += last.prompt_tokens

        tasks = []
        for b in range(sc.arrivals):
            ten = rng.randrange(args.tenants)
            for k in range(sc.burst):
                ids = tenants[ten] + [rng.randrange(1, 30000) for _ in range(args.suffix)]
                tasks.append(asyncio.create_task(one(f"{b}-{k}", ids)))
            await asyncio.sleep(sc.gap_s * args.scale)
        await asyncio.gather(*tasks)
    finally:
        await router.close()
        for e in engines:
            await e.close()
    q = statistics.quantiles(ttft, n=100)
    spread = sorted(per_worker.values())
    return Result(q[49] * 1e3, q[89] * 1e3, statistics.mean(ttft) * 1e3, cached / prompt, spread)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", nargs="+", choices=sorted(SCENARIOS), default=["burst8", "steady"])
    p.add_argument("--policies", nargs="+", default=["round_robin", "cache_aware", "kv_aware"])
    p.add_argument("--policy-params", type=json.loads, default={}, help='JSON: {"policy": {param: value}}')
    p.add_argument("--schedule-policy", nargs="+", choices=SCHEDULE_POLICIES, default=["fcfs"])
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4], help="results are averaged")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--tenants", type=int, default=16)
    p.add_argument("--prefix", type=int, default=3000, help="tokens shared by a tenant's requests")
    p.add_argument("--suffix", type=int, default=100, help="private tokens per request")
    p.add_argument("--output", type=int, default=64, help="tokens generated per request")
    p.add_argument("--kv-tokens", type=int, default=40_000, help="KV pool per engine (tokens)")
    p.add_argument("--scale", type=float, default=0.1, help="wall seconds per simulated second")
    return p


async def main(args: argparse.Namespace) -> None:
    head = f"{'scenario':9} {'sched':5} {'policy':14} {'TTFT p50':>9} {'p90':>9} {'mean':>9} {'hit':>5}"
    head += "  spread (requests per worker, seed 1)"
    print(head)
    print("-" * len(head))
    for name in args.scenario:
        sc = SCENARIOS[name]
        for sched in args.schedule_policy:
            for policy in args.policies:
                rs = [await run_once(args, sc, policy, sched, seed) for seed in args.seeds]

                def m(field: str, rs: list[Result] = rs) -> float:
                    return statistics.mean(getattr(r, field) for r in rs)

                print(
                    f"{name:9} {sched:5} {policy:14} {m('ttft_p50_ms'):6.1f} ms {m('ttft_p90_ms'):6.1f} ms "
                    f"{m('ttft_mean_ms'):6.1f} ms {m('hit'):5.2f}  {rs[0].spread}",
                    flush=True,
                )


if __name__ == "__main__":
    asyncio.run(main(build_parser().parse_args()))

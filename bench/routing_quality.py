"""Routing quality in one process: a simulated fleet (real ZeroMQ KV events) behind the router library.

Tenants share long system prefixes; each arrival picks a tenant at random and sends `--burst` requests
at once (its prefix + a private suffix), `--gap` simulated seconds apart. Each router policy routes the
same seeded workload; the table gives TTFT on the engines' simulated clocks (arrival to first token,
host delays excluded; arrivals are paced on the wall clock, so a busy host still shifts them a little)
and the fleet's prefix-cache hit rate.
Two scenarios by default: bursts of 8, and a steady stream (bursts of 1 at the same request rate).

`--scenario mooncake` replays a contiguous slice of the Mooncake conversation trace (bench/workloads)
on an 8-engine fleet sized like `kvroute.bench.compare` (working set > one engine's KV, within the
fleet's), on
a *virtual clock*: the asyncio loop's time jumps to the next timer when nothing is runnable, so the
run is deterministic, independent of host load, and ~30x faster than real time; KV events go straight
from each engine's step to `Router.apply_kv_events` after `--event-delay` simulated seconds (no
ZeroMQ), and engine loads are polled every `--poll` simulated seconds, as the HTTP router does. The
table adds the prefix-reuse ceiling, each policy's share of it, TTFT p99 and max/mean requests per
worker (the targets of issue 5). `--clock virtual` runs the burst scenarios the same way.

    .venv/bin/python bench/routing_quality.py --scenario mooncake \
        --policies round_robin least_load cache_aware kv_aware
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
import selectors
import statistics
import time
import types
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import kvroute.engines.sim.engine as sim_engine_module
from kvroute import Router
from kvroute.bench.workloads import Request, Workload, mooncake
from kvroute.bench.workloads.ceiling import prefix_reuse_ceiling
from kvroute.cache_index.events import KvEventBatch
from kvroute.engines.core import GenerateRequest
from kvroute.engines.prefix_cache import default_page_hasher
from kvroute.engines.sim.engine import SimConfig, SimEngine
from kvroute.engines.sim.kv_notes import notes_to_events
from kvroute.engines.sim.profiles import h100_llama3_8b
from kvroute.engines.sim.schedule_policy import SCHEDULE_POLICIES
from kvroute.router.types import Worker, WorkerState


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
MOONCAKE = "mooncake"


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


@dataclass
class _Tally:
    """One run's outcomes: simulated TTFTs, the fleet's cached/prompt tokens, requests per worker."""

    per_worker: dict[str, int]
    ttft: list[float] = field(default_factory=list)
    cached: int = 0
    prompt: int = 0

    async def serve(
        self, router: Router, by_url: Mapping[str, SimEngine], rid: str, ids: list[int], max_new: int
    ) -> None:
        """Route one prompt with the library router, run it on the chosen engine, report back to the
        router as the HTTP proxy would (routed, first token, finished), and count the outcome."""
        req = router.routing_request(input_ids=ids)
        d = router.select(req)
        self.per_worker[d.worker] += 1
        ticket = router.on_routed(d, req)
        eng = by_url[d.worker]
        first, last = True, None
        try:
            gen = GenerateRequest(rid=rid, input_ids=ids, max_new_tokens=max_new, ignore_eos=True)
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
        self.ttft.append(rec_ttft)
        self.cached += last.cached_tokens
        self.prompt += last.prompt_tokens


async def run_once(args: argparse.Namespace, sc: Scenario, policy: str, sched: str, seed: int) -> Result:
    rng = random.Random(seed)
    tenants = [[rng.randrange(1, 30000) for _ in range(args.prefix)] for _ in range(args.tenants)]
    params = args.policy_params.get(policy, {})
    router = Router(block_size=16, policy=policy, policy_params=params)
    engines: list[SimEngine] = []
    urls = [f"http://sim{i}" for i in range(args.workers)]
    tally = _Tally(dict.fromkeys(urls, 0))
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

        by_url = dict(zip(urls, engines, strict=True))
        tasks = []
        for b in range(sc.arrivals):
            ten = rng.randrange(args.tenants)
            for k in range(sc.burst):
                ids = tenants[ten] + [rng.randrange(1, 30000) for _ in range(args.suffix)]
                tasks.append(asyncio.create_task(tally.serve(router, by_url, f"{b}-{k}", ids, args.output)))
            await asyncio.sleep(sc.gap_s * args.scale)
        await asyncio.gather(*tasks)
    finally:
        await router.close()
        for e in engines:
            await e.close()
    q = statistics.quantiles(tally.ttft, n=100)
    spread = sorted(tally.per_worker.values())
    hit = tally.cached / tally.prompt
    return Result(q[49] * 1e3, q[89] * 1e3, statistics.mean(tally.ttft) * 1e3, hit, spread)


# ---- virtual clock ----------------------------------------------------------------------------------


class _JumpingSelector(selectors.DefaultSelector):
    """Polls real I/O without blocking; when the loop would sleep, advances the virtual clock instead."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:  # nothing scheduled: only real I/O can wake us
            return super().select(None)
        self.now += timeout
        return []


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose `time()` is virtual: sleeps cost no wall time, CPU work costs no loop time."""

    def __init__(self) -> None:
        self._jumping = _JumpingSelector()
        super().__init__(self._jumping)

    def time(self) -> float:
        return self._jumping.now


@contextmanager
def virtual_clock() -> Iterator[VirtualClockLoop]:
    """A fresh virtual-clock loop, with the simulator's wall clock (`time.monotonic`) mapped onto it."""
    loop = VirtualClockLoop()
    saved = sim_engine_module.time
    sim_engine_module.time = types.SimpleNamespace(monotonic=loop.time, time=time.time)  # type: ignore[assignment]
    try:
        yield loop
    finally:
        sim_engine_module.time = saved
        loop.close()


@dataclass(frozen=True)
class FleetSpec:
    workers: int
    page_size: int
    kv_tokens: int
    schedule_policy: str
    event_delay_s: float
    poll_s: float


@dataclass(frozen=True)
class RunStats:
    hit: float
    ttft: list[float]
    per_worker: list[int]

    def row(self, name: str, ceiling: float) -> str:
        t = sorted(self.ttft)
        mean_w = statistics.mean(self.per_worker)

        def q(p: float) -> float:
            return t[min(len(t) - 1, round(p * (len(t) - 1)))]

        return (
            f"| {name} | {self.hit:.3f} | {self.hit / ceiling:.0%} | {statistics.mean(t):.3f} | "
            f"{q(0.5):.3f} | {q(0.99):.3f} | {max(self.per_worker) / mean_w:.2f} |"
        )


async def replay_virtual(
    requests: Sequence[Request], policy: str, params: dict[str, Any], fleet: FleetSpec
) -> RunStats:
    """Replay `requests` open-loop (arrival times in simulated seconds) through the router library in
    front of `fleet`; runs inside a `VirtualClockLoop`. TTFT from the engines' records."""
    loop = asyncio.get_running_loop()
    router = Router(block_size=fleet.page_size, policy=policy, policy_params=params, clock=loop.time)
    urls = [f"http://sim{i}" for i in range(fleet.workers)]
    engines: list[SimEngine] = []
    for i, url in enumerate(urls):
        cfg = SimConfig(
            time_scale=1.0,
            kv_capacity_tokens=fleet.kv_tokens,
            page_size=fleet.page_size,
            kv_events=False,  # no ZeroMQ: the step's notes go to the router directly (below)
            seed=i,
            schedule_policy=fleet.schedule_policy,  # type: ignore[arg-type]
        )
        e = SimEngine(cfg, h100_llama3_8b())
        e.cache.record_events = True
        e.cache._hasher = default_page_hasher()

        def publish(e: SimEngine = e, url: str = url) -> None:
            notes = e.cache.take_events()
            if notes:
                batch = KvEventBatch(ts=0.0, events=tuple(notes_to_events(notes, fleet.page_size, False)))
                loop.call_later(fleet.event_delay_s, router.apply_kv_events, url, batch)

        e._publish = publish  # type: ignore[method-assign]
        await e.start()
        engines.append(e)
        ps, kv = fleet.page_size, fleet.kv_tokens
        router.add_worker(Worker(url, state=WorkerState.HEALTHY, page_size=ps, max_total_tokens=kv))
    by_url = dict(zip(urls, engines, strict=True))
    tally = _Tally(dict.fromkeys(urls, 0))

    async def poll() -> None:
        while True:
            await asyncio.sleep(fleet.poll_s)
            for url, e in by_url.items():
                ld = e.load()
                router.update_engine_load(url, ld.num_running_reqs, ld.num_waiting_reqs, ld.token_usage)

    poller = loop.create_task(poll()) if fleet.poll_s > 0 else None
    tasks = []
    try:
        t0 = loop.time()
        for r in requests:
            delay = t0 + r.arrival_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(loop.create_task(tally.serve(router, by_url, r.rid, r.token_ids(), r.output_tokens)))
        await asyncio.gather(*tasks)
    finally:
        if poller is not None:
            poller.cancel()
        for e in engines:
            await e.close()
        await router.close()
    return RunStats(tally.cached / tally.prompt, tally.ttft, list(tally.per_worker.values()))


def burst_workload(sc: Scenario, args: argparse.Namespace, seed: int) -> Workload:
    """The burst scenario's requests, for the virtual clock (same shape as `run_once`'s)."""
    rng = random.Random(seed)
    tenants = [[rng.randrange(1, 30000) for _ in range(args.prefix)] for _ in range(args.tenants)]
    reqs = []
    for b in range(sc.arrivals):
        ten = rng.randrange(args.tenants)
        for k in range(sc.burst):
            # ASCII letters: one byte = one token, as `Request` requires
            text = "".join(chr(65 + t % 26) for t in tenants[ten])
            text += "".join(chr(97 + rng.randrange(26)) for _ in range(args.suffix))
            reqs.append(Request(f"{b}-{k}", b * sc.gap_s, text, args.output))
    return Workload(sc.name, tuple(reqs))


def run_virtual(
    requests: Sequence[Request], policy: str, params: dict[str, Any], fleet: FleetSpec
) -> RunStats:
    with virtual_clock() as loop:
        return loop.run_until_complete(replay_virtual(requests, policy, params, fleet))


def virtual_burst(args: argparse.Namespace, sc: Scenario, policy: str, sched: str, seed: int) -> Result:
    """One burst-scenario run on the virtual clock (in a worker thread: `main` holds a running loop)."""
    import concurrent.futures

    fleet = FleetSpec(args.workers, args.page_size or 16, args.kv_tokens, sched, args.event_delay, args.poll)
    reqs = burst_workload(sc, args, seed).requests
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        st = ex.submit(run_virtual, reqs, policy, args.policy_params.get(policy, {}), fleet).result()
    q = statistics.quantiles(st.ttft, n=100)
    return Result(q[49] * 1e3, q[89] * 1e3, statistics.mean(st.ttft) * 1e3, st.hit, sorted(st.per_worker))


def main_mooncake(args: argparse.Namespace) -> None:
    from kvroute.bench.compare import size_capacity  # the comparison's fleet sizing, so results agree

    wl = mooncake.load(
        start=args.start, count=args.count, rate_factor=args.rate, output_scale=args.output_scale
    )
    page = args.page_size or 64
    kv = size_capacity(wl, args.mc_workers, page)
    ceiling = prefix_reuse_ceiling(wl.requests, page).ratio
    fleet = FleetSpec(args.mc_workers, page, kv, args.schedule_policy[0], args.event_delay, args.poll)
    print(
        f"Mooncake conversation trace [{args.start}, {args.start + len(wl.requests)}), rate x{args.rate:g}, "
        f"output x{args.output_scale:g}; {fleet.workers} engines h100-llama3-8b, page {page}, "
        f"KV {kv:,} tokens each, {fleet.schedule_policy}; ceiling {ceiling:.3f}; TTFT in simulated s"
    )
    print("| policy | hit | of ceiling | TTFT mean | p50 | p99 | req/worker max/mean |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for policy in args.policies:
        w0 = time.perf_counter()
        st = run_virtual(wl.requests, policy, args.policy_params.get(policy, {}), fleet)
        print(st.row(policy, ceiling) + f" <!-- {time.perf_counter() - w0:.0f} s wall -->", flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--scenario", nargs="+", choices=[*sorted(SCENARIOS), MOONCAKE], default=["burst8", "steady"]
    )
    p.add_argument("--clock", choices=["wall", "virtual"], default="wall", help="burst scenarios' clock")
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
    g = p.add_argument_group("mooncake (virtual clock)")
    g.add_argument("--start", type=int, default=0, help="first request of the trace slice")
    g.add_argument("--count", type=int, default=2000, help="slice length")
    g.add_argument("--rate", type=float, default=2.5, help="arrival rate factor")
    g.add_argument("--output-scale", type=float, default=0.25, help="multiply output lengths")
    g.add_argument("--mc-workers", type=int, default=8)
    g.add_argument("--page-size", type=int, default=0, help="0: 64 for mooncake, 16 for the bursts")
    g.add_argument("--event-delay", type=float, default=0.005, help="KV event latency, simulated s")
    g.add_argument("--poll", type=float, default=16.0, help="engine load poll period, simulated s")
    return p


async def main(args: argparse.Namespace) -> None:
    head = f"{'scenario':9} {'sched':5} {'policy':14} {'TTFT p50':>9} {'p90':>9} {'mean':>9} {'hit':>5}"
    head += "  spread (requests per worker, seed 1)"
    print(head)
    print("-" * len(head))
    for name in args.scenario:
        if name == MOONCAKE:  # run by `run` outside this loop (it owns a virtual-clock loop)
            continue
        sc = SCENARIOS[name]
        for sched in args.schedule_policy:
            for policy in args.policies:
                if args.clock == "virtual":
                    rs = [virtual_burst(args, sc, policy, sched, seed) for seed in args.seeds]
                else:
                    rs = [await run_once(args, sc, policy, sched, seed) for seed in args.seeds]

                def m(field: str, rs: list[Result] = rs) -> float:
                    return statistics.mean(getattr(r, field) for r in rs)

                print(
                    f"{name:9} {sched:5} {policy:14} {m('ttft_p50_ms'):6.1f} ms {m('ttft_p90_ms'):6.1f} ms "
                    f"{m('ttft_mean_ms'):6.1f} ms {m('hit'):5.2f}  {rs[0].spread}",
                    flush=True,
                )


def run(args: argparse.Namespace) -> None:
    if MOONCAKE in args.scenario:
        main_mooncake(args)
    if any(name != MOONCAKE for name in args.scenario):
        asyncio.run(main(args))


if __name__ == "__main__":
    run(build_parser().parse_args())

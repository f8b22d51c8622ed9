"""`kvroute demo`: a simulated fleet and the router in one process, round_robin vs kv_aware.

The load: requests sharing one of `groups` long prefixes (system prompts / documents) plus a unique
question, arriving open-loop (Poisson) at `rate` per second for `duration` seconds per policy.
The working set (groups x prefix) is larger than one engine's KV pool but fits in the fleet's, the
case where routing decides the hit rate. Caches are flushed between policies. Reported per policy:
client-side TTFT (mean, p99), the engines' own cache-hit ratio (cached_tokens / prompt_tokens) and
requests per worker (max / mean).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp
import orjson
from aiohttp import web

from kvroute.router.config import RouterConfig


@dataclass(frozen=True)
class DemoConfig:
    workers: int = 4  # simulated engines
    policies: tuple[str, ...] = ("round_robin", "kv_aware")
    duration_s: float = 20.0  # seconds of load per policy
    rate: float = 16.0  # requests per second (Poisson arrivals)
    groups: int = 32  # distinct shared prefixes
    prefix_tokens: int = 2048  # tokens of each shared prefix (byte tokenizer: 1 char = 1 token)
    question_tokens: int = 48  # unique tokens after the prefix
    output_tokens: int = 16  # max_new_tokens, streamed
    kv_capacity_tokens: int = 32768  # per engine; 0 = the profile's
    profile: str = "h100-llama3-8b"
    time_scale: float = 1.0  # wall seconds per simulated second
    max_in_flight: int = 512  # open-loop cap: arrivals beyond it are counted as dropped
    seed: int = 0


@dataclass
class PolicyResult:
    policy: str
    ttft_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    per_worker: Counter[str] = field(default_factory=Counter)
    errors: int = 0
    dropped: int = 0
    wall_s: float = 0.0

    def row(self, workers: int) -> str:
        t = sorted(self.ttft_s)
        mean = sum(t) / len(t) if t else math.nan
        p99 = t[min(len(t) - 1, int(0.99 * len(t)))] if t else math.nan
        hit = self.cached_tokens / self.prompt_tokens if self.prompt_tokens else math.nan
        counts = [self.per_worker.get(w, 0) for w in self.per_worker] + [0] * max(
            0, workers - len(self.per_worker)
        )
        wmax = max(counts) if counts else 0
        wmean = sum(counts) / workers if workers else 0.0
        return (
            f"{self.policy:<12} {len(t):>5} {self.errors + self.dropped:>4} {mean * 1e3:>10.1f} "
            f"{p99 * 1e3:>10.1f} {hit * 100:>9.1f}% {wmax:>6} / {wmean:<6.1f}"
        )


HEADER = (
    f"{'policy':<12} {'reqs':>5} {'err':>4} {'TTFT mean':>10} {'TTFT p99':>10} {'cache hit':>10} "
    "req/worker max/mean"
)
UNITS = f"{'':<12} {'':>5} {'':>4} {'(ms)':>10} {'(ms)':>10} {'(engine)':>10}"


def _text(rng: random.Random, n: int, alphabet: str) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


async def _one(session: aiohttp.ClientSession, url: str, body: bytes, res: PolicyResult) -> None:
    t0 = time.perf_counter()
    try:
        async with session.post(
            url + "/generate", data=body, headers={"Content-Type": "application/json"}
        ) as resp:
            if resp.status != 200:
                res.errors += 1
                await resp.read()
                return
            first: float | None = None
            last = b""
            buf = b""
            async for chunk in resp.content.iter_any():
                if first is None:
                    first = time.perf_counter()
                buf += chunk
                *events, buf = buf.split(b"\n\n")
                for ev in events:
                    if ev.startswith(b"data: ") and ev != b"data: [DONE]":
                        last = ev[6:]
            if first is None or not last:
                res.errors += 1
                return
            meta = orjson.loads(last).get("meta_info", {})
            res.ttft_s.append(first - t0)
            res.prompt_tokens += int(meta.get("prompt_tokens") or 0)
            res.cached_tokens += int(meta.get("cached_tokens") or 0)
            res.per_worker[resp.headers.get("X-Kvroute-Worker", "?")] += 1
    except (aiohttp.ClientError, TimeoutError, ValueError):
        res.errors += 1


async def run_load(
    session: aiohttp.ClientSession, url: str, policy: str, cfg: DemoConfig, prefixes: list[str]
) -> PolicyResult:
    """Open-loop Poisson arrivals for `duration_s`; waits for the stragglers (bounded by a timeout)."""
    rng = random.Random(cfg.seed + 1)  # same arrival times and prompts for every policy
    res = PolicyResult(policy)
    tasks: set[asyncio.Task[None]] = set()
    start = time.perf_counter()
    t_next = 0.0
    n = 0
    while True:
        t_next += rng.expovariate(cfg.rate)
        if t_next >= cfg.duration_s:
            break
        delay = start + t_next - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        g = rng.randrange(len(prefixes))
        text = prefixes[g] + f" q{n} " + _text(rng, cfg.question_tokens, "0123456789")
        n += 1
        if len(tasks) >= cfg.max_in_flight:
            res.dropped += 1
            continue
        body = orjson.dumps(
            {
                "text": text,
                "stream": True,
                "rid": f"{policy}-{n}",
                "sampling_params": {"max_new_tokens": cfg.output_tokens, "ignore_eos": True},
            }
        )
        task = asyncio.create_task(_one(session, url, body, res))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        done, pending = await asyncio.wait(tasks, timeout=60)
        for t in pending:
            t.cancel()
            res.errors += 1
        await asyncio.gather(*pending, return_exceptions=True)
    res.wall_s = time.perf_counter() - start
    return res


async def _get_json(session: aiohttp.ClientSession, url: str) -> dict:  # type: ignore[type-arg]
    async with session.get(url) as resp:
        return await resp.json()  # type: ignore[no-any-return]


async def _wait(pred_coro, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not await pred_coro():
        if time.monotonic() > deadline:
            raise RuntimeError(f"demo: timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def run_demo(cfg: DemoConfig, out=print) -> list[PolicyResult]:  # type: ignore[no-untyped-def]
    from kvroute.engines.sim.fleet import SimFleet
    from kvroute.router.app import create_app

    rng = random.Random(cfg.seed)
    prefixes = [_text(rng, cfg.prefix_tokens, "abcdefghijklmnopqrstuvwxyz ") for _ in range(cfg.groups)]
    results: list[PolicyResult] = []
    async with SimFleet(
        workers=cfg.workers,
        profile=cfg.profile,
        time_scale=cfg.time_scale,
        kv_capacity_tokens=cfg.kv_capacity_tokens or None,
        seed=cfg.seed,
    ) as fleet:
        config = RouterConfig(
            port=0,
            worker_urls=tuple(fleet.urls),
            policy=cfg.policies[0],
            health_check_interval_s=5,
            load_poll_interval_s=5,
            blind_check_interval_s=0,
            max_body_bytes=64 * 1024 * 1024,
        )
        runner = web.AppRunner(create_app(config), handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        url = f"http://{host}:{port}"
        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

                async def all_healthy() -> bool:
                    ws = (await _get_json(s, url + "/admin/workers"))["workers"]
                    ready = sum(w["state"] == "healthy" and w["kv_events_subscribed"] for w in ws)
                    return bool(ready == cfg.workers)

                await _wait(all_healthy, 30, "workers to register")
                out(
                    f"fleet: {cfg.workers} simulated engines ({fleet.profile.name}, KV pool "
                    f"{fleet.engines[0].capacity} tokens each), router {url}"
                )
                out(
                    f"load: {cfg.rate:g} req/s for {cfg.duration_s:g} s per policy; {cfg.groups} shared "
                    f"prefixes of {cfg.prefix_tokens} tokens + {cfg.question_tokens} unique; "
                    f"{cfg.output_tokens} output tokens"
                )
                for policy in cfg.policies:
                    async with s.put(url + "/admin/policy", json={"name": policy}) as resp:
                        if resp.status != 200:
                            raise RuntimeError(f"demo: cannot set policy {policy}: {await resp.text()}")
                    async with s.post(url + "/flush_cache") as resp:
                        await resp.read()

                    async def index_empty() -> bool:
                        stats = await _get_json(s, url + "/admin/index")
                        return all(w["blocks"] == 0 for w in stats["workers"].values())

                    await _wait(index_empty, 10, "caches to flush")
                    out(f"running {policy} ...")
                    results.append(await run_load(s, url, policy, cfg, prefixes))
        finally:
            await runner.cleanup()
    out("")
    out(HEADER)
    out(UNITS)
    for r in results:
        out(r.row(cfg.workers))
    return results


def build_parser() -> argparse.ArgumentParser:
    d = DemoConfig()
    p = argparse.ArgumentParser(prog="kvroute demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--duration", type=float, default=d.duration_s, help="seconds of load per policy")
    p.add_argument("--rate", type=float, default=d.rate, help="requests per second")
    p.add_argument("--groups", type=int, default=d.groups, help="distinct shared prefixes")
    p.add_argument("--prefix-tokens", type=int, default=d.prefix_tokens)
    p.add_argument("--output-tokens", type=int, default=d.output_tokens)
    p.add_argument(
        "--kv-capacity-tokens", type=int, default=d.kv_capacity_tokens, help="per engine; 0: profile's"
    )
    p.add_argument("--profile", default=d.profile)
    p.add_argument("--time-scale", type=float, default=d.time_scale)
    p.add_argument("--policies", default=",".join(d.policies), help="comma-separated")
    p.add_argument("--seed", type=int, default=d.seed)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    cfg = DemoConfig(
        workers=a.workers,
        duration_s=a.duration,
        rate=a.rate,
        groups=a.groups,
        prefix_tokens=a.prefix_tokens,
        output_tokens=a.output_tokens,
        kv_capacity_tokens=a.kv_capacity_tokens,
        profile=a.profile,
        time_scale=a.time_scale,
        policies=tuple(p for p in a.policies.split(",") if p),
        seed=a.seed,
    )
    from kvroute.router.cli import run_async

    try:
        run_async(run_demo(cfg))
    except (RuntimeError, ValueError) as exc:
        print(f"kvroute demo: {exc}", file=sys.stderr)
        return 1
    return 0

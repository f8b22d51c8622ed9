"""Router library overhead per request: tokenize+hash, select, and the ticket life cycle, per policy.

The index is filled through `apply_kv_events` (no network): `--prefixes` shared system prefixes of 4096
tokens, each held by 4 workers with a private 4096-token tail. `--inflight` requests hold load tickets
while `--requests` more are measured one by one. Figures are wall-clock percentiles on this host.

    .venv/bin/python bench/router_library.py
    .venv/bin/python bench/router_library.py --workers 16 64 256 --prompt-tokens 2048
"""

from __future__ import annotations

import argparse
import itertools
import random
import time

from kvroute import Router
from kvroute.cache_index.events import BlockStored, KvEventBatch
from kvroute.router.types import Worker, WorkerState

BLOCK = 16
PREFIX = 4096


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[int(p * (len(s) - 1))]


def fill(router: Router, workers: int, prefixes: list[list[int]], rng: random.Random) -> None:
    """Each prefix (+ a private tail) is held by 4 consecutive workers, as BlockStored chains."""
    eid = itertools.count(1)
    for p_i, pre in enumerate(prefixes):
        for k in range(4):
            url = f"http://w{(p_i * 4 + k) % workers}"
            toks = pre + [rng.randrange(50000) for _ in range(PREFIX)]
            evs, parent = [], None
            for off in range(0, len(toks), BLOCK):
                h = next(eid)
                evs.append(BlockStored((h,), parent, tuple(toks[off : off + BLOCK]), BLOCK))
                parent = h
            router.apply_kv_events(url, KvEventBatch(0.0, tuple(evs)))


def measure(args: argparse.Namespace, policy: str, workers: int) -> tuple[dict[str, list[float]], int]:
    """Per-stage timings (seconds) and the index size in blocks."""
    rng = random.Random(args.seed)
    r = Router(block_size=BLOCK, policy=policy)
    for i in range(workers):
        r.add_worker(Worker(f"http://w{i}", state=WorkerState.HEALTHY))
    prefixes = [[rng.randrange(50000) for _ in range(PREFIX)] for _ in range(args.prefixes)]
    fill(r, workers, prefixes, rng)
    tail = max(0, args.prompt_tokens - PREFIX)
    prompts = [
        (prefixes[rng.randrange(len(prefixes))] + [rng.randrange(50000) for _ in range(tail)])[
            : args.prompt_tokens
        ]
        for _ in range(200)
    ]
    for i in range(args.inflight):  # tickets left open: the load the policies see
        req = r.routing_request(input_ids=prompts[i % len(prompts)])
        r.on_routed(r.select(req), req)
    out: dict[str, list[float]] = {"tokenize+hash": [], "select": [], "ticket life": []}
    for i in range(args.requests):
        ids = prompts[i % len(prompts)]
        a = time.perf_counter()
        req = r.routing_request(input_ids=ids)
        b = time.perf_counter()
        d = r.select(req)
        c = time.perf_counter()
        t = r.on_routed(d, req)
        r.on_first_token(t)
        r.on_finished(t, cached_tokens=0)
        e = time.perf_counter()
        out["tokenize+hash"].append(b - a)
        out["select"].append(c - b)
        out["ticket life"].append(e - c)
    return out, len(r.index)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", nargs="+", type=int, default=[64])
    p.add_argument("--policies", nargs="+", default=["kv_aware", "cache_aware", "round_robin"])
    p.add_argument("--prompt-tokens", type=int, default=8192)
    p.add_argument("--prefixes", type=int, default=32, help="shared 4096-token prefixes in the index")
    p.add_argument("--inflight", type=int, default=256, help="open tickets while measuring")
    p.add_argument("--requests", type=int, default=2000, help="measured requests per row")
    p.add_argument("--seed", type=int, default=0)
    return p


def us(xs: list[float], p: float) -> str:
    return f"{pct(xs, p) * 1e6:8.1f}"


def main(args: argparse.Namespace) -> None:
    head = (
        f"{'policy':12} {'workers':>7} {'blocks':>8} {'stage':14} {'p50 us':>8} {'p99 us':>8}"
        f"   (prompt {args.prompt_tokens} tokens, {args.inflight} in flight)"
    )
    print(head)
    print("-" * len(head))
    for workers in args.workers:
        for policy in args.policies:
            res, blocks = measure(args, policy, workers)
            for stage, xs in res.items():
                print(f"{policy:12} {workers:7d} {blocks:8d} {stage:14} {us(xs, 0.5)} {us(xs, 0.99)}")


if __name__ == "__main__":
    main(build_parser().parse_args())

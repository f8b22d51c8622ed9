"""Micro-benchmark of RadixIndex: match latency, event-apply rate and memory per stored block.

Workload: `--workers` engines, prompts of `--prompt-blocks` blocks (default 512 = 8k tokens in
16-token blocks) routed to workers until `--blocks` worker-blocks are stored. Prompts share
prefixes the way production traffic does: each of a few tenant groups has a system prompt
(32-128 blocks) served by a subset of workers, most prompts quote one of the group's documents
(64-256 blocks), some continue an earlier conversation (sharing 60-95% of it), the rest is unique.
Only the blocks a worker does not hold yet are stored, as an engine's ``BlockStored`` would, with
engine hashes equal on every worker as SGLang's are (`--distinct-engine-hashes`: the worst case).

Figures: `match` latency per kind of prompt (a repeat of a stored prompt: the deepest walk; a new
prompt of a known group: shared prefix then a miss; a miss) and for a mix of 50/40/10; `store` rate
for chains (one call per new run of blocks, as SGLang 0.5.23 merges pages) and one block per call
(as SGLang <= 0.5.10 publishes); memory as the process RSS growth over the build divided by the
worker-blocks stored (conservative: includes the workload's own prompt arrays, ~8 B/block).

Run: `.venv/bin/python bench/index_bench.py` (full) or `--quick` (smoke test, seconds).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import struct
import sys
import time
from array import array
from typing import cast

import xxhash

from kvroute.cache_index.hashing import BlockHash, EngineBlockHash
from kvroute.cache_index.radix import RadixIndex, StoredBlock

_PAIR = struct.Struct("<QQ")
_MASK63 = (1 << 63) - 1


def _chain(contents: array[int]) -> list[BlockHash]:
    """Chained xxh3-64 over block content ids (fresh int objects, as an event decoder makes)."""
    out: list[BlockHash] = []
    h = 0
    digest = xxhash.xxh3_64_intdigest
    pack = _PAIR.pack
    for c in contents:
        h = digest(pack(h, c))
        out.append(h)  # type: ignore[arg-type]  # a NewType call per block would cost more
    return out


def _engine_hash(h: int, salt: int = 0) -> EngineBlockHash:
    """A signed int64 standing for SGLang's truncated SHA-256 (a distinct object per event).

    SGLang hashes a page the same on every worker (salt 0); a nonzero per-worker salt models
    engines whose hashes disagree, the index's worst case for memory.
    """
    return cast(EngineBlockHash, (((h ^ salt) * 0x9E3779B97F4A7C15) & _MASK63) - (1 << 62))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Workload:
    """Prompts as compact content-id arrays (8 bytes a block, no int objects), drawn on demand."""

    def __init__(self, n_workers: int, prompt_blocks: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.prompt_blocks = prompt_blocks
        self.next_id = 1
        self.groups = []
        for _ in range(max(2, n_workers // 4)):
            system = self._ids(self.rng.randint(32, 128))
            docs = [self._ids(self.rng.randint(64, 256)) for _ in range(8)]
            served_by = self.rng.sample(range(n_workers), k=min(n_workers, 8))
            history: list[array[int]] = []
            self.groups.append((system, docs, served_by, history))

    def _ids(self, n: int) -> array[int]:
        a = array("q", range(self.next_id, self.next_id + n))
        self.next_id += n
        return a

    def prompt(self) -> tuple[int, array[int]]:
        """(worker, contents): a new prompt of a random group, routed to one of its workers."""
        rng = self.rng
        g = rng.randrange(len(self.groups))
        system, docs, served_by, history = self.groups[g]
        r = rng.random()
        if history and r < 0.3:  # next turn of an earlier conversation
            prev = rng.choice(history)
            body = prev[: int(self.prompt_blocks * rng.uniform(0.6, 0.95))]
        elif r < 0.8:  # quotes one of the group's documents
            body = system + rng.choice(docs)
        else:
            body = array("q", system)
        body = body[: self.prompt_blocks]
        p = body + self._ids(self.prompt_blocks - len(body))
        history.append(p)
        if len(history) > 16:
            history.pop(0)
        return rng.choice(served_by), p


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def run(
    n_blocks: int, n_workers: int, prompt_blocks: int, n_queries: int, seed: int, distinct_engine_hashes: bool
) -> dict[str, float]:
    wl = Workload(n_workers, prompt_blocks, seed)
    names = [f"http://10.0.{i // 250}.{i % 250}:30000" for i in range(n_workers)]
    gc.collect()
    rss0 = _rss_bytes()
    index = RadixIndex()
    store_ns = 0
    stored = 0
    perf = time.perf_counter_ns
    prompts: list[tuple[int, array[int]]] = []  # kept for queries: counted in the RSS figure (~8 B/block)
    while stored < n_blocks:
        w, contents = wl.prompt()
        prompts.append((w, contents))
        name = names[w]
        hashes = _chain(contents)
        # The engine only publishes blocks it did not have: skip the prefix the worker holds.
        i = 0
        while i < len(hashes) and index.holds(name, hashes[i]):
            i += 1
        if i == len(hashes):
            continue
        parent: BlockHash | None = hashes[i - 1] if i else None
        salt = w + 1 if distinct_engine_hashes else 0
        blocks = [StoredBlock(h, _engine_hash(h, salt)) for h in hashes[i:]]
        del hashes
        t0 = perf()
        index.store(name, parent, blocks)
        store_ns += perf() - t0
        stored += len(blocks)
        del blocks
    gc.collect()
    rss1 = _rss_bytes()
    worker_blocks = index.stats()["worker_blocks"]
    nodes = len(index)

    # One block per call, as SGLang <= 0.5.10 publishes (one BlockStored per page), into the same
    # index after the memory reading: ~100k more worker-blocks.
    single_ns = 0
    single_n = 0
    while single_n < max(1, n_blocks // 10):
        w, contents = wl.prompt()
        prompts.append((w, contents))
        name = names[w]
        calls: list[tuple[BlockHash | None, list[StoredBlock]]] = []
        parent = None
        for h in _chain(contents):
            if not index.holds(name, h):
                salt = w + 1 if distinct_engine_hashes else 0
                calls.append((parent, [StoredBlock(h, _engine_hash(h, salt))]))
            parent = h
        t0 = perf()
        for par, blk in calls:
            index.store(name, par, blk)
        single_ns += perf() - t0
        single_n += len(calls)

    # match: stored prompts (deep hits), fresh prompts of known groups (shared-prefix hits), misses.
    rng = random.Random(seed + 1)
    stored_q = [_chain(rng.choice(prompts)[1]) for _ in range(min(n_queries, 512))]
    fresh_q = [_chain(wl.prompt()[1]) for _ in range(64)]
    base = 1 << 50  # content ids no prompt uses
    miss_q = [
        _chain(array("q", range(base + k * prompt_blocks, base + (k + 1) * prompt_blocks))) for k in range(16)
    ]
    lat: dict[str, list[float]] = {"stored": [], "fresh": [], "miss": [], "walk": []}
    sink = 0
    for kind, qs in (("stored", stored_q), ("fresh", fresh_q), ("miss", miss_q)):
        for k in range(n_queries):
            q = qs[k % len(qs)]
            t0 = perf()
            res = index.match(q)
            lat[kind].append((perf() - t0) / 1000)
            sink += len(res)
    for k in range(n_queries):  # the block-by-block walk, for comparison
        q = stored_q[k % len(stored_q)]
        t0 = perf()
        res = index.match_walk(q)
        lat["walk"].append((perf() - t0) / 1000)
        sink += len(res)
    # The mix: half repeats of stored prompts, 40% new prompts sharing a prefix, 10% misses.
    mix = lat["stored"][: n_queries // 2] + lat["fresh"][: n_queries * 2 // 5]
    mix += lat["miss"][: n_queries // 10]
    busiest = max(names, key=index.block_count)
    busiest_blocks = index.block_count(busiest)
    t0 = perf()
    index.clear(busiest)  # AllBlocksCleared, or a lost event: walks the worker's blocks only
    clear_ms = (perf() - t0) / 1e6
    deep = max(max(index.match(q).values(), default=0) for q in stored_q[:50])
    return {
        "worker_blocks": worker_blocks,
        "nodes": nodes,
        "stored_via_store": stored,
        "store_rate": stored / (store_ns / 1e9),
        "store_rate_single": single_n / (single_ns / 1e9) if single_ns else 0.0,
        "bytes_per_block": (rss1 - rss0) / worker_blocks,
        "bytes_per_node": (rss1 - rss0) / nodes,
        "rss_mib": (rss1 - rss0) / 2**20,
        "p50_stored": _pct(lat["stored"], 0.5),
        "p99_stored": _pct(lat["stored"], 0.99),
        "p50_fresh": _pct(lat["fresh"], 0.5),
        "p99_fresh": _pct(lat["fresh"], 0.99),
        "p50_miss": _pct(lat["miss"], 0.5),
        "p50_walk": _pct(lat["walk"], 0.5),
        "p99_walk": _pct(lat["walk"], 0.99),
        "p50_mix": _pct(mix, 0.5),
        "p99_mix": _pct(mix, 0.99),
        "deepest_match": deep,
        "clear_ms": clear_ms,
        "clear_blocks": busiest_blocks,
        "mean_stored": statistics.fmean(lat["stored"]),
        "_sink": sink,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=1_000_000, help="worker-blocks to store")
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument("--prompt-blocks", type=int, default=512, help="blocks per prompt (8k tokens / 16)")
    ap.add_argument("--queries", type=int, default=2000, help="match calls per query kind")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--distinct-engine-hashes",
        action="store_true",
        help="every worker names a block with its own engine hash (memory worst case)",
    )
    ap.add_argument("--quick", action="store_true", help="small smoke run (seconds)")
    a = ap.parse_args(argv)
    if a.quick:
        a.blocks, a.workers, a.queries = min(a.blocks, 40_000), min(a.workers, 16), min(a.queries, 200)
    r = run(a.blocks, a.workers, a.prompt_blocks, a.queries, a.seed, a.distinct_engine_hashes)
    rows = [
        ("worker-blocks stored", f"{r['worker_blocks']:,}", ""),
        ("distinct blocks (nodes)", f"{r['nodes']:,}", ""),
        ("match p50, mix (us)", f"{r['p50_mix']:.1f}", "<= 50"),
        ("match p99, mix (us)", f"{r['p99_mix']:.1f}", "<= 200"),
        ("match p50 / p99, stored prompt (us)", f"{r['p50_stored']:.1f} / {r['p99_stored']:.1f}", ""),
        ("match p50 / p99, new prompt (us)", f"{r['p50_fresh']:.1f} / {r['p99_fresh']:.1f}", ""),
        ("match p50, miss (us)", f"{r['p50_miss']:.1f}", ""),
        ("match_walk p50 / p99, stored prompt (us)", f"{r['p50_walk']:.1f} / {r['p99_walk']:.1f}", ""),
        ("store, chains (blocks/s)", f"{r['store_rate']:,.0f}", ">= 500,000"),
        ("store, 1 block per call (blocks/s)", f"{r['store_rate_single']:,.0f}", ""),
        (f"clear one worker, {r['clear_blocks']:,.0f} blocks (ms)", f"{r['clear_ms']:.1f}", ""),
        ("RSS per worker-block (bytes)", f"{r['bytes_per_block']:.0f}", "<= 250"),
        ("RSS per distinct block (bytes)", f"{r['bytes_per_node']:.0f}", ""),
        ("index RSS (MiB)", f"{r['rss_mib']:.1f}", ""),
    ]
    load = os.getloadavg()[0]
    print(
        f"RadixIndex bench: {a.workers} workers, {a.prompt_blocks}-block prompts, "
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load {load:.1f}"
        f"{' (quick)' if a.quick else ''}"
    )
    w0 = max(len(k) for k, _, _ in rows)
    w1 = max(len(v) for _, v, _ in rows)
    print(f"{'metric':<{w0}}  {'value':>{w1}}  target")
    for k, v, t in rows:
        print(f"{k:<{w0}}  {v:>{w1}}  {t}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

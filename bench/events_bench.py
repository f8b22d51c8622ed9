"""Throughput of the KV-event path: decode (both wire forms), decode + apply into a RadixIndex, and
publisher -> zmq (tcp loopback) -> subscriber -> applier in one process.

Batches look like SGLang's: 16-token pages with SHA-256 chained engine hashes; the array form
(0.5.10) sends one BlockStored per page, the map form (0.5.23) merges a chain's pages into one event.
Each batch holds `--pages` stored pages plus a few removals, as one scheduler step does.

Run: `.venv/bin/python bench/events_bench.py` (or `--quick`).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

import msgspec

from kvroute.cache_index.apply import KvEventApplier
from kvroute.cache_index.events import BlockRemoved, BlockStored, KvEvent, decode_batch
from kvroute.cache_index.radix import RadixIndex
from kvroute.engines.kv_events import KvEventSubscriber
from kvroute.engines.kv_publisher import KvEventPublisher, PublisherForm, sglang_page_hash

PAGE = 16


def make_batches(n_batches: int, pages_per_batch: int, merged: bool, seed: int = 0) -> list[list[KvEvent]]:
    """Each batch stores one new chain of `pages_per_batch` pages and removes the oldest chain's last page."""
    rng = random.Random(seed)
    out: list[list[KvEvent]] = []
    chains: list[list[int]] = []
    for _ in range(n_batches):
        prior = None
        parent: int | None = None
        evs: list[KvEvent] = []
        hashes: list[int] = []
        tokens: list[int] = []
        for _ in range(pages_per_batch):
            page = [rng.randrange(150_000) for _ in range(PAGE)]
            prior, h = sglang_page_hash(page, prior)
            if merged:
                hashes.append(h)
                tokens.extend(page)
            else:
                evs.append(BlockStored((h,), parent, tuple(page), PAGE, None, "GPU"))
            parent = h
        if merged:
            evs.append(BlockStored(tuple(hashes), None, tuple(tokens), PAGE, None, "GPU"))
            chains.append(hashes)
        else:
            chains.append([e.block_hashes[0] for e in evs if isinstance(e, BlockStored)])
        if len(chains) > 4:
            old = chains.pop(0)
            evs.append(BlockRemoved((old[-1],), "GPU"))
        out.append(evs)
    return out


def bench_decode(payloads: list[bytes], n_events: int, n_pages: int, repeat: int) -> tuple[float, float]:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for p in payloads:
            decode_batch(p)
        best = min(best, time.perf_counter() - t0)
    return n_events / best, n_pages / best


def bench_raw(payloads: list[bytes], repeat: int) -> float:
    dec = msgspec.msgpack.Decoder()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for p in payloads:
            dec.decode(p)
        best = min(best, time.perf_counter() - t0)
    return best


def bench_apply(payloads: list[bytes], n_pages: int) -> float:
    index = RadixIndex()
    ap = KvEventApplier(index, block_size=PAGE)
    t0 = time.perf_counter()
    for p in payloads:
        ap.apply("w0", decode_batch(p))
    dt = time.perf_counter() - t0
    assert ap.stats.orphan == 0 and ap.stats.mismatch == 0, ap.stats
    return n_pages / dt


async def bench_wire(form: PublisherForm, batches: list[list[KvEvent]], n_pages: int) -> float:
    index = RadixIndex()
    ap = KvEventApplier(index, block_size=PAGE)
    got = 0

    def on_batch(worker: str, batch: object) -> None:
        nonlocal got
        got += 1
        ap.apply(worker, batch)  # type: ignore[arg-type]

    sub = KvEventSubscriber(on_batch, ap.forget)
    async with KvEventPublisher("tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0", form=form) as pub:
        await sub.add("w0", pub.endpoint, replay_endpoint=pub.replay_endpoint)
        while got == 0:  # slow joiner
            pub.publish([])
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        start = got
        t0 = time.perf_counter()
        for i, b in enumerate(batches):
            pub.publish(b)
            if i % 64 == 63:
                await asyncio.sleep(0)  # the engine side yields too
        while got < start + len(batches):
            await asyncio.sleep(0.001)
        dt = time.perf_counter() - t0
        st = sub.stats("w0")
        await sub.close()
    assert st["decode_errors"] == 0
    return n_pages / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", type=int, default=2000)
    ap.add_argument("--pages", type=int, default=32, help="stored pages per batch")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n_batches = 200 if args.quick else args.batches
    repeat = 2 if args.quick else 5
    print(f"{n_batches} batches x {args.pages} pages of {PAGE} tokens (+1 removal per batch)")
    print(f"{'form':<22}{'decode ev/s':>14}{'decode pages/s':>16}{'raw msgpack':>13}"
          f"{'decode+apply pages/s':>22}{'wire e2e pages/s':>18}")  # fmt: skip
    for label, form, merged in (
        ("array (0.5.10)", "array", False),
        ("map (0.5.23, merged)", "map", True),
        ("map, page per event", "map", False),
    ):
        batches = make_batches(n_batches, args.pages, merged)
        pub = KvEventPublisher("tcp://127.0.0.1:0", form=form)  # type: ignore[arg-type]
        payloads = [pub.encode(b) for b in batches]
        n_events = sum(len(b) for b in batches)
        n_pages = sum(len(e.block_hashes) for b in batches for e in b if isinstance(e, BlockStored))
        ev_s, pg_s = bench_decode(payloads, n_events, n_pages, repeat)
        raw = bench_raw(payloads, repeat)
        typed = n_events / ev_s
        apply_s = bench_apply(payloads, n_pages)
        wire = asyncio.run(bench_wire(form, batches, n_pages))  # type: ignore[arg-type]
        print(f"{label:<22}{ev_s:>14,.0f}{pg_s:>16,.0f}{typed / raw:>12.2f}x{apply_s:>22,.0f}{wire:>18,.0f}")
    print("raw msgpack = time of our typed decode / time of untyped msgspec decode of the same bytes")


if __name__ == "__main__":
    main()

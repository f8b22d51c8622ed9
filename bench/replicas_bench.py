"""Replica load sync cost: one sync round trip (publish own load, fold in peers') vs fleet size and replicas.

Run: .venv/bin/python bench/replicas.py  (starts a private redis-server on a free port).
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import statistics
import subprocess
import tempfile
import time

from kvroute.cache_index.hashing import BlockHash
from kvroute.engines.sim.fleet import free_port
from kvroute.router.shared import (
    LoadVector,
    RemoteLoadFolder,
    ReplicaConfig,
    ReplicaStateSync,
    RoutingRecordShare,
    connect,
)
from kvroute.router.types import Worker, WorkerState


async def bench(url: str, workers: int, replicas: int, rounds: int = 200) -> tuple[float, float, float]:
    cfg = ReplicaConfig(redis_url=url, key_prefix=f"bench{workers}x{replicas}", sync_interval_s=0.2)
    fleets = []
    clients = []
    syncs = []
    for r in range(replicas):
        ws = {
            f"http://10.0.{i // 250}.{i % 250}:30000": Worker(
                url=f"http://10.0.{i // 250}.{i % 250}:30000", state=WorkerState.HEALTHY
            )
            for i in range(workers)
        }
        for w in ws.values():
            w.load.in_flight, w.load.pending_prefill_tokens, w.load.active_blocks = 3, 2048, 400
        c = connect(url, 2.0)
        clients.append(c)
        fleets.append(ws)
        syncs.append(ReplicaStateSync(c, RemoteLoadFolder(ws.values), cfg, f"r{r}"))
    for s in syncs:
        assert await s.sync_once()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        assert await syncs[0].sync_once()
        times.append(time.perf_counter() - t0)
    # CPU-only part: local() + apply()
    folder = syncs[0].folder
    remote = {u: LoadVector(3 * (replicas - 1), 2048, 400) for u in fleets[0]}
    t0 = time.perf_counter()
    for _ in range(rounds):
        folder.local()
        folder.apply(remote)
    cpu = (time.perf_counter() - t0) / rounds
    for s in syncs:
        await s.close()
    for c in clients:
        await c.aclose()
    return statistics.median(times) * 1e3, sorted(times)[int(0.99 * len(times))] * 1e3, cpu * 1e3


async def bench_records(url: str, n: int = 20000, blocks: int = 64) -> float:
    cfg = ReplicaConfig(redis_url=url, key_prefix="benchrec")
    c = connect(url, 2.0)
    got = [0]
    a = RoutingRecordShare(c, lambda u, h: None, cfg, "a", max_buffer=n)
    b = RoutingRecordShare(c, lambda u, h: got.__setitem__(0, got[0] + 1), cfg, "b", read_count=100000)
    t0 = time.perf_counter()
    for i in range(n):
        a.record("http://10.0.0.1:30000", [BlockHash(i * 1000 + j) for j in range(blocks)])
    while a._buffer:
        await a.sync_once()
    while got[0] < n:
        await b.sync_once()
    dt = time.perf_counter() - t0
    await c.aclose()
    return n / dt


async def main() -> None:
    assert shutil.which("redis-server")
    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                d,
            ],
            stdout=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.02)
            url = f"redis://127.0.0.1:{port}/0"
            print("workers replicas  sync_p50_ms sync_p99_ms  fold_cpu_ms")
            for workers, replicas in ((16, 2), (100, 4), (500, 4), (1000, 8)):
                p50, p99, cpu = await bench(url, workers, replicas)
                print(f"{workers:7d} {replicas:8d}  {p50:11.2f} {p99:11.2f}  {cpu:11.3f}")
            rate = await bench_records(url)
            print(
                f"record stream: {rate:,.0f} records/s end to end (64-block prompts, one writer, one reader)"
            )
        finally:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    asyncio.run(main())

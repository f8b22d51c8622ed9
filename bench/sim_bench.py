"""How large a simulated fleet one simulator process drives on one core with event-loop lag p99 < 5 ms.

A control process (the same lag probe, no fleet) runs on the same CPU at the same time: its p99
("idle p99") is what the host alone costs, so a shared machine's noise can be told from the sim's.

The fleet (H100 Llama-3-8B profile, real time: time_scale 1) runs in a child process pinned to one
CPU, with a lag probe (a 10 ms timer; lag = how late it fires). This process, pinned to another CPU,
runs the load: per engine S concurrent streaming /v1/completions clients, each in a loop (a prompt
with a shared prefix, `--max-new` tokens, read every SSE event). For each fleet size it prints lag
percentiles and the streamed tokens/s, and the largest size whose p99 lag stays under the limit.

    .venv/bin/python bench/sim_bench.py                      # default sweep
    .venv/bin/python bench/sim_bench.py --engines 1 2 4 8 --streams 32 --seconds 8
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def pin(cpu: int) -> None:
    """Bind this process to one CPU (a negative cpu leaves placement to the OS)."""
    if hasattr(os, "sched_setaffinity") and 0 <= cpu < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {cpu})


# ---- child: the simulator process ----------------------------------------------------------------
async def serve(n: int, interval: float) -> None:
    """The fleet plus a lag probe; with n == 0 only the probe (the control: what the host alone costs)."""
    from kvroute.engines.sim.fleet import SimFleet

    lags: list[float] = []
    fleet = SimFleet(n, profile="h100-llama3-8b", time_scale=1.0, base_port=0) if n else None
    if fleet is not None:
        await fleet.start()
    try:
        print(json.dumps({"urls": fleet.urls if fleet else []}), flush=True)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_reader(sys.stdin.fileno(), stop.set)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        while not stop.is_set():
            t0 = time.perf_counter()  # not loop.time(): uvloop's clock has 1 ms steps
            await asyncio.sleep(interval)
            lags.append(time.perf_counter() - t0 - interval)
        loop.remove_reader(sys.stdin.fileno())
        cpu = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    finally:
        if fleet is not None:
            await fleet.close()
    print(json.dumps({"lags": lags, "cpu": cpu}), flush=True)


def _quantiles(lags: list[float], skip: float) -> tuple[float, float, float]:
    """(p50, p99, max) in ms, after dropping the warm-up fraction `skip` of the samples."""
    kept = sorted(lags[int(len(lags) * skip) :])
    if len(kept) < 3:
        return 0.0, 0.0, 0.0
    q = statistics.quantiles(kept, n=100)
    return q[49] * 1e3, q[98] * 1e3, kept[-1] * 1e3


# ---- parent: load and measurement -----------------------------------------------------------------
async def client(session: aiohttp.ClientSession, url: str, cid: int, max_new: int, stop: asyncio.Event,
                 counts: list[int]) -> None:  # fmt: skip
    prefix = "You are a helpful assistant. " * 16  # ~460 shared tokens: cache hits after the first request
    i = 0
    while not stop.is_set():
        prompt = f"{prefix} client {cid} turn {i}: " + "go " * 40
        body = {"prompt": prompt, "max_tokens": max_new, "stream": True}
        i += 1
        async with session.post(url + "/v1/completions", json=body) as r:
            async for data in r.content.iter_any():
                counts[0] += data.count(b"data: {")


async def load_child(spec: dict[str, Any]) -> None:
    """A client process: its share of the streams; prints the tokens streamed during the window."""
    stop = asyncio.Event()
    counts = [0]
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=None)) as s:
        tasks = [
            asyncio.create_task(client(s, url, cid, spec["max_new"], stop, counts))
            for url, cid in spec["streams"]
        ]
        await asyncio.sleep(spec["warmup"])
        c0, t0 = counts[0], time.perf_counter()
        await asyncio.sleep(spec["seconds"])
        c1, t1 = counts[0], time.perf_counter()
        print(json.dumps({"tokens_per_s": (c1 - c0) / (t1 - t0)}), flush=True)
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def run_size(args: argparse.Namespace, n: int) -> dict[str, float]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    pipe = asyncio.subprocess.PIPE
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--serve",
        str(n),
        "--cpu",
        str(args.sim_cpu),
        stdin=pipe,
        stdout=pipe,
        env=env,
    )
    ctl = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--serve", "0", "--cpu", str(args.sim_cpu), stdin=pipe, stdout=pipe, env=env
    )
    assert proc.stdout is not None and proc.stdin is not None
    assert ctl.stdout is not None and ctl.stdin is not None
    urls = json.loads(await proc.stdout.readline())["urls"]
    await ctl.stdout.readline()
    streams = [(url, k) for url in urls for k in range(args.streams)]
    k = max(1, min(args.client_procs, len(streams)))
    clients: list[asyncio.subprocess.Process] = []
    for i in range(k):
        spec = {
            "streams": streams[i::k],
            "max_new": args.max_new,
            "warmup": args.warmup,
            "seconds": args.seconds,
        }
        cpu = args.client_cpu + i
        clients.append(
            await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--load", json.dumps(spec), "--cpu", str(cpu), stdout=pipe, env=env
            )
        )
    tps = 0.0
    for c in clients:
        assert c.stdout is not None
        tps += json.loads(await c.stdout.readline())["tokens_per_s"]
    for p in (proc, ctl):
        assert p.stdin is not None
        p.stdin.write(b"stop\n")
        await p.stdin.drain()
    res = json.loads(await proc.stdout.readline())
    ctl_res = json.loads(await ctl.stdout.readline())
    await ctl.wait()
    for c in clients:
        await c.wait()
    await proc.wait()
    skip = args.warmup / (args.warmup + args.seconds)
    p50, p99, pmax = _quantiles(res["lags"], skip)
    _, ctl99, _ = _quantiles(ctl_res["lags"], skip)
    return {
        "engines": n,
        "streams_per_engine": args.streams,
        "concurrent_streams": n * args.streams,
        "tokens_per_s": tps,
        "lag_p50_ms": p50,
        "lag_p99_ms": p99,
        "lag_max_ms": pmax,
        "control_p99_ms": ctl99,
        "sim_cpu_fraction": res["cpu"],
    }


async def sweep(args: argparse.Namespace) -> None:
    pin(args.client_cpu)
    best = None
    print(
        f"# sim_bench: profile h100-llama3-8b, time_scale 1, {args.streams} streams/engine, "
        f"max_new {args.max_new}, {args.seconds:g} s per size, lag limit p99 < {args.limit_ms} ms"
    )
    cols = ("engines", "streams", "tok/s", "lag p50", "lag p99", "lag max", "sim cpu", "idle p99")
    print(" ".join(f"{c:>8}" for c in cols) + "  ok")
    for n in args.engines:
        r = await run_size(args, n)
        ok = r["lag_p99_ms"] < args.limit_ms
        vals = (
            f"{n}",
            f"{r['concurrent_streams']:.0f}",
            f"{r['tokens_per_s']:.0f}",
            f"{r['lag_p50_ms']:.2f}",
            f"{r['lag_p99_ms']:.2f}",
            f"{r['lag_max_ms']:.2f}",
            f"{r['sim_cpu_fraction']:.0%}",
            f"{r['control_p99_ms']:.2f}",
        )
        print(" ".join(f"{v:>8}" for v in vals) + ("  yes" if ok else "  NO"), flush=True)
        if ok:
            best = r
        elif args.stop_on_fail:
            break
    if best is None:
        print("# no size met the lag limit")
    else:
        b = best
        print(
            f"# largest within limit: {b['engines']:.0f} engines x {b['streams_per_engine']:.0f} streams"
            f" = {b['concurrent_streams']:.0f} concurrent streams, {b['tokens_per_s']:.0f} streamed tokens/s"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", type=int, nargs="+", default=[1, 2, 4, 8, 12, 16])
    p.add_argument("--streams", type=int, default=32, help="concurrent streams per engine")
    p.add_argument("--max-new", type=int, default=128)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--limit-ms", type=float, default=5.0)
    p.add_argument("--sim-cpu", type=int, default=0, help="CPU of the simulator process; -1: unpinned")
    p.add_argument("--client-cpu", type=int, default=1, help="first CPU of the client processes")
    p.add_argument("--client-procs", type=int, default=1, help="client processes (CPUs client-cpu, +1, ...)")
    p.add_argument("--load", default=None, help=argparse.SUPPRESS)
    p.add_argument("--stop-on-fail", action="store_true")
    p.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--cpu", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    run: Any = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        run = uvloop.run
    if args.serve is not None:
        pin(args.cpu)
        run(serve(args.serve, 0.010))
    elif args.load is not None:
        pin(args.cpu)
        run(load_child(json.loads(args.load)))
    else:
        run(sweep(args))


if __name__ == "__main__":
    main()

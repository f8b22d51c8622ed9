"""Router CPU cost per request under a realistic load: kvroute in front of a simulated fleet, Mooncake.

Why: the router is one Python process; whatever CPU it spends per request (body parsing, hashing, SSE
relay, KV-event application, metrics) becomes queueing delay under load. This script measures the
router process's CPU seconds (utime + stime from /proc) per request and the added latency (client e2e
minus the engine's own e2e, in engine seconds), optionally while py-spy samples the router.

    python -m kvroute.bench.router_profile --count 300 --rate 2 --workers 8 --time-scale 0.3
    python -m kvroute.bench.router_profile --count 300 --py-spy /tmp/router.svg   # flame graph too
    python -m kvroute.bench.router_profile --micro   # per-chunk costs of the relay path, in process

Processes: the fleet (bench.compare's child), the router (`router.cli serve`), the load here.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from kvroute.bench.compare import (
    FleetSpec,
    RouterSpec,
    fleet_process,
    flush_all,
    free_port,
    router_command,
    size_capacity,
    wait_router_ready,
)
from kvroute.bench.loadgen import LoadgenConfig, run_load
from kvroute.bench.workloads import build

REPO = Path(__file__).resolve().parent.parent


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(utime, stime) of one process, in seconds (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


async def main_async(a: argparse.Namespace) -> None:
    wl = build("mooncake", start=a.start, count=a.count, max_output_tokens=a.max_output_tokens)
    fleet = FleetSpec(
        a.workers, "h100-llama3-8b", a.page_size, a.time_scale, size_capacity(wl, a.workers, a.page_size)
    )
    spec = RouterSpec.parse(a.router)
    out_dir = Path(a.log_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "fleet.log", "w") as flog, open(out_dir / "router.log", "w") as rlog:
        async with fleet_process(fleet, flog) as urls, aiohttp.ClientSession() as http:
            await flush_all(http, urls)
            port = free_port()
            cmd = router_command(spec, urls, port, a.page_size)
            proc = subprocess.Popen(
                cmd, cwd=REPO, stdout=rlog, stderr=subprocess.STDOUT, start_new_session=True
            )
            spy: subprocess.Popen[bytes] | None = None
            try:
                url = f"http://127.0.0.1:{port}"
                await wait_router_ready(url, len(urls), proc, http)
                if a.py_spy:
                    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
                    fmt = (
                        "speedscope"
                        if a.py_spy.endswith(".json")
                        else ("raw" if a.py_spy.endswith(".txt") else "flamegraph")
                    )
                    spy = subprocess.Popen(
                        [
                            exe,
                            "record",
                            "--pid",
                            str(proc.pid),
                            "--rate",
                            "200",
                            "--format",
                            fmt,
                            "-o",
                            a.py_spy,
                            "--nonblocking",
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    await asyncio.sleep(1.0)  # let py-spy attach before the load starts
                cpu0, t0 = cpu_seconds(proc.pid), time.perf_counter()
                lg = LoadgenConfig(
                    url,
                    api=a.api,
                    time_scale=a.time_scale,
                    request_timeout_s=600,
                    label=spec.name,
                    progress=False,
                )
                results = await run_load(wl.with_rate(a.rate).requests, lg)
                cpu1, wall = cpu_seconds(proc.pid), time.perf_counter() - t0
            finally:
                if spy is not None:
                    spy.send_signal(signal.SIGINT)
                    await asyncio.to_thread(spy.wait, 60)
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.to_thread(proc.wait, 15)
                except subprocess.TimeoutExpired:
                    proc.kill()
    ok = [r for r in results if r.ok]
    over = [r.e2e_s - r.engine_e2e_s for r in ok if r.e2e_s and r.engine_e2e_s is not None]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    n = len(results)
    user, sys_ = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    cpu = user + sys_
    print(
        f"router {spec.name}: {len(ok)}/{n} ok, wall {wall:.1f} s, router CPU {cpu:.2f} s "
        f"(user {user:.2f}, sys {sys_:.2f}) = {1e3 * cpu / max(n, 1):.2f} ms/request, "
        f"CPU busy {100 * cpu / wall:.0f}%"
    )
    if over:
        print(
            f"added latency (client e2e - engine e2e, engine s): mean {statistics.mean(over):.3f} "
            f"p50 {statistics.median(over):.3f} max {max(over):.3f}; TTFT mean {statistics.mean(ttft):.3f}"
        )


_SSE = b'data: {"text":"tok","meta_info":{"id":"abc","prompt_tokens":12000,"completion_tokens":17}}\n\n'


class _FakeTransport:
    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def abort(self) -> None: ...


async def _relay_micro(n: int) -> float:
    """us per chunk of the engine-side receive path: data_received -> wake -> next_chunk, one per turn."""
    from kvroute.engines.http1 import Http1Pool, Timeouts, UpstreamResponse, _Conn

    conn = _Conn(Http1Pool(), ("127.0.0.1", 1))
    conn.transport = _FakeTransport()  # type: ignore[assignment]
    conn.data_received(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    loop = asyncio.get_running_loop()
    resp = UpstreamResponse(conn, "u", Timeouts(1.0, 30.0, 600.0), loop.time() + 600)
    chunk = b"%x\r\n%s\r\n" % (len(_SSE), _SSE)
    t0 = time.perf_counter()
    for _ in range(n):
        loop.call_soon(conn.data_received, chunk)
        await resp.next_chunk()
    return (time.perf_counter() - t0) / n * 1e6


def micro(n: int = 100_000) -> None:
    """Per-chunk costs of the parts of the relay path that kvroute owns (best of 5), on uvloop."""
    import uvloop

    from kvroute.router.wire import SseObserver

    relay = min(uvloop.run(_relay_micro(n)) for _ in range(5))
    best = float("inf")
    for _ in range(5):
        obs, t0 = SseObserver(), time.perf_counter()
        for i in range(n):
            obs.feed(_SSE, float(i))
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    print(f"engine receive path (http1): {relay:.2f} us/chunk; SSE side-parser: {best:.2f} us/chunk")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--max-output-tokens", type=int, default=None)
    ap.add_argument("--rate", type=float, default=1.0)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--time-scale", type=float, default=0.3)
    ap.add_argument("--api", choices=["generate", "completions", "chat"], default="generate")
    ap.add_argument("--router", default="kvroute-kv_aware")
    ap.add_argument("--py-spy", default="", help="write a py-spy profile here (.svg, .json or .txt)")
    ap.add_argument("--log-dir", default=str(REPO / "bench" / "results" / "tmp" / "router_profile"))
    ap.add_argument("--micro", action="store_true", help="only the in-process per-chunk micro-benchmarks")
    a = ap.parse_args(argv)
    if a.micro:
        micro()
        return 0
    asyncio.run(main_async(a))
    return 0


if __name__ == "__main__":
    sys.exit(main())

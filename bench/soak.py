"""Soak: many concurrent streams through `kvroute serve` for a long time; memory, descriptors, lost requests.

A simulated fleet and the router each run in a child process (`kvroute.bench.compare`'s launchers); this
process
keeps `--streams` client streams open at once, each sending `/generate` streams back to back (shared
prompt prefixes, so the index and load tracking work), and samples the router's RSS and open
descriptors from /proc. Targets (issue #18): RSS growth after warm-up < 10%, descriptors back to the
baseline once the load stops, 0 lost requests (every stream ends with `data: [DONE]` and no error event).

    python -m kvroute.bench.soak --streams 1000 --duration 600 --warmup 60
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

from kvroute.bench.compare import REPO, FleetSpec, RouterSpec, fleet_process, router_process


@dataclass
class Sample:
    t_s: float
    rss_mb: float
    fds: int
    done: int
    lost: int


@dataclass
class SoakResult:
    streams: int
    duration_s: float
    warmup_s: float
    workers: int
    completed: int = 0
    lost: int = 0
    lost_examples: list[str] = field(default_factory=list)
    baseline_fds: int = 0
    fds_after: int = 0
    rss_warm_mb: float = 0.0
    rss_end_mb: float = 0.0
    rss_max_mb: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def rss_growth(self) -> float:
        return (self.rss_end_mb - self.rss_warm_mb) / self.rss_warm_mb if self.rss_warm_mb else 0.0


def router_pid(port: int) -> int:
    """The `kvroute serve` process listening on `port` (found by its command line)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in cmd and str(port).encode() in cmd and any(b"router" in c for c in cmd):
            return int(entry)
    raise RuntimeError(f"no router process on port {port}")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def fd_kinds(pid: int) -> dict[str, int]:
    """Open descriptors by kind (file, pipe, anon_inode; TCP sockets by state and remote port), for the
    log: what a leak is made of."""
    tcp: dict[str, str] = {}
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                f = line.split()
                local, remote = (int(a.rsplit(":", 1)[1], 16) for a in (f[1], f[2]))
                tcp[f[9]] = f"tcp state {f[3]} local:{local} remote:{remote}"
    out: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            kind = target.split(":", 1)[0] if ":" in target else "file"
            if kind == "socket":
                kind = tcp.get(target[8:-1], "socket (not tcp)")
            out[kind] = out.get(kind, 0) + 1
    return out


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def stream_client(
    http: aiohttp.ClientSession, url: str, stop_at: float, rng: random.Random, res: SoakResult
) -> None:
    """Back-to-back streams until `stop_at`; a request is lost unless it ends with [DONE] and no error."""
    while time.monotonic() < stop_at:
        prefix = f"system prompt {rng.randrange(32)} " * 8
        body = {
            "text": prefix + f"question {rng.random()}",
            "stream": True,
            "sampling_params": {"max_new_tokens": rng.randrange(8, 48)},
        }
        try:
            async with http.post(url + "/generate", json=body, timeout=aiohttp.ClientTimeout(total=900)) as r:
                raw = await r.read()
            ok = r.status == 200 and raw.rstrip().endswith(b"data: [DONE]") and b'"error"' not in raw
            why = f"status {r.status}: {raw[-200:]!r}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            ok, why = False, f"{type(exc).__name__}: {exc}"
        if ok:
            res.completed += 1
        else:
            res.lost += 1
            if len(res.lost_examples) < 10:
                res.lost_examples.append(why)


async def run(
    streams: int, duration_s: float, warmup_s: float, workers: int, time_scale: float
) -> SoakResult:
    res = SoakResult(streams, duration_s, warmup_s, workers)
    (REPO / "bench" / "results").mkdir(parents=True, exist_ok=True)
    log = open(REPO / "bench" / "results" / "soak.log", "w")  # noqa: SIM115  (closed below, after the children)
    try:
        fleet = FleetSpec(workers=workers, profile="tiny", time_scale=time_scale)
        # No keep-alive on the bench's own control calls: its idle connection would count in the router's fds.
        control_conn = aiohttp.TCPConnector(force_close=True)
        control = aiohttp.ClientSession(connector=control_conn)
        async with control, fleet_process(fleet, log) as urls:
            async with router_process(RouterSpec("kvroute", "kv_aware"), urls, 16, log, control) as url:
                pid = router_pid(int(url.rsplit(":", 1)[1]))
                log.write(f"engines: {urls}\n")
                await asyncio.sleep(2)
                res.baseline_fds = open_fds(pid)
                log.write(f"baseline descriptors: {fd_kinds(pid)}\n")
                res.load_before = os.getloadavg()
                t0 = time.monotonic()
                stop_at = t0 + duration_s
                conn = aiohttp.TCPConnector(limit=0, force_close=False)
                async with aiohttp.ClientSession(connector=conn) as http:
                    rng = random.Random(0)
                    tasks = [
                        asyncio.create_task(
                            stream_client(http, url, stop_at, random.Random(rng.random()), res)
                        )
                        for _ in range(streams)
                    ]
                    while time.monotonic() < stop_at:
                        await asyncio.sleep(10)
                        s = Sample(time.monotonic() - t0, rss_mb(pid), open_fds(pid), res.completed, res.lost)
                        res.samples.append(s)
                        if not res.rss_warm_mb and s.t_s >= warmup_s:
                            res.rss_warm_mb = s.rss_mb
                        print(json.dumps(asdict(s)), flush=True)
                    await asyncio.gather(*tasks)
                res.rss_end_mb = rss_mb(pid)
                res.rss_max_mb = max([s.rss_mb for s in res.samples] + [res.rss_end_mb])
                # Load over and clients gone: upstream keep-alives are reaped after 4 s idle.
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    res.fds_after = open_fds(pid)
                    if res.fds_after <= res.baseline_fds:
                        break
                    await asyncio.sleep(1)
                res.load_after = os.getloadavg()
                log.write(f"descriptors after: {fd_kinds(pid)}\n")
    finally:
        log.close()
    return res


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvroute.bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=1000, help="client streams open at once")
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    p.add_argument("--warmup", type=float, default=60.0, help="seconds before the RSS reference is taken")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--time-scale", type=float, default=0.01, help="simulated engine speed (0.01 = 100x)")
    p.add_argument("--out", default=None, help="write the result JSON here")
    a = p.parse_args(argv)
    res = asyncio.run(run(a.streams, a.duration, a.warmup, a.workers, a.time_scale))
    summary = {
        **{k: v for k, v in asdict(res).items() if k != "samples"},
        "rss_growth_after_warmup": round(res.rss_growth, 4),
        "requests_per_s": round(res.completed / res.duration_s, 1),
        "targets_met": {
            "rss_growth_below_10pct": res.rss_growth < 0.10,
            "fds_back_to_baseline": res.fds_after <= res.baseline_fds,
            "zero_lost": res.lost == 0,
        },
    }
    print(json.dumps(summary, indent=2))
    if a.out:
        with contextlib.suppress(OSError):
            Path(a.out).write_text(json.dumps({**summary, "samples": [asdict(s) for s in res.samples]}))
    return 0 if all(summary["targets_met"].values()) else 1  # type: ignore[attr-defined]


if __name__ == "__main__":
    sys.exit(main())

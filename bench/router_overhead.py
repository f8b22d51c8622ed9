"""Latency the router adds and the request rate it sustains, kvroute next to SGLang's router, one run.

Processes (all on loopback, each its own OS process):
- backend: a zero-work SGLang look-alike (raw asyncio on uvloop) answering every `/generate` with
  the same small JSON, and the control endpoints both routers probe at registration;
- the router under test: `kvroute serve` (round_robin, and kv_aware: tokenize + hash + index), as one
  process and as `--processes 2` (SO_REUSEPORT replicas sharing state through the local Redis; the
  Rust router uses every core, so this is the like-for-like setting on a multi-core machine), and
  `python -m sglang_router.launch_router` (sglang-router 0.3.2, round_robin and cache_aware),
  one after another, each pointed at the same backend;
- loadgen: a raw-asyncio HTTP/1.1 client (keep-alive pool) in its own process.

Two measurements per target (and for the backend called directly, the baseline):
- latency at a fixed open-loop rate (default 200 req/s): p50/p99 of the client-side latency; the
  router's *added* latency is the target's percentile minus the direct one;
- sustained rate: closed loop with `--concurrency` connections for `--tput-seconds`; completed
  requests per second (every answer checked to be a 200).

    .venv/bin/python bench/router_overhead.py            # full run (3 interleaved rounds), ~7 minutes
    .venv/bin/python bench/router_overhead.py --quick    # smoke run, ~30 s
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kvroute.bench.compare import RouterSpec, router_command

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "You are a helpful assistant. " * 8  # 232 bytes: 14 blocks for kv_aware to hash
GEN_BODY = json.dumps({"text": PROMPT, "sampling_params": {"max_new_tokens": 1, "temperature": 0}}).encode()
GEN_RESPONSE = json.dumps(
    {
        "text": "ok",
        "output_ids": [1],
        "meta_info": {
            "id": "0",
            "prompt_tokens": 232,
            "cached_tokens": 0,
            "completion_tokens": 1,
            "finish_reason": {"type": "length", "length": 1},
        },
    }
).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------------ backend


def _http(status: str, body: bytes, ctype: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 "
        + status.encode()
        + b"\r\nContent-Type: "
        + ctype
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


_CONTROL = {
    b"/health": _http("200 OK", b""),
    b"/health_generate": _http("200 OK", b""),
    b"/server_info": _http(
        "200 OK",
        json.dumps(
            {
                "page_size": 16,
                "model_path": "zero",
                "max_total_num_tokens": 10**6,
                "disaggregation_mode": "null",
            }
        ).encode(),
    ),
    b"/model_info": _http("200 OK", json.dumps({"model_path": "zero", "is_generation": True}).encode()),
    b"/v1/models": _http(
        "200 OK", json.dumps({"object": "list", "data": [{"id": "zero", "object": "model"}]}).encode()
    ),
    b"/get_load": _http(
        "200 OK", json.dumps([{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}]).encode()
    ),
    b"/flush_cache": _http("200 OK", b"ok", b"text/plain"),
    b"/v1/traces": _http("200 OK", b"", b"application/x-protobuf"),  # as the OTLP sink of --tracing
}
_CONTROL[b"/get_server_info"] = _CONTROL[b"/server_info"]
_CONTROL[b"/get_model_info"] = _CONTROL[b"/model_info"]
_GEN = _http("200 OK", GEN_RESPONSE)
_404 = _http("404 Not Found", b"{}")


class BackendProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive server that answers as soon as a whole request is in (zero work)."""

    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end]
            length = 0
            lower = head.lower()
            i = lower.find(b"content-length:")
            if i >= 0:
                length = int(lower[i + 15 : lower.find(b"\r\n", i) if lower.find(b"\r\n", i) > 0 else None])
            total = end + 4 + length
            if len(self.buf) < total:
                return
            line = head[: head.find(b"\r\n")] if b"\r\n" in head else head
            path = line.split(b" ")[1].split(b"?")[0] if line.count(b" ") >= 2 else b"/"
            self.buf = self.buf[total:]
            assert self.transport is not None
            if path in (b"/generate", b"/v1/completions", b"/v1/chat/completions"):
                self.transport.write(_GEN)
            else:
                self.transport.write(_CONTROL.get(path, _404))


async def run_backend(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(BackendProtocol, "127.0.0.1", port, backlog=4096)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


# ------------------------------------------------------------------------------------ loadgen


class ClientProtocol(asyncio.Protocol):
    """One keep-alive connection; one request at a time; resolves `waiter` with the status code."""

    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[int] | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection lost"))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buf[:end].lower()
        i = head.find(b"content-length:")
        if i >= 0:
            j = head.find(b"\r\n", i)
            length = int(head[i + 15 : j if j > 0 else None])
            if len(self.buf) < end + 4 + length:
                return
            rest = self.buf[end + 4 + length :]
        elif b"transfer-encoding: chunked" in head:
            k = self.buf.find(b"\r\n0\r\n\r\n", end)
            if k < 0 and not self.buf[end + 4 :].startswith(b"0\r\n\r\n"):
                return
            rest = b""
        else:
            rest = b""
        status = int(self.buf[9:12])
        self.buf = rest
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(status)

    async def request(self, raw: bytes) -> int:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await self.waiter


def raw_request(port: int) -> bytes:
    return (
        b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1:"
        + str(port).encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(GEN_BODY)).encode()
        + b"\r\n\r\n"
        + GEN_BODY
    )


async def _connect(port: int) -> ClientProtocol:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(ClientProtocol, "127.0.0.1", port)
    return proto


async def latency_run(port: int, rate: float, seconds: float, warmup_s: float) -> dict[str, float]:
    """Open loop at `rate`: request i leaves at start + i / rate on an idle pooled connection."""
    raw = raw_request(port)
    idle: list[ClientProtocol] = [await _connect(port) for _ in range(16)]
    lat: list[float] = []
    errors = 0
    tasks: set[asyncio.Task[None]] = set()

    async def one(record: bool) -> None:
        nonlocal errors
        conn = idle.pop() if idle else await _connect(port)
        t0 = time.perf_counter()
        try:
            status = await conn.request(raw)
        except ConnectionError:
            errors += 1
            return
        dt = time.perf_counter() - t0
        idle.append(conn)
        if record:
            if status == 200:
                lat.append(dt)
            else:
                errors += 1

    start = time.perf_counter()
    total = warmup_s + seconds
    i = 0
    while True:
        t = i / rate
        if t >= total:
            break
        delay = start + t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.get_running_loop().create_task(one(t >= warmup_s))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        i += 1
    await asyncio.gather(*tasks)
    for c in idle:
        assert c.transport is not None
        c.transport.close()
    lat.sort()
    n = len(lat)
    return {
        "n": n,
        "errors": errors,
        "p50_ms": lat[n // 2] * 1e3,
        "p90_ms": lat[int(n * 0.9)] * 1e3,
        "p99_ms": lat[min(n - 1, int(n * 0.99))] * 1e3,
        "mean_ms": sum(lat) / n * 1e3,
    }


async def throughput_run(port: int, concurrency: int, seconds: float, warmup_s: float) -> dict[str, float]:
    """Closed loop: `concurrency` connections, each sending its next request as soon as one is answered."""
    raw = raw_request(port)
    conns = [await _connect(port) for _ in range(concurrency)]
    done = 0
    total = 0  # every 200, warm-up included (the router's CPU time is divided by it)
    errors = 0
    measuring = False
    stop = False

    async def loop_one(c: ClientProtocol) -> None:
        nonlocal done, errors, total
        while not stop:
            try:
                status = await c.request(raw)
            except ConnectionError:
                errors += 1
                return
            total += status == 200
            if measuring:
                if status == 200:
                    done += 1
                else:
                    errors += 1

    tasks = [asyncio.create_task(loop_one(c)) for c in conns]
    await asyncio.sleep(warmup_s)
    measuring = True
    t0 = time.perf_counter()
    await asyncio.sleep(seconds)
    measuring = False
    dt = time.perf_counter() - t0
    stop = True
    await asyncio.wait(tasks, timeout=10)
    for c in conns:
        assert c.transport is not None
        c.transport.close()
    return {"rps": done / dt, "errors": errors, "concurrency": concurrency, "total": total}


# ------------------------------------------------------------------------------------ orchestration


@dataclass
class Target:
    name: str
    port: int
    cmd: list[str] | None  # None: the backend itself (direct baseline)
    cwd: Path = ROOT  # the source tree it runs from (--baseline-src: another checkout)


def _spawn(cmd: list[str], log: Path, cwd: Path = ROOT) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        cmd, cwd=cwd, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True
    )


def _stop(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGINT)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)


async def _routes(port: int, timeout: float) -> None:
    """Wait until POST /generate through `port` answers 200 (the router registered the backend)."""
    deadline = time.monotonic() + timeout
    raw = raw_request(port)
    while time.monotonic() < deadline:
        try:
            c = await _connect(port)
            try:
                if await asyncio.wait_for(c.request(raw), 2) == 200:
                    return
            finally:
                assert c.transport is not None
                c.transport.close()
        except (OSError, TimeoutError):
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError(f"nothing answered 200 on port {port} within {timeout}s")


def _loadgen(args: argparse.Namespace, port: int, mode: str) -> dict[str, float]:
    cmd = [
        sys.executable,
        __file__,
        "--role",
        "loadgen",
        "--port",
        str(port),
        "--mode",
        mode,
        "--rate",
        str(args.rate),
        "--latency-seconds",
        str(args.latency_seconds),
        "--tput-seconds",
        str(args.tput_seconds),
        "--concurrency",
        str(args.concurrency),
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=300, check=True)
    return json.loads(out.stdout.decode().strip().splitlines()[-1])  # type: ignore[no-any-return]


def orchestrate(args: argparse.Namespace) -> int:
    logdir = ROOT / "bench" / "results" / "tmp"
    logdir.mkdir(parents=True, exist_ok=True)
    bport = free_port()
    backend = _spawn(
        [sys.executable, __file__, "--role", "backend", "--port", str(bport)], logdir / "backend.log"
    )
    burl = f"http://127.0.0.1:{bport}"
    sink: subprocess.Popen[bytes] | None = None
    if args.tracing:  # a second zero-work process takes the OTLP exports (200 to every POST /v1/traces)
        sport = free_port()
        sink = _spawn(
            [sys.executable, __file__, "--role", "backend", "--port", str(sport)], logdir / "otlp.log"
        )
    py = sys.executable
    targets = [Target("direct (no router)", bport, None)]
    kv_common = ["--worker-urls", burl, "--block-size", "16", "--log-level", "warning"]
    for n in args.processes:
        # n > 1: `serve --processes n`, replicas sharing state through Redis (its own key namespace)
        extra = [] if n == 1 else ["--processes", str(n), "--redis-url", args.redis_url,
                                   "--redis-key-prefix", f"kvroute-bench-{os.getpid()}-{n}"]  # fmt: skip
        for policy in ("round_robin", "kv_aware"):
            port = free_port()
            cmd = [py, "-m", "kvroute", "serve", "--port", str(port), "--policy", policy, *kv_common, *extra]
            targets.append(Target(_kv_name(policy, n), port, cmd))
        for ratio in args.tracing:  # kv_aware with tracing on, spans exported over OTLP/HTTP to the sink
            port = free_port()
            otlp = ["--otlp-traces-endpoint", f"http://127.0.0.1:{sport}/v1/traces"]
            otlp += ["--trace-sample-ratio", str(ratio)]
            cmd = [py, "-m", "kvroute", "serve", "--port", str(port), "--policy", "kv_aware", *kv_common]
            targets.append(Target(_kv_name("kv_aware", n) + f" +tracing {ratio:g}", port, cmd + extra + otlp))
    if args.baseline_src:  # the same kvroute targets from another checkout, interleaved with these
        base = Path(args.baseline_src).resolve()
        for policy in ("round_robin", "kv_aware"):
            port = free_port()
            cmd = [py, "-m", "kvroute", "serve", "--port", str(port), "--policy", policy, *kv_common]
            targets.append(Target(f"{_kv_name(policy, 1)} @baseline", port, cmd, base))
    if not args.no_sglang:
        # round_robin: the proxy alone; cache_aware: its prefix tree too, the like-for-like rival of kv_aware
        for policy in ("round_robin", "cache_aware"):
            port = free_port()
            cmd = router_command(RouterSpec("sglang", policy), [burl], port, 16)
            targets.append(Target(f"sglang-router 0.3.2 {policy}", port, cmd))
    runs: dict[str, list[dict[str, dict[str, float]]]] = {t.name: [] for t in targets}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        pgid: dict[str, int] = {}
        for t in targets:  # every router starts now and idles while the others are measured
            if t.cmd:
                procs.append(_spawn(t.cmd, logdir / f"{t.name.split()[0]}-{t.port}.log", t.cwd))
                pgid[t.name] = procs[-1].pid  # its own session: pgid == pid
        for t in targets:
            asyncio.run(_routes(t.port, 60))
        for rnd in range(args.repeat):
            for t in targets:  # interleaved rounds: slow drifts of a shared machine hit every target alike
                lat = _loadgen(args, t.port, "latency")
                cpu0 = group_cpu_s(pgid[t.name]) if t.name in pgid else 0.0
                tput = _loadgen(args, t.port, "throughput")
                cpu = group_cpu_s(pgid[t.name]) - cpu0 if t.name in pgid else 0.0
                tput["cpu_us_per_req"] = cpu / tput["total"] * 1e6 if tput.get("total") else 0.0
                runs[t.name].append({"latency": lat, "throughput": tput})
                print(
                    f"  round {rnd + 1} {t.name:<34} p50 {lat['p50_ms']:.3f} ms  p99 {lat['p99_ms']:.3f} ms  "
                    f"{tput['rps']:.0f} req/s  {tput['cpu_us_per_req']:.0f} CPU us/req  "
                    f"(errors {lat['errors'] + tput['errors']:.0f})",
                    flush=True,
                )
    finally:
        for proc in procs:
            _stop(proc)
        _stop(backend)
        if sink is not None:
            _stop(sink)
    results = {name: _median_run(rs) for name, rs in runs.items() if rs}
    _report(results, args)
    return 0


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the processes of a process group (Linux /proc): the
    router's cost per request, far less sensitive to a busy machine than its request rate."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        f = stat[stat.rfind(")") + 2 :].split()  # fields after the command name
        if int(f[2]) == pgid:  # field 5: pgrp
            total += (int(f[11]) + int(f[12])) / tick  # fields 14, 15: utime, stime
    return total


def _kv_name(policy: str, processes: int) -> str:
    return f"kvroute {policy}" + ("" if processes == 1 else f" x{processes} procs")


def _median_run(rs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per figure, the median over rounds."""
    out: dict[str, dict[str, float]] = {}
    for part in ("latency", "throughput"):
        out[part] = {k: statistics.median(r[part][k] for r in rs) for k in rs[0][part]}
    return out


def _report(results: dict[str, dict[str, dict[str, float]]], args: argparse.Namespace) -> None:
    base = results.get("direct (no router)")
    print()
    print(
        f"Router overhead on a zero-work backend, medians of {args.repeat} interleaved round(s): "
        f"latency at {args.rate:g} req/s open loop "
        f"({args.latency_seconds:g} s), sustained rate closed loop ({args.concurrency} connections, "
        f"{args.tput_seconds:g} s). Machine: {os.cpu_count()} CPUs."
    )
    print(
        f"{'target':<34} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} {'+p99 ms':>8} {'req/s':>8} "
        f"{'CPU us/req':>10}"
    )
    for name, r in results.items():
        lat, tput = r["latency"], r["throughput"]
        add50 = lat["p50_ms"] - base["latency"]["p50_ms"] if base and name != "direct (no router)" else 0.0
        add99 = lat["p99_ms"] - base["latency"]["p99_ms"] if base and name != "direct (no router)" else 0.0
        print(
            f"{name:<34} {lat['p50_ms']:>8.3f} {lat['p99_ms']:>8.3f} {add50:>8.3f} {add99:>8.3f} "
            f"{tput['rps']:>8.0f} {tput.get('cpu_us_per_req', 0.0):>10.0f}"
        )
    print()
    pairs = [
        (_kv_name(policy, n), f"sglang-router 0.3.2 {theirs}")
        for n in args.processes
        for policy, theirs in (
            ("round_robin", "round_robin"),
            ("kv_aware", "round_robin"),
            ("kv_aware", "cache_aware"),
        )
    ]
    pairs += [
        (_kv_name("kv_aware", n) + f" +tracing {r:g}", _kv_name("kv_aware", n))
        for n in args.processes
        for r in args.tracing
    ]
    pairs += [(f"{_kv_name(p, 1)}", f"{_kv_name(p, 1)} @baseline") for p in ("round_robin", "kv_aware")]
    for ours, theirs in pairs:
        if ours in results and theirs in results:
            ratio = results[ours]["throughput"]["rps"] / results[theirs]["throughput"]["rps"]
            c_ours = results[ours]["throughput"].get("cpu_us_per_req", 0.0)
            c_theirs = results[theirs]["throughput"].get("cpu_us_per_req", 0.0)
            if c_ours and c_theirs:
                print(f"router CPU per request {ours} / {theirs}: {c_ours / c_theirs:.2f}")
            target = "" if "sglang" not in theirs else " (target >= 0.5)"
            target = " (target >= 0.9)" if "+tracing" in ours else target
            print(f"sustained-rate ratio {ours} / {theirs}: {ratio:.2f}{target}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--role", choices=["orchestrate", "backend", "loadgen"], default="orchestrate")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--mode", choices=["latency", "throughput"], default="latency")
    p.add_argument("--rate", type=float, default=200.0, help="open-loop rate of the latency run (req/s)")
    p.add_argument("--latency-seconds", type=float, default=15.0)
    p.add_argument("--tput-seconds", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=64, help="connections of the closed-loop run")
    p.add_argument("--no-sglang", action="store_true", help="skip sglang-router")
    p.add_argument(
        "--processes",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[1, 2],
        help="kvroute serving-process counts to measure, comma-separated (n > 1 uses --redis-url)",
    )
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="for kvroute --processes > 1")
    p.add_argument("--repeat", type=int, default=3, help="interleaved rounds; the table shows medians")
    p.add_argument("--quick", action="store_true", help="short run (smoke test)")
    p.add_argument("--json-out", default=None, help="also write the results as JSON here")
    p.add_argument(
        "--tracing",
        type=lambda v: [float(x) for x in v.split(",")],
        default=[],
        metavar="RATIOS",
        help="also kvroute kv_aware with tracing on at these sample ratios, comma-separated (e.g. 1,0.1)",
    )
    p.add_argument(
        "--baseline-src",
        default=None,
        metavar="DIR",
        help="also kvroute round_robin/kv_aware from another source tree (git archive of an older commit)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.latency_seconds, args.tput_seconds, args.repeat = 3.0, 3.0, 1
    try:
        import uvloop

        run = uvloop.run
    except ImportError:  # pragma: no cover
        run = asyncio.run  # type: ignore[assignment]
    if args.role == "backend":
        run(run_backend(args.port))
        return 0
    if args.role == "loadgen":
        if args.mode == "latency":
            res = run(latency_run(args.port, args.rate, args.latency_seconds, warmup_s=1.0))
        else:
            res = run(throughput_run(args.port, args.concurrency, args.tput_seconds, warmup_s=1.0))
        print(json.dumps(res), flush=True)
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    raise SystemExit(main())

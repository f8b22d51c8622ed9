"""Side-by-side comparison of routers in front of one simulated SGLang fleet (`kvroute bench`).

One run starts the fleet once, then puts each router in turn in front of it (kvroute round_robin,
least_load, cache_aware, kv_aware; the peers of `bench/peers.py`, each pinned: SGLang's router 0.3.2,
its successor smg 1.13 and vllm-router 0.1.17, with cache_aware and round_robin), flushing every
engine's cache between routers, and replays the same workload open-loop through each. Output in the
results folder: `results.md` (the table), `summary.json`, one JSON-lines file of per-request results
per router, and PNG plots.

Processes (2-core machine, so be pragmatic): the fleet runs in its own process (`--fleet-child`,
below), each router in its own process, and the load generator in this one; three busy processes
share two cores, so absolute latencies include some host contention, identical for every router.
All latencies are in engine (GPU) seconds: wall / time_scale.

    python -m kvroute.bench.compare --quick     # < 3 minutes, time-compressed
    python -m kvroute.bench.compare  # the recorded comparison: Mooncake requests 0-1999, 8 engines,
                                        # arrivals x2.5, outputs x0.25, page 64, real time (~30 minutes)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp

from kvroute.bench.loadgen import LoadgenConfig, RequestResult, run_load
from kvroute.bench.peers import PEERS
from kvroute.bench.peers import command as peer_command
from kvroute.bench.peers import install as install_peer
from kvroute.bench.workloads import WORKLOADS, Workload, build
from kvroute.bench.workloads.ceiling import (
    Ceiling,
    owner_affinity,
    prefix_reuse_ceiling,
    profile_prefill_cost,
    ttft_lower_bounds,
)
from kvroute.engines.sim.fleet import free_port as free_port  # the benches import it from here
from kvroute.router.autoscale.cost import cost_per_million_goodput

REPO = Path(__file__).resolve().parent.parent
KVROUTE_POLICIES = ("round_robin", "least_load", "cache_aware", "kv_aware")
SGLANG_POLICIES = PEERS["sglang"].policies
ROUTER_KINDS = ("kvroute", *PEERS)


class BenchError(RuntimeError):
    """A component of the comparison (fleet, router) failed to start or to answer."""


@dataclass(frozen=True)
class RouterSpec:
    """One router under test: `kind` is `kvroute` or a peer (`sglang`, `smg`, `vllm-router`); `params` are
    policy KEY=VALUE settings (kvroute: `--policy-param`; peers: `--KEY VALUE`, e.g. cache-threshold=0.5).
    kvroute's `processes=N` is the serve flag instead: N processes sharing state through the local Redis."""

    kind: str
    policy: str
    params: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return ":".join([f"{self.kind}-{self.policy}", *self.params])

    @staticmethod
    def parse(text: str) -> RouterSpec:
        """`kvroute-kv_aware`, `kvroute-kv_aware:queue_weight=0.5:decode_weight=0.2`, `smg-cache_aware`,
        `vllm-router-round_robin`."""
        head, *params = text.strip().split(":")
        kind = max((k for k in ROUTER_KINDS if head.startswith(k + "-")), key=len, default="")
        policy = head[len(kind) + 1 :]
        if not kind or not policy or any("=" not in p for p in params):
            raise ValueError(
                f"bad router {text!r}: use KIND-POLICY[:KEY=VALUE...], KIND one of {', '.join(ROUTER_KINDS)}"
            )
        return RouterSpec(kind, policy, tuple(params))


@dataclass(frozen=True)
class FleetSpec:
    """The simulated fleet. `kv_capacity_tokens` None = sized from the workload (see `size_capacity`)."""

    workers: int = 8
    profile: str = "h100-llama3-8b"
    page_size: int = 16
    time_scale: float = 0.1
    kv_capacity_tokens: int | None = None


@dataclass(frozen=True)
class BenchConfig:
    """Everything one comparison needs. Times in engine seconds unless named `_wall`."""

    workload: str = "mooncake"
    workload_args: dict[str, Any] = field(default_factory=dict)
    rate: float = 1.0  # arrival rate factor applied to the workload
    fleet: FleetSpec = field(default_factory=FleetSpec)
    routers: tuple[RouterSpec, ...] = ()
    api: str = "generate"
    out_dir: Path = REPO / "bench" / "results" / "latest"
    sla_ttft_s: float = 2.0
    sla_itl_s: float = 0.1
    gpu_hour_cost: float = 2.5  # per GPU-hour, for cost per million goodput tokens (0 = GPU-seconds only)
    gpus_per_worker: int = 1
    sweep: tuple[float, ...] = ()  # rate factors for the load sweep (empty: no sweep)
    request_timeout_wall: float = 300.0
    max_concurrency: int = 2048
    progress: bool = True
    poll_wall_s: float = 0.25  # engine /get_load polling period (wall seconds)


# ---- small utilities --------------------------------------------------------------------------------
def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]); NaN for an empty list."""
    if not xs:
        return math.nan
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def sglang_router_available() -> bool:
    return peer_available("sglang")


def peer_available(kind: str) -> bool:
    """The peer router `kind` is installed at its pinned version (`bench/peers.py`)."""
    return peer_command(PEERS[kind]) is not None


def size_capacity(ceiling_workload: Workload, workers: int, page_size: int) -> int:
    """KV tokens per worker so that the workload's distinct prompt tokens exceed one worker's cache
    but fit the fleet's: distinct pages x page_size / (workers x 0.75), i.e. the fleet holds the whole
    working set with 25% headroom for running requests, one worker holds about 1/(0.75 N) of it."""
    from kvroute.cache_index.hashing import hash_text_blocks

    distinct: set[int] = set()
    longest = 0
    for r in ceiling_workload.requests:
        distinct.update(hash_text_blocks(r.text, page_size))
        longest = max(longest, r.prompt_tokens + r.output_tokens)
    need = len(distinct) * page_size / (workers * 0.75)
    return max(int(need), 4 * longest)


# ---- the fleet, in a child process ------------------------------------------------------------------
async def _fleet_child(spec: dict[str, Any]) -> None:
    """Run a SimFleet until stdin closes; print one JSON line with the engine URLs first."""
    from kvroute.engines.http_api import STATE
    from kvroute.engines.sim.fleet import SimFleet

    kwargs = dict(spec)
    incremental = bool(kwargs.pop("incremental_streaming_output", True))
    fleet = SimFleet(**kwargs)
    for server in fleet.servers:
        # SGLang's --incremental-streaming-output: each SSE chunk carries only its new tokens, not the
        # whole output so far (O(n) bytes per request instead of O(n^2)); the host has 2 cores.
        server.app[STATE].extra_server_info["incremental_streaming_output"] = incremental
    async with fleet:
        print(json.dumps({"urls": list(fleet.urls)}), flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)


@contextlib.asynccontextmanager
async def json_child(
    argv: Sequence[str], log: IO[str], timeout_s: float, error: str
) -> AsyncIterator[dict[str, Any]]:
    """Run `python ARGV`, a child that prints one JSON line once ready, then runs until its stdin closes;
    yield that line; stop it (stdin EOF, then SIGTERM after 10 s). `error`: the BenchError if it dies
    first (both benches start their children this way)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=timeout_s)
        if not line:
            raise BenchError(error)
        yield json.loads(line)
    finally:
        if proc.returncode is None:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), timeout=10)
            except TimeoutError:
                proc.terminate()
                await proc.wait()


@contextlib.asynccontextmanager
async def fleet_child(args: dict[str, Any], log: IO[str], error: str) -> AsyncIterator[list[str]]:
    """`SimFleet(**args)` in a child process (`--fleet-child`); yield its engine URLs."""
    argv = ["-m", "kvroute.bench.compare", "--fleet-child", json.dumps(args)]
    async with json_child(argv, log, 120, error) as ready:
        yield list(ready["urls"])


@contextlib.asynccontextmanager
async def fleet_process(spec: FleetSpec, log: IO[str]) -> AsyncIterator[list[str]]:
    """Start the fleet as a subprocess; yield its engine URLs; stop it (stdin EOF, then SIGTERM)."""
    args = {
        "workers": spec.workers,
        "profile": spec.profile,
        "page_size": spec.page_size,
        "time_scale": spec.time_scale,
        "kv_capacity_tokens": spec.kv_capacity_tokens,
    }
    async with fleet_child(
        args, log, "the simulated fleet exited before listing its engines (see fleet.log)"
    ) as urls:
        yield urls


# ---- routers, each in a child process ---------------------------------------------------------------
def _processes_flags(spec: RouterSpec, port: int) -> list[str]:
    n = next((p.partition("=")[2] for p in spec.params if p.startswith("processes=")), "1")
    if n == "1":
        return []
    redis_url = os.environ.get("KVROUTE_REDIS_URL", "redis://127.0.0.1:6379/0")
    return ["--processes", n, "--redis-url", redis_url, "--redis-key-prefix", f"kvroute-bench-{port}"]


def router_command(spec: RouterSpec, urls: Sequence[str], port: int, page_size: int) -> list[str]:
    if spec.kind == "kvroute":
        return [
            sys.executable,
            "-m",
            "kvroute.router.cli",
            "serve",
            "--worker-urls",
            *urls,
            "--policy",
            spec.policy,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--block-size",
            str(page_size),
            *[arg for p in spec.params if not p.startswith("processes=") for arg in ("--policy-param", p)],
            *_processes_flags(spec, port),
        ]
    prog = peer_command(PEERS[spec.kind])
    if prog is None:
        raise BenchError(f"{PEERS[spec.kind].pin} is not installed (python -m kvroute.bench.peers install)")
    common = [
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--worker-urls",
        *urls,
        "--policy",
        spec.policy,
        "--prometheus-host",
        "127.0.0.1",
        "--prometheus-port",
        str(free_port()),
    ]
    extra = [arg for p in spec.params for arg in ("--" + p.partition("=")[0], p.partition("=")[2])]
    if spec.kind == "smg":
        # its event-driven index works in blocks: the fleet's page size, as for kvroute
        return [*prog, *common, "--block-size", str(page_size), "--log-level", "warn", *extra]
    if spec.kind == "vllm-router":
        return [*prog, *common, "--log-level", "warning", *extra]
    return [*prog, *common, "--log-level", "warn", *extra]


@contextlib.asynccontextmanager
async def router_process(
    spec: RouterSpec, urls: Sequence[str], page_size: int, log: IO[str], http: aiohttp.ClientSession
) -> AsyncIterator[str]:
    """Start a router, wait until it is ready with every worker, yield its URL, then stop it."""
    port = free_port()
    cmd = router_command(spec, urls, port, page_size)
    # SGLang's router looks up the served model's tokenizer on the Hub (unused for HTTP routing): offline.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    async with serve_router(cmd, port, len(urls), log, http, env) as url:
        yield url


@contextlib.asynccontextmanager
async def serve_router(
    cmd: Sequence[str],
    port: int,
    n_workers: int,
    log: IO[str],
    http: aiohttp.ClientSession,
    env: dict[str, str] | None = None,
) -> AsyncIterator[str]:
    """Run a router command listening on `port`, wait until it is ready with `n_workers`, yield its URL,
    then stop it (SIGTERM, SIGKILL after 15 s)."""
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_router_ready(url, n_workers, proc, http)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, 15)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)


async def wait_router_ready(
    url: str,
    n_workers: int,
    proc: subprocess.Popen[bytes],
    http: aiohttp.ClientSession,
    deadline_s: float = 90,
) -> None:
    """Poll `/readiness` until 200, then (where the router lists workers) until all are registered."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise BenchError(f"router {url} exited with {proc.returncode} (see its log)")
        try:
            async with http.get(url + "/readiness", timeout=aiohttp.ClientTimeout(total=2)) as r:
                if r.status == 200 and await _all_workers_listed(url, n_workers, http):
                    return
        except (aiohttp.ClientError, TimeoutError):
            pass
        await asyncio.sleep(0.2)
    raise BenchError(f"router {url} not ready with {n_workers} workers after {deadline_s} s")


async def _all_workers_listed(url: str, n: int, http: aiohttp.ClientSession) -> bool:
    """True when the router reports n healthy workers, or exposes no worker list we know of."""
    for path in ("/admin/workers", "/workers", "/list_workers"):
        try:
            async with http.get(url + path, timeout=aiohttp.ClientTimeout(total=2)) as r:
                if r.status != 200:
                    continue
                body = await r.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError):
            continue
        return _count_workers(body) >= n
    return True


def _count_workers(body: Any) -> int:
    if isinstance(body, dict):
        for key in ("workers", "urls"):
            if isinstance(body.get(key), list):
                body = body[key]
                break
        else:
            return int(body.get("total", 0) or 0)
    if not isinstance(body, list):
        return 0
    healthy = 0
    for w in body:
        state = w.get("state", w.get("is_healthy", True)) if isinstance(w, dict) else True
        healthy += state in (True, "healthy")
    return healthy


# ---- engine-side counters and load -----------------------------------------------------------------
async def served_model(http: aiohttp.ClientSession, url: str) -> str:
    """The model an engine serves (its `/v1/models`): smg answers 404 to a request naming another."""
    try:
        async with http.get(url + "/v1/models", timeout=aiohttp.ClientTimeout(total=5)) as r:
            body = await r.json(content_type=None)
        return str(body["data"][0]["id"])
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError, KeyError, IndexError, TypeError):
        return "default"


async def engine_loads(http: aiohttp.ClientSession, urls: Sequence[str]) -> list[dict[str, Any]]:
    """Each engine's `/get_load` (first dp rank), {} where it did not answer."""

    async def one(u: str) -> dict[str, Any]:
        try:
            async with http.get(u + "/get_load", timeout=aiohttp.ClientTimeout(total=5)) as r:
                body = await r.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError):
            return {}
        if isinstance(body, list):
            body = body[0] if body else {}
        return body if isinstance(body, dict) else {}

    return list(await asyncio.gather(*(one(u) for u in urls)))


_REQ_COUNTER = re.compile(r"^(?:sglang:)?num_requests_total(?:\{[^}]*\})?\s+([0-9.eE+-]+)", re.M)


async def engine_request_counts(http: aiohttp.ClientSession, urls: Sequence[str]) -> list[int]:
    """Requests each engine has accepted so far (from /get_load, else its /metrics counter).

    The only router-independent way to count SGLang's router's choices: it does not say which worker
    served a request."""
    loads = await engine_loads(http, urls)
    out = []
    for u, ld in zip(urls, loads, strict=True):
        if isinstance(ld.get("requests_total"), int):
            out.append(int(ld["requests_total"]))
            continue
        try:
            async with http.get(u + "/metrics", timeout=aiohttp.ClientTimeout(total=5)) as r:
                m = _REQ_COUNTER.search(await r.text())
        except (aiohttp.ClientError, TimeoutError):
            m = None
        out.append(int(float(m.group(1))) if m else 0)
    return out


async def flush_all(http: aiohttp.ClientSession, urls: Sequence[str], deadline_s: float = 60) -> None:
    """Flush every engine's cache; an engine with requests in flight refuses, so retry until idle."""
    pending = list(urls)
    end = time.monotonic() + deadline_s
    while pending:
        left = []
        for u in pending:
            try:
                async with http.post(u + "/flush_cache", timeout=aiohttp.ClientTimeout(total=5)) as r:
                    if r.status != 200:
                        left.append(u)
            except (aiohttp.ClientError, TimeoutError):
                left.append(u)
        pending = left
        if pending:
            if time.monotonic() > end:
                raise BenchError(f"engines {pending} would not flush their cache")
            await asyncio.sleep(0.2)


async def poll_loads(
    http: aiohttp.ClientSession,
    urls: Sequence[str],
    period: float,
    scale: float,
    stop: asyncio.Event,
    into: list[dict[str, Any]],
) -> None:
    """Sample every engine's running/waiting requests until `stop`; times in engine seconds."""
    t0 = time.perf_counter()
    while not stop.is_set():
        loads = await engine_loads(http, urls)
        t = (time.perf_counter() - t0) / scale
        waiting = [int(ld.get("num_waiting_reqs", 0) or 0) for ld in loads]
        # SGLang's /get_load: num_reqs counts running + waiting.
        total = [int(ld.get("num_reqs", 0) or 0) for ld in loads]
        into.append(
            {
                "t": t,
                "running": [max(0, n - w) for n, w in zip(total, waiting, strict=True)],
                "waiting": waiting,
            }
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=period)


# ---- one router, one workload ---------------------------------------------------------------------
@dataclass
class RunResult:
    router: str
    rate: float
    results: list[RequestResult]
    per_worker: list[int]  # requests served by each engine, in fleet order
    load_series: list[dict[str, Any]]
    wall_s: float


async def run_router(
    spec: RouterSpec,
    urls: Sequence[str],
    wl: Workload,
    cfg: BenchConfig,
    rate: float,
    http: aiohttp.ClientSession,
    log: IO[str],
) -> RunResult:
    """Flush the fleet, start the router, replay `wl` at `rate`, stop the router."""
    await flush_all(http, urls)
    async with router_process(spec, urls, cfg.fleet.page_size, log, http) as rurl:
        before = await engine_request_counts(http, urls)
        series: list[dict[str, Any]] = []
        stop = asyncio.Event()
        poller = asyncio.create_task(
            poll_loads(http, urls, cfg.poll_wall_s, cfg.fleet.time_scale, stop, series)
        )
        t0 = time.perf_counter()
        lg = LoadgenConfig(
            rurl,
            api=cfg.api,  # type: ignore[arg-type]
            time_scale=cfg.fleet.time_scale,
            max_concurrency=cfg.max_concurrency,
            request_timeout_s=cfg.request_timeout_wall,
            label=spec.name if rate == cfg.rate else f"{spec.name}@{rate:g}",
            model=await served_model(http, urls[0]),
            progress=cfg.progress,
        )
        try:
            results = await run_load(wl.with_rate(rate).requests, lg)
        finally:
            stop.set()
            await poller
        wall = time.perf_counter() - t0
        after = await engine_request_counts(http, urls)
    per_worker = [a - b for a, b in zip(after, before, strict=True)]
    by_header = {u: 0 for u in urls}
    if results and all(r.worker for r in results):
        for r in results:
            for u in urls:
                if r.worker and r.worker.rstrip("/") == u.rstrip("/"):
                    by_header[u] += 1
        if sum(by_header.values()) == len(results):
            per_worker = [by_header[u] for u in urls]
    return RunResult(spec.name, rate, results, per_worker, series, wall)


# ---- summaries ----------------------------------------------------------------------------------------
@dataclass
class Summary:
    router: str
    rate: float
    requests: int
    ok: int
    ttft_mean: float
    ttft_p50: float
    ttft_p99: float
    itl_p50: float
    itl_p99: float
    e2e_mean: float
    throughput_tok_s: float  # output tokens per engine second over the run
    req_s: float
    hit_ratio: float  # engine-reported cached tokens / prompt tokens
    ceiling: float
    hit_share_of_ceiling: float
    per_worker: list[int]
    worker_max_over_mean: float
    ttft_lower_bound_mean: float
    goodput_req_s: float  # requests meeting both SLAs per engine second
    goodput_fraction: float
    wall_s: float
    host_overhead_s: float  # mean client e2e minus the engine's own e2e: router + host, in engine s
    owner_affinity: float  # continuations sent to their prefix's last worker (NaN: router doesn't say)
    gpu_seconds: float = math.nan  # engines x GPUs per engine x the run's span (engine seconds)
    cost_per_m_goodput: float = math.nan  # GPU cost per million output tokens of requests within the SLA
    # Where TTFT goes, means over answered requests in engine seconds (NaN: the engine reported no timings,
    # e.g. the OpenAI APIs): the engine's queue, its prefill, and the rest (router, network, host).
    ttft_queue_mean: float = math.nan
    ttft_prefill_mean: float = math.nan
    ttft_rest_mean: float = math.nan


def summarize(
    run: RunResult, ceiling: Ceiling, bounds: Sequence[float], cfg: BenchConfig, wl: Workload | None = None
) -> Summary:
    rs = run.results
    ok = [r for r in rs if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    itl = [g for r in ok for g in r.itl_s]
    span = max((r.done_s or 0.0) for r in ok) if ok else math.nan
    out_tok = sum(r.output_tokens for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens or 0 for r in ok)
    good = good_tokens = 0
    for r in ok:
        tpot = sum(r.itl_s) / len(r.itl_s) if r.itl_s else 0.0
        if r.ttft_s is not None and r.ttft_s <= cfg.sla_ttft_s and tpot <= cfg.sla_itl_s:
            good += 1
            good_tokens += r.output_tokens
    hit = cached / prompt if prompt else 0.0
    # every engine of the fleet is paid for over the whole run, serving or not
    gpu_s = cfg.fleet.workers * cfg.gpus_per_worker * span if span and span > 0 else math.nan
    pw = run.per_worker
    mean_pw = sum(pw) / len(pw) if pw else 0.0
    return Summary(
        router=run.router,
        rate=run.rate,
        requests=len(rs),
        ok=len(ok),
        ttft_mean=sum(ttft) / len(ttft) if ttft else math.nan,
        ttft_p50=percentile(ttft, 50),
        ttft_p99=percentile(ttft, 99),
        itl_p50=percentile(itl, 50),
        itl_p99=percentile(itl, 99),
        e2e_mean=sum(r.e2e_s or 0 for r in ok) / len(ok) if ok else math.nan,
        throughput_tok_s=out_tok / span if span and span > 0 else math.nan,
        req_s=len(ok) / span if span and span > 0 else math.nan,
        hit_ratio=hit,
        ceiling=ceiling.ratio,
        hit_share_of_ceiling=hit / ceiling.ratio if ceiling.ratio else math.nan,
        per_worker=list(pw),
        worker_max_over_mean=max(pw) / mean_pw if mean_pw else math.nan,
        ttft_lower_bound_mean=sum(bounds) / len(bounds) if bounds else math.nan,
        goodput_req_s=good / span if span and span > 0 else math.nan,
        goodput_fraction=good / len(rs) if rs else 0.0,
        wall_s=run.wall_s,
        owner_affinity=(
            owner_affinity(wl.requests, [r.worker for r in rs], ceiling.page_size) if wl else math.nan
        ),
        host_overhead_s=_mean(
            [r.e2e_s - r.engine_e2e_s for r in ok if r.e2e_s and r.engine_e2e_s is not None]
        ),
        gpu_seconds=gpu_s,
        cost_per_m_goodput=cost_per_million_goodput(gpu_s, cfg.gpu_hour_cost, good_tokens),
        **ttft_phases(ok),
    )


def ttft_phases(ok: Sequence[RequestResult]) -> dict[str, float]:
    """Mean TTFT split of requests whose engine reported its timings: queue + prefill + rest = TTFT
    (each part clamped to what is left of the TTFT, as router.observability.phases does)."""
    q_sum = p_sum = rest_sum = 0.0
    n = 0
    for r in ok:
        if r.ttft_s is None or r.engine_queue_s is None:
            continue
        q = min(r.engine_queue_s, r.ttft_s)
        p = min(r.engine_prefill_s or 0.0, r.ttft_s - q)
        q_sum, p_sum, rest_sum, n = q_sum + q, p_sum + p, rest_sum + r.ttft_s - q - p, n + 1
    if not n:
        return {}
    return {"ttft_queue_mean": q_sum / n, "ttft_prefill_mean": p_sum / n, "ttft_rest_mean": rest_sum / n}


def phase_table(sums: Sequence[Summary]) -> str:
    """Which phase dominates TTFT, per router (engine-reported queue and prefill, the rest)."""
    head = (
        "| router | TTFT mean (s) | engine queue | prefill | router+network+other | dominant |\n"
        "|---|---:|---:|---:|---:|---|\n"
    )
    rows = []
    for s in sums:
        parts = {"engine queue": s.ttft_queue_mean, "prefill": s.ttft_prefill_mean, "other": s.ttft_rest_mean}
        if any(math.isnan(v) for v in parts.values()):
            rows.append(f"| {s.router} | {s.ttft_mean:.3f} | n/a | n/a | n/a | (no engine timings) |")
            continue
        total = sum(parts.values()) or 1.0
        top = max(parts, key=lambda k: parts[k])
        cells = " | ".join(f"{v:.3f} ({v / total:.0%})" for v in parts.values())
        rows.append(f"| {s.router} | {s.ttft_mean:.3f} | {cells} | {top} |")
    return head + "\n".join(rows) + "\n"


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def markdown_table(sums: Sequence[Summary]) -> str:
    head = (
        "| router | ok | TTFT mean (s) | TTFT p50 | TTFT p99 | ITL p50 (ms) | ITL p99 (ms) | tok/s | req/s "
        "| cache hit | of ceiling | owner affinity | req/worker max/mean | goodput "
        "| router+host overhead (s) | GPU-s | cost per M goodput tokens |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = []
    for s in sums:
        rows.append(
            f"| {s.router} | {s.ok}/{s.requests} | {s.ttft_mean:.3f} | {s.ttft_p50:.3f} | {s.ttft_p99:.3f} "
            f"| {s.itl_p50 * 1000:.1f} | {s.itl_p99 * 1000:.1f} | {s.throughput_tok_s:.0f} | {s.req_s:.2f} "
            f"| {s.hit_ratio:.1%} | {s.hit_share_of_ceiling:.1%} | {_pct(s.owner_affinity)} "
            f"| {s.worker_max_over_mean:.2f} | {s.goodput_fraction:.1%} | {s.host_overhead_s:.3f} "
            f"| {s.gpu_seconds:.0f} | {_money(s.cost_per_m_goodput)} |"
        )
    return head + "\n".join(rows) + "\n"


def _money(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x:.2f}"


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.0%}"


def sweep_table(sums: Sequence[Summary], sla_ttft: float) -> str:
    """p99 TTFT and goodput per router and rate, plus the first rate where p99 TTFT breaks the SLA."""
    rates = sorted({s.rate for s in sums})
    routers = list(dict.fromkeys(s.router for s in sums))
    by = {(s.router, s.rate): s for s in sums}
    head = "| router | " + " | ".join(f"x{r:g} p99 / goodput" for r in rates) + " | breaks SLA at |\n"
    head += "|---|" + "---:|" * len(rates) + "---:|\n"
    rows = []
    for name in routers:
        cells = []
        breaks = "never"
        for r in rates:
            s = by.get((name, r))
            if s is None:
                cells.append("-")
                continue
            cells.append(f"{s.ttft_p99:.2f} s / {s.goodput_fraction:.0%}")
            if breaks == "never" and not (s.ttft_p99 <= sla_ttft):
                breaks = f"x{r:g}"
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {breaks} |")
    return head + "\n".join(rows) + "\n"


# ---- the whole comparison ---------------------------------------------------------------------------
def default_routers(
    include_sglang: bool = True, peers: Sequence[str] = tuple(PEERS)
) -> tuple[RouterSpec, ...]:
    """kvroute's policies, then each peer's (`include_sglang` False: no peer at all)."""
    specs = [RouterSpec("kvroute", p) for p in KVROUTE_POLICIES]
    if include_sglang:
        specs += [RouterSpec(k, p) for k in peers for p in PEERS[k].policies]
    return tuple(specs)


async def compare(cfg: BenchConfig) -> list[Summary]:
    """Run every router (and every sweep rate) against one fleet; write the results folder."""
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    wl = build(cfg.workload, **cfg.workload_args)
    notes: list[str] = []
    routers = list(cfg.routers)
    for kind, peer in PEERS.items():
        if any(r.kind == kind for r in routers) and not peer_available(kind):
            routers = [r for r in routers if r.kind != kind]
            notes.append(
                f"{peer.pin} is not installed (`python -m kvroute.bench.peers install {kind}`): skipped."
            )
    fleet = cfg.fleet
    if fleet.kv_capacity_tokens is None:
        fleet = FleetSpec(
            fleet.workers,
            fleet.profile,
            fleet.page_size,
            fleet.time_scale,
            size_capacity(wl, fleet.workers, fleet.page_size),
        )
    ceiling = prefix_reuse_ceiling(wl.requests, fleet.page_size)
    from kvroute.engines.sim.profiles import get_profile

    bounds = ttft_lower_bounds(ceiling, profile_prefill_cost(get_profile(fleet.profile)))
    rates = cfg.sweep or (cfg.rate,)
    summaries: list[Summary] = []
    runs: list[RunResult] = []
    with open(out / "fleet.log", "w") as flog, open(out / "routers.log", "w") as rlog:
        async with fleet_process(fleet, flog) as urls, aiohttp.ClientSession() as http:
            for rate in rates:
                for spec in routers:
                    run = await run_router(spec, urls, wl, cfg, rate, http, rlog)
                    runs.append(run)
                    s = summarize(run, ceiling, bounds, cfg, wl)
                    summaries.append(s)
                    suffix = "" if len(rates) == 1 else f"@{rate:g}"
                    with open(out / f"{spec.name}{suffix}.jsonl", "w") as f:
                        f.writelines(r.to_json() + "\n" for r in run.results)
                    print(
                        f"{s.router}{suffix}: {s.ok}/{s.requests} ok, TTFT mean {s.ttft_mean:.3f} s p99 "
                        f"{s.ttft_p99:.3f} s, hit {s.hit_ratio:.1%} "
                        f"({s.hit_share_of_ceiling:.0%} of ceiling), "
                        f"max/mean {s.worker_max_over_mean:.2f}, owner affinity {s.owner_affinity:.0%}, "
                        f"host overhead {s.host_overhead_s:.3f} s, "
                        f"wall {s.wall_s:.0f} s",
                        file=sys.stderr,
                    )
    write_report(cfg, fleet, wl, ceiling, bounds, summaries, runs, notes)
    return summaries


def write_report(
    cfg: BenchConfig,
    fleet: FleetSpec,
    wl: Workload,
    ceiling: Ceiling,
    bounds: Sequence[float],
    summaries: Sequence[Summary],
    runs: Sequence[RunResult],
    notes: Sequence[str],
) -> None:
    out = cfg.out_dir
    base = [s for s in summaries if s.rate == (cfg.sweep[-1] if cfg.sweep else cfg.rate)]
    lines = [
        "# Router comparison",
        "",
        f"Workload: {wl.name} {json.dumps(wl.params)}, {len(wl.requests)} requests, "
        f"{wl.prompt_tokens:,} prompt tokens, rate "
        + (
            f"sweep {', '.join(f'x{r:g}' for r in cfg.sweep)} (table: x{cfg.sweep[-1]:g}). "
            if cfg.sweep
            else f"x{cfg.rate:g}. "
        ),
        f"Fleet: {fleet.workers} simulated engines, profile {fleet.profile}, page {fleet.page_size}, "
        f"KV capacity {fleet.kv_capacity_tokens:,} tokens each, time_scale {fleet.time_scale:g}. ",
        f"Prefix-reuse ceiling: {ceiling.ratio:.1%} of prompt tokens; mean TTFT lower bound "
        f"{sum(bounds) / max(1, len(bounds)):.3f} s (p99 {percentile(bounds, 99):.3f} s). ",
        f"Goodput: requests with TTFT <= {cfg.sla_ttft_s:g} s and mean ITL <= {cfg.sla_itl_s * 1000:g} ms. "
        "Times in engine seconds. Owner affinity: of the requests whose ceiling is >= 25% of their prompt, "
        "the share sent to the worker holding their prefix (routers that name the worker only). "
        "Router+host overhead: mean client e2e minus the engine's own e2e. "
        f"GPU-s: engines x {cfg.gpus_per_worker} GPU x the run's span; cost per million goodput tokens "
        f"(output tokens of requests within the SLA) at {cfg.gpu_hour_cost:g} per GPU-hour.",
        "",
        markdown_table(base),
        "## Where TTFT goes",
        "",
        "Means in engine seconds over answered requests; the engine's queue and prefill as it reports them "
        "in `meta_info` (SGLang's `queue_time` + `prefill_waiting_latency`, `prefill_launch_latency`), the "
        "rest is the router, the network and the host.",
        "",
        phase_table(base),
    ]
    if cfg.sweep:
        lines += ["## Load sweep (p99 TTFT / goodput)", "", sweep_table(summaries, cfg.sla_ttft_s)]
    lines += [f"- {n}" for n in notes]
    lines += ["", f"Command: `{' '.join(['python -m kvroute.bench.compare', *sys.argv[1:]])}`", ""]
    (out / "results.md").write_text("\n".join(lines))
    (out / "summary.json").write_text(
        json.dumps(
            {
                "workload": {"name": wl.name, "params": wl.params, "requests": len(wl.requests)},
                "fleet": asdict(fleet),
                "ceiling": ceiling.ratio,
                "ttft_lower_bound_mean": sum(bounds) / max(1, len(bounds)),
                "summaries": [asdict(s) for s in summaries],
                "notes": list(notes),
            },
            indent=1,
        )
    )
    try:
        from kvroute.bench import plots
    except ImportError as exc:  # matplotlib missing: the table is still written
        (out / "results.md").open("a").write(f"\n(no plots: {exc})\n")
        return
    plots.write_all(out, runs, summaries, bounds, ceiling.ratio, cfg.sla_ttft_s)


# ---- CLI ----------------------------------------------------------------------------------------------
QUICK = {
    "workload": "mooncake",
    "workload_args": {"start": 0, "count": 200, "max_output_tokens": 16},
    "rate": 2.0,
    "fleet": FleetSpec(workers=4, time_scale=0.25),
}


def parse_args(argv: Sequence[str] | None) -> BenchConfig:
    ap = argparse.ArgumentParser(prog="kvroute bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small run (< 3 min)")
    ap.add_argument("--workload", choices=list(WORKLOADS), default="mooncake")
    ap.add_argument("--start", type=int, default=0, help="mooncake: first request of the slice")
    ap.add_argument("--count", type=int, default=2000, help="mooncake: slice length")
    ap.add_argument("--max-output-tokens", type=int, default=None, help="cap on generated tokens per request")
    ap.add_argument("--output-scale", type=float, default=0.25, help="mooncake: multiply output lengths")
    ap.add_argument(
        "--workload-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="generator parameter (JSON value), repeatable, e.g. sessions=64",
    )
    ap.add_argument("--rate", type=float, default=2.5, help="arrival rate factor (2 = twice as fast)")
    ap.add_argument("--sweep", default="", help="comma-separated rate factors for a load sweep, e.g. 1,2,4,8")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--profile", default="h100-llama3-8b")
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="wall seconds per engine second; < 1 is faster but charges the router's own CPU time 1/scale "
        "times over (RESULTS.md: the time-compressed run)",
    )
    ap.add_argument("--kv-capacity", type=int, default=None, help="KV tokens per engine (default: sized)")
    ap.add_argument(
        "--routers", default="", help="comma list like kvroute-kv_aware:queue_weight=0.5,sglang-cache_aware"
    )
    ap.add_argument("--no-sglang", action="store_true", help="skip every peer router (--peers)")
    ap.add_argument(
        "--peers", default=",".join(PEERS), help=f"comma list of peer routers to run (of {', '.join(PEERS)})"
    )
    ap.add_argument(
        "--install-peers", action="store_true", help="pip-install missing peers into bench/.peers/ first"
    )
    ap.add_argument("--api", choices=["generate", "completions", "chat"], default="generate")
    ap.add_argument("--sla-ttft", type=float, default=2.0, help="goodput: TTFT SLA (engine s)")
    ap.add_argument("--sla-itl", type=float, default=0.1, help="goodput: mean ITL SLA (engine s)")
    ap.add_argument("--gpu-hour-cost", type=float, default=2.5, help="price of a GPU-hour (0 = unknown)")
    ap.add_argument("--gpus-per-worker", type=int, default=1, help="GPUs each engine holds")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "latest"))
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    if a.routers:
        routers = []
        for name in a.routers.split(","):
            try:
                routers.append(RouterSpec.parse(name))
            except ValueError as exc:
                ap.error(str(exc))
    else:
        peers = [k for k in a.peers.split(",") if k]
        unknown = sorted(set(peers) - set(PEERS))
        if unknown:
            ap.error(f"unknown peer(s) {unknown}; known: {', '.join(PEERS)}")
        if a.install_peers:
            for k in peers:
                if not peer_available(k):
                    install_peer(PEERS[k])
        routers = list(default_routers(not a.no_sglang, peers if not a.quick else ()))
        if a.quick and not a.no_sglang:  # every peer, with fewer policies (CI runs --quick)
            routers += [RouterSpec("sglang", p) for p in SGLANG_POLICIES if "sglang" in peers]
            routers += [RouterSpec(k, "cache_aware") for k in peers if k != "sglang"]
    wargs: dict[str, Any] = (
        {
            "start": a.start,
            "count": a.count,
            "max_output_tokens": a.max_output_tokens,
            "output_scale": a.output_scale,
        }
        if a.workload == "mooncake"
        else {}
    )
    for kv in a.workload_arg:
        key, sep, raw = kv.partition("=")
        if not sep:
            ap.error(f"--workload-arg wants KEY=VALUE, got {kv!r}")
        try:
            wargs[key] = json.loads(raw)
        except json.JSONDecodeError:
            wargs[key] = raw
    base: dict[str, Any] = {
        "workload": a.workload,
        "workload_args": wargs,
        "rate": a.rate,
        "fleet": FleetSpec(a.workers, a.profile, a.page_size, a.time_scale, a.kv_capacity),
    }
    if a.quick:
        base.update(QUICK)
    return BenchConfig(
        **base,
        routers=tuple(routers),
        api=a.api,
        out_dir=Path(a.out),
        sla_ttft_s=a.sla_ttft,
        sla_itl_s=a.sla_itl,
        gpu_hour_cost=a.gpu_hour_cost,
        gpus_per_worker=a.gpus_per_worker,
        sweep=tuple(float(x) for x in a.sweep.split(",") if x.strip()),
        progress=not a.no_progress,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--fleet-child"]:
        try:
            import uvloop

            uvloop.run(_fleet_child(json.loads(argv[1])))
        except ImportError:  # pragma: no cover - uvloop is a dependency
            asyncio.run(_fleet_child(json.loads(argv[1])))
        return 0
    cfg = parse_args(argv)
    sums = asyncio.run(compare(cfg))
    print((cfg.out_dir / "results.md").read_text())
    failed = [s.router for s in sums if s.ok != s.requests]
    if failed:
        print(f"routers with failed requests: {failed}", file=sys.stderr)
    return 0 if not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())

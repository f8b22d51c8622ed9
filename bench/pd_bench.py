"""PD benchmark: do bursts of long prompts stall running decodes? Aggregated vs disaggregated serving.

Workload (engine seconds): steady chat (Poisson, a shared system prompt plus a unique question, a
streamed answer) plus, every `burst_every_s`, a burst of long unique prompts with short outputs.
Same GPU count in every configuration, on the simulated fleet (H100 cost profile):
- `kvroute-aggregated`: N regular workers, kvroute (kv_aware) in front.
- `kvroute-pd`: P prefill + (N - P) decode workers, kvroute's PD path (`kvroute.router.pd.forward_pd`).
- `kvroute-pd-conditional`: P prefill + 1 regular + (N - P - 1) decode; prompts whose uncached part is
  short (chat, whose system prompt is cached) are served whole on the regular worker, bursts by pairs.
- `sglang-pd`: the same PD fleet as `kvroute-pd` behind
  `python -m sglang_router.launch_router --pd-disaggregation`.

Per configuration it reports the chat requests' p50/p99 ITL while a burst is being prefilled (from the
first burst arrival to the burst's last first token) and outside bursts, their ratio (target: <= 1.5
for PD), and TTFT of chat and burst requests. The fleet runs in a child process (`bench.compare
--fleet-child`), kvroute and SGLang's router each in their own, the load generator in this one.

    python -m kvroute.bench.pd_bench --duration 60 --time-scale 2 [--no-sglang] [--out bench/results/pd.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import random
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import aiohttp
import orjson
from aiohttp import web

from kvroute.bench.compare import (
    REPO,
    fleet_child,
    free_port,
    json_child,
    percentile,
    serve_router,
    sglang_router_available,
)
from kvroute.bench.loadgen import LoadgenConfig, RequestResult, run_load
from kvroute.bench.workloads import Request, block_text, poisson_arrivals
from kvroute.router.autoscale.cost import CostModel, cost_per_million_goodput, within_sla
from kvroute.router.core import Router
from kvroute.router.pd import PDConfig, PDContext, forward_pd
from kvroute.router.types import Worker, WorkerRole, WorkerState

PAGE = 16


@dataclass(frozen=True)
class PDBenchConfig:
    duration_s: float = 60.0
    chat_rate: float = 4.0  # chat requests per engine second
    chat_system_tokens: int = 1024
    chat_user_tokens: int = 256
    chat_output_tokens: int = 128
    burst_every_s: float = 20.0
    burst_size: int = 8
    burst_prompt_tokens: int = 8192
    burst_output_tokens: int = 16
    burst_spread_s: float = 0.5
    gpus: int = 4
    prefill: int = 2
    profile: str = "h100-llama3-8b"
    time_scale: float = 2.0  # wall seconds per engine second (> 1: slower than real, less CPU per token)
    seed: int = 0
    include_sglang: bool = True
    kv_events: bool = True  # kvroute subscribes to the engines' KV events
    local_max_tokens: int = 512  # kvroute-pd-conditional: uncached prompts up to this go to the regular GPU
    configs: tuple[str, ...] = ("kvroute-aggregated", "kvroute-pd", "kvroute-pd-conditional", "sglang-pd")
    sla_ttft_s: float = 2.0  # cost per million goodput tokens: a request within both targets counts
    sla_itl_s: float = 0.1
    gpu_hour_cost: float = 2.5  # per GPU-hour (every configuration holds `gpus` GPUs for the whole run)


def build_workload(cfg: PDBenchConfig) -> tuple[list[Request], set[str], list[list[str]]]:
    """(requests by arrival, chat rids, burst rids per burst)."""
    rng = random.Random(cfg.seed)
    system = block_text(0, cfg.chat_system_tokens, salt=cfg.seed)
    n_chat = max(1, int(cfg.duration_s * cfg.chat_rate))
    reqs: list[Request] = []
    chat: set[str] = set()
    for i, t in enumerate(poisson_arrivals(n_chat, cfg.chat_rate, rng)):
        rid = f"chat-{i}"
        chat.add(rid)
        text = system + block_text(1000 + i, cfg.chat_user_tokens, salt=cfg.seed)
        reqs.append(Request(rid, t, text, cfg.chat_output_tokens))
    bursts: list[list[str]] = []
    start = cfg.burst_every_s
    b = 0
    while start < cfg.duration_s - 2.0:
        ids = []
        for k in range(cfg.burst_size):
            rid = f"burst-{b}-{k}"
            ids.append(rid)
            t = start + cfg.burst_spread_s * k / max(1, cfg.burst_size - 1)
            text = block_text(10**6 + b * 1000 + k, cfg.burst_prompt_tokens, salt=cfg.seed)
            reqs.append(Request(rid, t, text, cfg.burst_output_tokens))
        bursts.append(ids)
        start += cfg.burst_every_s
        b += 1
    reqs.sort(key=lambda r: r.arrival_s)
    return reqs, chat, bursts


# ---- processes ------------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def fleet(
    cfg: PDBenchConfig, regular: int, prefill: int, decode: int, log: IO[str]
) -> AsyncIterator[list[str]]:
    args = {
        "workers": regular,
        "prefill": prefill,
        "decode": decode,
        "profile": cfg.profile,
        "page_size": PAGE,
        "time_scale": cfg.time_scale,
        "seed": cfg.seed,
    }
    async with fleet_child(args, log, "the simulated fleet exited before listing its engines") as urls:
        yield urls


async def server_info(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(url + "/server_info") as r:
        info: dict[str, Any] = await r.json()
        return info


@contextlib.asynccontextmanager
async def kvroute_front(
    roles: Sequence[tuple[str, WorkerRole]],
    http: aiohttp.ClientSession,
    aggregated: bool,
    kv_events: bool = True,
    local_max_tokens: int = 0,
) -> AsyncIterator[str]:
    """kvroute in this process: the Router, KV-event subscriptions, and an app calling `forward_pd`."""
    router = Router(block_size=PAGE, policy="kv_aware")
    for url, role in roles:
        info = await server_info(http, url)
        router.add_worker(
            Worker(
                url,
                role=role,
                state=WorkerState.HEALTHY,
                page_size=PAGE,
                bootstrap_port=info.get("disaggregation_bootstrap_port"),
                max_total_tokens=info.get("max_total_num_tokens"),
            )
        )
        kv = info.get("kv_events")
        if kv_events and isinstance(kv, dict) and kv.get("endpoint"):
            await router.subscribe(url, kv["endpoint"], kv.get("replay_endpoint"), kv.get("topic", ""))
    # Aggregated: no prefill pool, every request is "local" (the router's own policy over regular workers).
    pd_cfg = PDConfig(local_prefill_max_tokens=10**9 if aggregated else local_max_tokens)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    ctx = PDContext.create(session, router, pd_cfg)

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        parsed = orjson.loads(body)
        rr = router.routing_request(text=parsed.get("text"), input_ids=parsed.get("input_ids"))
        return await forward_pd(ctx, request, request.path, body, parsed, rr)

    app = web.Application()
    app.router.add_post("/generate", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
        await session.close()
        await router.close()


async def _kvroute_child(spec: dict[str, Any]) -> None:
    """Run kvroute's front until stdin closes; print one JSON line with its URL first."""
    roles = [(u, WorkerRole(r)) for u, r in spec["roles"]]
    async with (
        aiohttp.ClientSession() as http,
        kvroute_front(
            roles, http, bool(spec["aggregated"]), bool(spec["kv_events"]), int(spec["local_max_tokens"])
        ) as url,
    ):
        print(json.dumps({"url": url}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


@contextlib.asynccontextmanager
async def kvroute_process(
    roles: Sequence[tuple[str, WorkerRole]],
    aggregated: bool,
    kv_events: bool,
    local_max_tokens: int,
    log: IO[str],
) -> AsyncIterator[str]:
    """kvroute in its own process, like SGLang's router: the load generator does not share its CPU."""
    spec = {
        "roles": [(u, r.value) for u, r in roles],
        "aggregated": aggregated,
        "kv_events": kv_events,
        "local_max_tokens": local_max_tokens,
    }
    argv = ["-m", "kvroute.bench.pd_bench", "--kvroute-child", json.dumps(spec)]
    async with json_child(argv, log, 60, "kvroute exited before listening (see pd_bench.log)") as ready:
        yield str(ready["url"])


@contextlib.asynccontextmanager
async def sglang_pd_front(
    prefill: Sequence[str], decode: Sequence[str], http: aiohttp.ClientSession, log: IO[str]
) -> AsyncIterator[str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "sglang_router.launch_router",
        "--pd-disaggregation",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--prometheus-host",
        "127.0.0.1",
        "--prometheus-port",
        str(free_port()),
        "--log-level",
        "warn",
    ]
    for url in prefill:
        info = await server_info(http, url)
        cmd += ["--prefill", url, str(info.get("disaggregation_bootstrap_port"))]
    for url in decode:
        cmd += ["--decode", url]
    async with serve_router(cmd, port, len(prefill) + len(decode), log, http) as url:
        yield url


# ---- analysis -------------------------------------------------------------------------------------
@dataclass
class Summary:
    name: str
    ok: int
    failed: int
    itl_p50_calm_ms: float
    itl_p99_calm_ms: float
    itl_p50_burst_ms: float
    itl_p99_burst_ms: float
    itl_p99_ratio: float
    chat_ttft_p50_ms: float
    chat_ttft_p99_ms: float
    chat_ttft_p99_burst_ms: float
    burst_ttft_p50_ms: float
    burst_ttft_p99_ms: float
    burst_windows_s: list[tuple[float, float]]
    sla_attainment: float = math.nan
    gpu_seconds: float = math.nan
    cost_per_m_goodput: float = math.nan


def summarize(
    name: str,
    results: Sequence[RequestResult],
    chat: set[str],
    bursts: list[list[str]],
    cfg: PDBenchConfig | None = None,
) -> Summary:
    by_rid = {r.rid: r for r in results}
    windows: list[tuple[float, float]] = []
    for ids in bursts:
        rs = [by_rid[i] for i in ids if i in by_rid]
        start = min(r.scheduled_s for r in rs)
        ends = [r.scheduled_s + r.start_lag_s + r.ttft_s for r in rs if r.ttft_s is not None]
        windows.append((start, max(ends) if ends else start + 1.0))

    def where(t: float) -> str:
        for a, b in windows:
            if a <= t <= b:
                return "burst"
            if a - 1.0 <= t <= b + 2.0:
                return "edge"
        return "calm"

    calm: list[float] = []
    burst: list[float] = []
    chat_ttft: list[float] = []
    chat_ttft_burst: list[float] = []
    for r in results:
        if r.rid not in chat or not r.ok or r.ttft_s is None:
            continue
        t_first = r.scheduled_s + r.start_lag_s + r.ttft_s
        chat_ttft.append(r.ttft_s)
        if where(r.scheduled_s) == "burst":
            chat_ttft_burst.append(r.ttft_s)
        for t, gap in zip(itertools.accumulate(r.itl_s, initial=t_first), r.itl_s, strict=False):
            place = where(t + gap)
            if place == "burst":
                burst.append(gap)
            elif place == "calm":
                calm.append(gap)
    burst_ttft = [r.ttft_s for r in results if r.rid not in chat and r.ok and r.ttft_s is not None]
    ms = 1000.0
    p99_calm = percentile(calm, 99)
    c = cfg if cfg is not None else PDBenchConfig()
    model = CostModel(c.gpu_hour_cost, {}, c.sla_ttft_s, c.sla_itl_s)
    good = [r for r in results if r.ok and within_sla(r.ttft_s, r.itl_s, model)]
    span = max((r.done_s or 0.0) for r in results) if results else math.nan
    gpu_s = c.gpus * span
    return Summary(
        name,
        sum(r.ok for r in results),
        sum(not r.ok for r in results),
        percentile(calm, 50) * ms,
        p99_calm * ms,
        percentile(burst, 50) * ms,
        percentile(burst, 99) * ms,
        percentile(burst, 99) / p99_calm if p99_calm else float("nan"),
        percentile(chat_ttft, 50) * ms,
        percentile(chat_ttft, 99) * ms,
        percentile(chat_ttft_burst, 99) * ms,
        percentile(burst_ttft, 50) * ms,
        percentile(burst_ttft, 99) * ms,
        windows,
        len(good) / len(results) if results else math.nan,
        gpu_s,
        cost_per_million_goodput(gpu_s, c.gpu_hour_cost, sum(r.output_tokens for r in good)),
    )


def _money(x: float) -> str:
    return f"{x:.2f}" if math.isfinite(x) else "-"


def table(sums: Sequence[Summary]) -> str:
    head = (
        "| config | ok/failed | ITL p50 calm | ITL p99 calm | ITL p50 burst | ITL p99 burst | p99 ratio "
        "| chat TTFT p50 | chat TTFT p99 | chat TTFT p99 (burst) | burst TTFT p50 | burst TTFT p99 "
        "| SLA attainment | GPU-s | cost per M goodput tokens |"
    )
    lines = [head, "|" + "---|" * 15]
    for s in sums:
        lines.append(
            f"| {s.name} | {s.ok}/{s.failed} | {s.itl_p50_calm_ms:.1f} | {s.itl_p99_calm_ms:.1f} | "
            f"{s.itl_p50_burst_ms:.1f} | {s.itl_p99_burst_ms:.1f} | {s.itl_p99_ratio:.2f}x | "
            f"{s.chat_ttft_p50_ms:.0f} | {s.chat_ttft_p99_ms:.0f} | {s.chat_ttft_p99_burst_ms:.0f} | "
            f"{s.burst_ttft_p50_ms:.0f} | {s.burst_ttft_p99_ms:.0f} | {s.sla_attainment:.1%} | "
            f"{s.gpu_seconds:.0f} | {_money(s.cost_per_m_goodput)} |"
        )
    return "\n".join(lines) + (
        "\n(latencies in engine milliseconds: wall / time_scale; SLA: TTFT and mean ITL within the targets; "
        "GPU-s: the configuration's GPUs x the run's span; cost at the GPU-hour price, per million output "
        "tokens of requests within the SLA)"
    )


# ---- driver ---------------------------------------------------------------------------------------
async def run_one(name: str, cfg: PDBenchConfig, log: IO[str]) -> Summary:
    reqs, chat, bursts = build_workload(cfg)
    n, p = cfg.gpus, cfg.prefill
    aggregated = name == "kvroute-aggregated"
    conditional = name == "kvroute-pd-conditional"
    if aggregated:
        regular, prefill, decode = n, 0, 0
    elif conditional:  # one GPU moves from the decode pool to a regular pool for short prompts
        regular, prefill, decode = 1, p, n - p - 1
    else:
        regular, prefill, decode = 0, p, n - p
    async with aiohttp.ClientSession() as http, fleet(cfg, regular, prefill, decode, log) as urls:
        roles = (
            [(u, WorkerRole.REGULAR) for u in urls[:regular]]
            + [(u, WorkerRole.PREFILL) for u in urls[regular : regular + prefill]]
            + [(u, WorkerRole.DECODE) for u in urls[regular + prefill :]]
        )
        if name == "sglang-pd":
            front = sglang_pd_front(urls[:prefill], urls[prefill:], http, log)
        else:
            local = cfg.local_max_tokens if conditional else 0
            front = kvroute_process(roles, aggregated, cfg.kv_events, local, log)
        async with front as base:
            lg = LoadgenConfig(
                base_url=base,
                api="generate",
                time_scale=cfg.time_scale,
                label=name,
                progress=False,
                request_timeout_s=600.0,
            )
            t0 = time.perf_counter()
            results = await run_load(reqs, lg)
            wall = time.perf_counter() - t0
            print(f"# {name}: {len(results)} requests in {wall:.0f} s wall", file=sys.stderr)
    return summarize(name, results, chat, bursts, cfg)


async def main_async(cfg: PDBenchConfig, out: Path | None) -> list[Summary]:
    names = [n for n in cfg.configs if n != "sglang-pd" or cfg.include_sglang]
    if "sglang-pd" in names and not sglang_router_available():
        print("# sglang_router not installed: skipping sglang-pd", file=sys.stderr)
        names.remove("sglang-pd")
    sums = []
    log_path = (out.parent if out else REPO / "bench" / "results") / "pd_bench.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:
        for name in names:
            sums.append(await run_one(name, cfg, log))
    print(table(sums))
    for s in sums:
        if "-pd" in s.name:
            verdict = "meets" if s.itl_p99_ratio <= 1.5 else "misses"
            print(f"{s.name}: p99 ITL during bursts {s.itl_p99_ratio:.2f}x calm ({verdict} the 1.5x target)")
    if out is not None:
        out.write_text(json.dumps({"config": asdict(cfg), "results": [asdict(s) for s in sums]}, indent=1))
    return sums


def parse_args(argv: Sequence[str] | None) -> tuple[PDBenchConfig, Path | None]:
    d = PDBenchConfig()
    p = argparse.ArgumentParser(prog="python -m kvroute.bench.pd_bench", description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=d.duration_s, help="engine seconds of workload")
    p.add_argument("--chat-rate", type=float, default=d.chat_rate)
    p.add_argument("--chat-output", type=int, default=d.chat_output_tokens)
    p.add_argument("--burst-every", type=float, default=d.burst_every_s)
    p.add_argument("--burst-size", type=int, default=d.burst_size)
    p.add_argument("--burst-prompt", type=int, default=d.burst_prompt_tokens)
    p.add_argument("--gpus", type=int, default=d.gpus)
    p.add_argument("--prefill", type=int, default=d.prefill, help="prefill workers in the PD fleets")
    p.add_argument("--profile", default=d.profile)
    p.add_argument("--time-scale", type=float, default=d.time_scale)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--sla-ttft", type=float, default=d.sla_ttft_s, help="cost: TTFT target (engine s)")
    p.add_argument("--sla-itl", type=float, default=d.sla_itl_s, help="cost: mean ITL target (engine s)")
    p.add_argument("--gpu-hour-cost", type=float, default=d.gpu_hour_cost, help="price of a GPU-hour")
    p.add_argument("--no-sglang", action="store_true")
    p.add_argument("--no-kv-events", action="store_true", help="kvroute routes without KV events")
    p.add_argument("--configs", default=",".join(d.configs), help="comma-separated subset to run")
    p.add_argument("--out", type=Path, default=None, help="write the summaries as JSON here")
    a = p.parse_args(argv)
    if not 0 < a.prefill < a.gpus - 1:
        p.error("--prefill must be between 1 and --gpus - 2 (the conditional fleet also needs a decode GPU)")
    cfg = PDBenchConfig(
        duration_s=a.duration,
        chat_rate=a.chat_rate,
        chat_output_tokens=a.chat_output,
        burst_every_s=a.burst_every,
        burst_size=a.burst_size,
        burst_prompt_tokens=a.burst_prompt,
        gpus=a.gpus,
        prefill=a.prefill,
        profile=a.profile,
        time_scale=a.time_scale,
        seed=a.seed,
        sla_ttft_s=a.sla_ttft,
        sla_itl_s=a.sla_itl,
        gpu_hour_cost=a.gpu_hour_cost,
        include_sglang=not a.no_sglang,
        kv_events=not a.no_kv_events,
        configs=tuple(c for c in a.configs.split(",") if c),
    )
    unknown = set(cfg.configs) - set(d.configs)
    if unknown:
        p.error(f"unknown configs {sorted(unknown)}; known: {', '.join(d.configs)}")
    return cfg, a.out


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--kvroute-child"]:
        asyncio.run(_kvroute_child(json.loads(args[1])))
        return 0
    cfg, out = parse_args(args)
    asyncio.run(main_async(cfg, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Two tenants on one fleet: a chat tenant with a 1 s TTFT SLO beside a batch surge past capacity.

Chat: `--chat-rate` req/s (Poisson), a shared 1,000-token system prompt + a 500-token question, 32
output tokens. Batch: unique 12,000-token documents at `--batch-factor` x the fleet's prefill
capacity for such documents (from the GPU profile), `--batch-output` tokens each. Both for
`--seconds` on 4 simulated H100 engines (Llama-3-8B profile) in real time, with SGLang's
`--enable-priority-scheduling` on every engine, through:

  none   kvroute --policy kv_aware, no tenants (what a new user gets)
  tenants  kvroute with chat `interactive` and batch `batch` (router/tenants, router/admission.py)
  smg    SGLang's gateway (smg 1.13) with its own admission: a concurrency bound with a queue and its
         worker overload protection (the flags that work over plain HTTP)
  calib  kvroute, no tenants, the batch load alone: the batch output the fleet serves when saturated

Targets for `tenants`: chat TTFT p99 <= 1 s and >= 99 % of chat within the SLO; every batch request
completed or answered 429 with Retry-After (0 lost, 0 hung, 0 5xx); batch output tokens completed in
the window >= 80 % of what the fleet serves beside the chat load (calib x (1 - chat's share of
prefill time)). Writes bench/report/tenants/{report.json, summary.md, ttft_over_time.png, *.jsonl}.

    python -m kvroute.bench.tenants                       # none, tenants, smg, calib; 60 s each
    python -m kvroute.bench.tenants --only tenants --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import aiohttp

from kvroute.bench.compare import REPO, fleet_child, percentile, serve_router
from kvroute.bench.loadgen import LoadgenConfig, RequestResult, read_results, run_load
from kvroute.bench.workloads import ALPHABET, Request
from kvroute.engines.sim.fleet import free_port
from kvroute.engines.sim.profiles import get_profile

MODEL = "sim/llama3-8b"  # what the simulated engines serve (smg answers 404 for any other model)
PROFILE = "h100-llama3-8b"
ENGINES = 4
CHAT_KEY, BATCH_KEY = "sk-bench-chat", "sk-bench-batch"
TENANTS_TOML = f"""
[tenants.chat]
class = "interactive"
api_keys = ["{CHAT_KEY}"]

[tenants.batch]
class = "batch"
api_keys = ["{BATCH_KEY}"]
"""
SLO_S = 1.0
RUNS = ("none", "tenants", "smg", "calib")


@dataclass(frozen=True)
class Args:
    seconds: float
    chat_rate: float
    batch_factor: float
    batch_output: int
    seed: int
    out: Path
    only: tuple[str, ...]
    time_scale: float = 1.0  # wall seconds per engine second; 1 = real time (the target's setting)
    router_args: tuple[str, ...] = ()  # extra `kvroute serve` flags for the tenants run (e.g. a bound)


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choices(ALPHABET, k=n))


def prefill_s(tokens: int, cached: int = 0) -> float:
    """Engine seconds to prefill `tokens` new tokens after `cached` ones, in 8192-token chunks."""
    p = get_profile(PROFILE)
    total, prior, left = 0.0, cached, tokens
    while left > 0:
        c = min(p.chunked_prefill_size, left)
        total += p.step_ms([(c, prior)], 0, 0) / 1000
        prior += c
        left -= c
    return total


def workload(a: Args) -> tuple[list[Request], list[Request], float]:
    """(chat, batch, batch rate in docs/s)."""
    rng = random.Random(a.seed)
    system = _text(rng, 1000)
    chat: list[Request] = []
    t = rng.expovariate(a.chat_rate)
    while t < a.seconds:
        chat.append(Request(f"chat-{len(chat)}", t, system + _text(rng, 500), 32, session="chat"))
        t += rng.expovariate(a.chat_rate)
    batch_rate = a.batch_factor * ENGINES / prefill_s(12_000)
    batch: list[Request] = []
    t = rng.expovariate(batch_rate)
    while t < a.seconds:
        batch.append(Request(f"batch-{len(batch)}", t, _text(rng, 12_000), a.batch_output, session="batch"))
        t += rng.expovariate(batch_rate)
    return chat, batch, batch_rate


def router_cmd(run: str, urls: Sequence[str], port: int, out: Path, extra: Sequence[str] = ()) -> list[str]:
    if run == "smg":
        smg = str(Path(sys.executable).parent / "smg")
        return [
            smg, "launch", "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *urls,
            "--policy", "cache_aware", "--prometheus-host", "127.0.0.1",
            "--prometheus-port", str(free_port()), "--log-level", "warn",
            # smg's admission: a bound on requests in flight with a queue and its timeout (as kvroute's
            # batch class: 60 s), plus its worker overload protection (on by default: 8 waiting
            # requests or 0.8 KV usage). Its priority scheduler and tenant keys are not used: they
            # sort by a class the request must carry, which plain OpenAI clients do not send.
            "--max-concurrent-requests", "64", "--queue-size", "4096", "--queue-timeout-secs", "60",
        ]  # fmt: skip
    cmd = [
        sys.executable, "-m", "kvroute.router.cli", "serve", "--worker-urls", *urls, "--policy", "kv_aware",
        "--host", "127.0.0.1", "--port", str(port), "--block-size", "16", "--log-level", "warning",
    ]  # fmt: skip
    if run == "calib":  # the fleet's capacity: no router timeout may cut a long engine queue short
        cmd += ["--stream-idle-timeout-secs", "0", "--stall-timeout-secs", "0"]
    if run == "tenants":
        cfg = out / "tenants.toml"
        cfg.write_text(TENANTS_TOML)
        cmd += ["--config", str(cfg), *extra]
    return cmd


async def run_one(
    run: str, chat: list[Request], batch: list[Request], a: Args, log: TextIO
) -> dict[str, Any]:
    fleet = {
        "workers": ENGINES,
        "profile": PROFILE,
        "page_size": 16,
        "time_scale": a.time_scale,
        "seed": a.seed,
        "enable_priority_scheduling": True,
    }
    async with (
        aiohttp.ClientSession() as http,
        fleet_child(fleet, log, "the simulated fleet exited early (see bench.log)") as urls,
    ):
        port = free_port()
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        async with serve_router(
            router_cmd(run, urls, port, a.out, a.router_args), port, len(urls), log, http, env
        ) as url:
            load_before = os.getloadavg()
            t0 = time.monotonic()

            def cfg(label: str, key: str) -> LoadgenConfig:
                return LoadgenConfig(
                    url, "completions", time_scale=a.time_scale, model=MODEL, label=label, progress=False,
                    max_concurrency=8192, request_timeout_s=(a.seconds + 240) * a.time_scale,
                    headers=(("Authorization", f"Bearer {key}"),),
                )  # fmt: skip

            loads = [run_load(batch, cfg("batch", BATCH_KEY), a.out / f"{run}-batch.jsonl")]
            if run != "calib":
                loads.append(run_load(chat, cfg("chat", CHAT_KEY), a.out / f"{run}-chat.jsonl"))
            results = await asyncio.gather(*loads)
            wall = time.monotonic() - t0
            load_after = os.getloadavg()
    out: dict[str, Any] = {
        "run": run,
        "wall_s": round(wall, 1),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
        "batch": summarize(results[0], a.seconds),
    }
    if run != "calib":
        out["chat"] = summarize(results[1], a.seconds)
    out["_results"] = {"batch": results[0], "chat": results[1] if run != "calib" else []}
    return out


def summarize(res: Sequence[RequestResult], window_s: float) -> dict[str, Any]:
    ok = [r for r in res if r.ok]
    ttft = sorted(r.ttft_s for r in ok if r.ttft_s is not None)
    r429 = [r for r in res if r.status == 429]
    errors = [r for r in res if not r.ok and r.status != 429]
    return {
        "sent": len(res),
        "ok": len(ok),
        "http_429": len(r429),
        "http_429_with_retry_after": sum(1 for r in r429 if r.retry_after),
        "http_5xx": sum(1 for r in errors if r.status is not None and r.status >= 500),
        "lost": sum(1 for r in errors if r.status is None or r.status < 500),  # dropped/hung/broken
        "errors_sample": sorted({(r.error or "")[:120] for r in errors})[:5],
        "ttft_p50_s": round(percentile(ttft, 50), 3) if ttft else None,
        "ttft_p90_s": round(percentile(ttft, 90), 3) if ttft else None,
        "ttft_p99_s": round(percentile(ttft, 99), 3) if ttft else None,
        "within_slo": round(sum(1 for t in ttft if t <= SLO_S) / len(res), 4) if res else None,
        "output_tokens": sum(r.output_tokens for r in ok),
        "output_tokens_in_window": sum(
            r.output_tokens for r in ok if r.done_s is not None and r.done_s <= window_s
        ),
        "last_done_s": round(max((r.done_s or 0.0) for r in ok), 1) if ok else None,
    }


def verdict(report: dict[str, Any], a: Args) -> dict[str, Any]:
    """The issue's targets for the `tenants` run (when it and calib ran)."""
    t = report["runs"].get("tenants")
    if t is None:
        return {}
    chat, batch = t["chat"], t["batch"]
    chat_share = a.chat_rate * prefill_s(500, cached=1000) / ENGINES
    out: dict[str, Any] = {
        "chat_ttft_p99_le_1s": chat["ttft_p99_s"] is not None and chat["ttft_p99_s"] <= SLO_S,
        "chat_within_slo_ge_99pct": (chat["within_slo"] or 0) >= 0.99,
        "batch_all_completed_or_429_retry_after": batch["lost"] == 0
        and batch["http_5xx"] == 0
        and batch["http_429"] == batch["http_429_with_retry_after"],
        "chat_share_of_prefill_time": round(chat_share, 4),
    }
    calib = report["runs"].get("calib")
    if calib is not None:
        beside = calib["batch"]["output_tokens_in_window"] * (1 - chat_share)
        frac = batch["output_tokens_in_window"] / beside if beside else 0.0
        out["batch_capacity_beside_chat_tokens"] = round(beside)
        out["batch_fraction_of_capacity"] = round(frac, 3)
        out["batch_ge_80pct"] = frac >= 0.8
    return out


def plot(path: Path, runs: dict[str, dict[str, Any]], time_scale: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in ("none", "tenants", "smg") if r in runs]
    if not shown:
        return
    fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 4), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], shown, strict=True):
        for tenant, colour in (("batch", "tab:orange"), ("chat", "tab:blue")):
            rs = [r for r in runs[name]["_results"][tenant] if r.ok and r.ttft_s]
            ax.scatter([r.scheduled_s for r in rs], [r.ttft_s for r in rs], s=4, c=colour, label=tenant)
        ax.axhline(SLO_S, color="k", ls="--", lw=0.8, label="chat SLO 1 s")
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("arrival (s)")
    axes[0][0].set_ylabel("TTFT (s)")
    axes[0][0].legend(loc="upper left", fontsize=8)
    speed = "real time" if time_scale == 1 else f"time scale {time_scale:g}, engine seconds"
    fig.suptitle(f"TTFT over time per tenant (4 simulated H100s, {speed})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "| run | tenant | sent | ok | 429 (Retry-After) | 5xx | lost | TTFT p50 / p99 (s) | within 1 s | "
        "output tok (in window) | loadavg before/after |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["runs"].items():
        for tenant in ("chat", "batch"):
            s = r.get(tenant)
            if s is None:
                continue
            cells = [
                name, tenant, s["sent"], s["ok"], f"{s['http_429']} ({s['http_429_with_retry_after']})",
                s["http_5xx"], s["lost"], f"{s['ttft_p50_s']} / {s['ttft_p99_s']}",
                f"{(s['within_slo'] or 0) * 100:.1f}%",
                f"{s['output_tokens']} ({s['output_tokens_in_window']})",
                f"{r['loadavg_before'][0]} / {r['loadavg_after'][0]}",
            ]  # fmt: skip
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n\n```\n" + json.dumps(report.get("verdict", {}), indent=1) + "\n```\n"


def _merge_earlier(report: dict[str, Any], a: Args) -> None:
    """Keep the runs an earlier invocation wrote to the same folder (`--only` reruns one of them): their
    report entry, with results read back from their JSON lines. Each entry says its own command."""
    path = a.out / "report.json"
    if not path.exists():
        return
    earlier = json.loads(path.read_text())
    for name, entry in earlier.get("runs", {}).items():
        if name in report["runs"]:
            continue
        results: dict[str, list[RequestResult]] = {"batch": [], "chat": []}
        for tenant in results:
            f = a.out / f"{name}-{tenant}.jsonl"
            if f.exists():
                results[tenant] = read_results(f)
        report["runs"][name] = {
            **entry,
            "command": entry.get("command", earlier.get("command")),
            "date": entry.get("date", earlier.get("date")),
            "_results": results,
        }


async def main_async(a: Args) -> dict[str, Any]:
    a.out.mkdir(parents=True, exist_ok=True)
    chat, batch, batch_rate = workload(a)
    report: dict[str, Any] = {
        "command": "python -m kvroute.bench.tenants " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} CPUs (shared), Python {sys.version.split()[0]}",
        "params": {
            **{k: str(v) for k, v in asdict(a).items()},
            "batch_rate_docs_per_s": round(batch_rate, 2),
            "chat_requests": len(chat),
            "batch_requests": len(batch),
        },  # fmt: skip
        "runs": {},
    }
    with open(a.out / "bench.log", "w", encoding="utf-8") as log:
        for run in a.only:
            print(f"[bench.tenants] {run}: {len(chat)} chat + {len(batch)} batch requests", file=sys.stderr)
            report["runs"][run] = await run_one(run, chat, batch, a, log)
            report["runs"][run]["command"] = report["command"]
            report["runs"][run]["date"] = report["date"]
            s = {k: v for k, v in report["runs"][run].items() if k != "_results"}
            print(json.dumps(s), file=sys.stderr)
    _merge_earlier(report, a)
    plot(a.out / "ttft_over_time.png", report["runs"], a.time_scale)
    report["verdict"] = verdict(report, a)
    for r in report["runs"].values():
        r.pop("_results", None)
    (a.out / "report.json").write_text(json.dumps(report, indent=1))
    (a.out / "summary.md").write_text(markdown(report))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvroute.bench.tenants", description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--chat-rate", type=float, default=6.0)
    ap.add_argument("--batch-factor", type=float, default=1.5)
    ap.add_argument("--batch-output", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="wall seconds per engine second (1: real time, the target's setting; 2: half speed, for a "
        "host too loaded to keep up: latencies stay in engine seconds)",
    )
    ap.add_argument("--out", default=str(REPO / "bench" / "report" / "tenants"))
    ap.add_argument(
        "--router-arg",
        action="append",
        default=[],
        help="extra `kvroute serve` flag for the tenants run (repeatable)",
    )
    ap.add_argument("--only", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    ns = ap.parse_args(argv)
    only = tuple(x.strip() for x in ns.only.split(",") if x.strip())
    bad = [x for x in only if x not in RUNS]
    if bad:
        ap.error(f"unknown run(s) {bad}; choose from {', '.join(RUNS)}")
    a = Args(
        ns.seconds,
        ns.chat_rate,
        ns.batch_factor,
        ns.batch_output,
        ns.seed,
        Path(ns.out),
        only,
        ns.time_scale,
        tuple(ns.router_arg),
    )
    report = asyncio.run(main_async(a))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

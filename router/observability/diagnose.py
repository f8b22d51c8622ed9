"""`kvroute diagnose URL`: why is TTFT high right now, and on which worker.

Reads a running router's `GET /admin/status` (the recent-requests window: TTFT quantiles, the phase
split of each worker's slowest requests, hit ratios, load, breaker, KV-event health) and ranks, per
worker, where its TTFT p99 goes and the likely causes. Pure analysis (`diagnose`) apart from the fetch,
so it is tested on recorded snapshots as well as live.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

PHASE_WORDS = {
    "admission": "the router's admission queue",
    "route": "routing",
    "connect": "connecting to the engine",
    "engine_queue": "the engine's queue",
    "engine_prefill": "prefill",
    "other": "other (network, tokenizer, unreported engine time)",
}
LAG_WARN_S = 5.0


@dataclass
class Cause:
    """One likely cause, with a severity used for ranking (higher first) and a sentence for humans."""

    kind: str
    severity: float
    text: str
    phase: str | None = None


@dataclass
class WorkerDiagnosis:
    url: str
    requests: int
    ttft_p99_s: float | None
    ttft_p50_s: float | None
    slowdown: float | None  # this worker's TTFT p99 / the median worker's
    dominant_phase: str | None
    dominant_share: float | None  # of the p99 tail's TTFT
    causes: list[Cause] = field(default_factory=list)
    source: str = "window"  # "metrics": figures since the router started (no request in the window)

    def line(self) -> str:
        head = f"{self.url}: "
        if self.ttft_p99_s is None:
            head += "no requests in the window"
        else:
            head += f"TTFT p99 {self.ttft_p99_s:.3g} s" + (" since start" if self.source == "metrics" else "")
            if self.slowdown is not None:
                head += f" ({self.slowdown:.1f}x the median worker)"
        return head + "".join(f"; {c.text}" for c in self.causes)


@dataclass
class Diagnosis:
    window_s: float
    requests: int
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    fleet_hit_ratio: float | None
    worst: str | None  # the worker to look at first
    workers: list[WorkerDiagnosis]
    fleet_causes: list[Cause]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def report(self) -> str:
        def s(v: float | None, unit: str = " s") -> str:
            return "n/a" if v is None else f"{v:.3g}{unit}"

        lines = [
            f"last {self.window_s:g} s: {self.requests} requests, TTFT p50 {s(self.ttft_p50_s)}, "
            f"p99 {s(self.ttft_p99_s)}, fleet hit ratio "
            + ("n/a" if self.fleet_hit_ratio is None else f"{self.fleet_hit_ratio:.0%}")
        ]
        if self.worst is not None:
            lines.append(f"look first at {self.worst}")
        lines += [f"  {c.text}" for c in self.fleet_causes]
        lines += ["  " + w.line() for w in self.workers]
        return "\n".join(lines)


def _quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus' histogram_quantile over cumulative (upper bound, count) pairs, +Inf last."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_b, prev_c = 0.0, 0.0
    for b, c in buckets:
        if c >= rank:
            if math.isinf(b):
                return prev_b
            return prev_b + (b - prev_b) * ((rank - prev_c) / (c - prev_c) if c > prev_c else 1.0)
        prev_b, prev_c = b, c
    return prev_b


def windows_from_metrics(text: str) -> dict[str, dict[str, Any]]:
    """Per worker, a window-shaped summary since the router started, from /metrics (for when the
    recent-requests ring is off or empty): TTFT quantiles from `kvroute_ttft_seconds`, the mean phase
    split from `kvroute_ttft_phase_seconds`, hit ratio and uncached tokens from the token series."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets: dict[str, dict[float, float]] = {}
    phase_sum: dict[str, dict[str, float]] = {}
    phase_cnt: dict[str, float] = {}
    tok: dict[str, dict[str, float]] = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            w = smp.labels.get("worker")
            if w is None:
                continue
            if smp.name == "kvroute_ttft_seconds_bucket":
                le = float(smp.labels["le"])
                per = buckets.setdefault(w, {})
                per[le] = per.get(le, 0.0) + smp.value  # summed over policies
            elif smp.name == "kvroute_ttft_phase_seconds_sum":
                phase_sum.setdefault(w, {})[smp.labels["phase"]] = smp.value
            elif smp.name == "kvroute_ttft_phase_seconds_count" and smp.labels.get("phase") == "route":
                phase_cnt[w] = smp.value
            elif smp.name in (
                "kvroute_prompt_tokens_total",
                "kvroute_cached_tokens_total",
                "kvroute_new_prompt_tokens_sum",
                "kvroute_new_prompt_tokens_count",
            ):
                tok.setdefault(w, {})[smp.name] = smp.value
    out: dict[str, dict[str, Any]] = {}
    for w in set(buckets) | set(phase_sum):
        cum = sorted(buckets.get(w, {}).items())
        n = phase_cnt.get(w, 0.0)
        t = tok.get(w, {})
        prompt, cached = t.get("kvroute_prompt_tokens_total", 0.0), t.get("kvroute_cached_tokens_total", 0.0)
        new_n = t.get("kvroute_new_prompt_tokens_count", 0.0)
        out[w] = {
            "requests": int(cum[-1][1]) if cum else 0,
            "ttft_p50_s": _quantile(cum, 0.5),
            "ttft_p99_s": _quantile(cum, 0.99),
            "p99_phases_s": {k: v / n for k, v in phase_sum.get(w, {}).items()} if n else {},
            "hit_ratio": cached / prompt if prompt else None,
            "new_tokens_mean": t.get("kvroute_new_prompt_tokens_sum", 0.0) / new_n if new_n else None,
            "source": "metrics",
        }
    return out


def diagnose(status: dict[str, Any], since_start: dict[str, dict[str, Any]] | None = None) -> Diagnosis:
    """Rank workers (slowest TTFT p99 first) and each worker's causes (most severe first).

    `since_start` (`windows_from_metrics`): used for workers with no request in the status window (the
    ring off or idle): their figures then cover the router's life, and the phase split is the mean, not
    the tail's."""
    fleet = status.get("fleet", {})
    workers = [dict(w) for w in status.get("workers", [])]
    for w in workers:
        if not w.get("window", {}).get("requests") and since_start and w["url"] in since_start:
            w["window"] = since_start[w["url"]]
    if not fleet.get("requests") and since_start:
        fleet = {**fleet, "hit_ratio": _fleet_hit(since_start)}
    p99s = [w["window"]["ttft_p99_s"] for w in workers if w["window"].get("ttft_p99_s") is not None]
    median_p99 = statistics.median(p99s) if p99s else None
    fleet_hit = fleet.get("hit_ratio")
    news = [w["window"]["new_tokens_mean"] for w in workers if w["window"].get("new_tokens_mean")]
    fleet_new = statistics.mean(news) if news else None
    queued = [w["load"].get("engine_queued") for w in workers if w["load"].get("engine_queued") is not None]
    mean_queued = statistics.mean(queued) if queued else None
    out: list[WorkerDiagnosis] = []
    for w in workers:
        win = w["window"]
        p99 = win.get("ttft_p99_s")
        slowdown = p99 / median_p99 if p99 is not None and median_p99 else None
        d = WorkerDiagnosis(
            w["url"], win.get("requests", 0), p99, win.get("ttft_p50_s"), slowdown, None, None
        )
        d.source = win.get("source", "window")
        weight = slowdown or 1.0
        tail = win.get("p99_phases_s") or {}
        total = sum(tail.values())
        if total > 0:
            phase, secs = max(tail.items(), key=lambda kv: kv[1])
            d.dominant_phase, d.dominant_share = phase, secs / total
            d.causes.append(
                Cause(
                    "phase",
                    weight * (1.0 + d.dominant_share),
                    f"{d.dominant_share:.0%} of "
                    + ("TTFT p99" if d.source == "window" else "mean TTFT since start")
                    + f" in {PHASE_WORDS.get(phase, phase)}",
                    phase,
                )
            )
        hit = win.get("hit_ratio")
        if hit is not None and fleet_hit is not None and fleet_hit - hit >= 0.15:
            d.causes.append(
                Cause(
                    "cache_miss",
                    weight * (fleet_hit - hit) * 2,
                    f"hit ratio {hit:.0%} vs fleet {fleet_hit:.0%}",
                )
            )
        new = win.get("new_tokens_mean")
        if new and fleet_new and new / fleet_new >= 1.5:
            d.causes.append(
                Cause(
                    "prefill_load",
                    weight * (new / fleet_new - 1),
                    f"{new / fleet_new:.1f}x the fleet's mean prefill load (uncached prompt tokens)",
                )
            )
        q = w["load"].get("engine_queued")
        if q and mean_queued and q >= 2 and q / mean_queued >= 1.5:
            d.causes.append(Cause("engine_queued", weight * 0.5, f"{q} requests queued in the engine now"))
        if w.get("circuit") not in (None, "closed"):
            d.causes.append(Cause("breaker", 10.0, f"circuit breaker {w['circuit']}"))
        if w.get("state") not in ("healthy", None):
            d.causes.append(Cause("state", 10.0, f"worker {w['state']}"))
        if w.get("blind"):
            d.causes.append(Cause("blind", 3.0, "routing blind: no KV events from this worker"))
        ev = w.get("events") or {}
        lag = ev.get("lag_s")
        if isinstance(lag, int | float) and lag > LAG_WARN_S:
            d.causes.append(Cause("event_lag", 2.0, f"KV events {lag:.0f} s behind"))
        d.causes.sort(key=lambda c: -c.severity)
        out.append(d)
    out.sort(key=lambda d: (d.ttft_p99_s is None, -(d.ttft_p99_s or 0.0)))
    fleet_causes: list[Cause] = []
    fleet_tail = fleet.get("p99_phases_s") or {}
    if sum(fleet_tail.values()) > 0:
        phase, secs = max(fleet_tail.items(), key=lambda kv: kv[1])
        share = secs / sum(fleet_tail.values())
        fleet_causes.append(
            Cause("phase", share, f"fleet: {share:.0%} of TTFT p99 in {PHASE_WORDS.get(phase, phase)}", phase)
        )
    if status.get("replicas", {}).get("degraded"):
        fleet_causes.append(
            Cause("replica", 5.0, "replica degraded: Redis unreachable, routing on local state")
        )
    worst = out[0].url if out and out[0].ttft_p99_s is not None else None
    return Diagnosis(
        window_s=float(status.get("window_s", 0.0)),
        requests=int(fleet.get("requests", 0)),
        ttft_p50_s=fleet.get("ttft_p50_s"),
        ttft_p99_s=fleet.get("ttft_p99_s"),
        fleet_hit_ratio=fleet_hit,
        worst=worst,
        workers=out,
        fleet_causes=fleet_causes,
    )


def _fleet_hit(since_start: dict[str, dict[str, Any]]) -> float | None:
    ratios = [w["hit_ratio"] for w in since_start.values() if w.get("hit_ratio") is not None]
    return statistics.mean(ratios) if ratios else None


async def fetch_status(
    url: str, token: str | None, window_s: float, timeout_s: float = 10.0
) -> dict[str, Any]:
    import aiohttp

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as s,
        s.get(url.rstrip("/") + "/admin/status", params={"window_s": str(window_s)}, headers=headers) as r,
    ):
        body = await r.read()
        if r.status != 200:
            raise RuntimeError(f"GET /admin/status: HTTP {r.status}: {body[:300].decode(errors='replace')}")
        data = orjson.loads(body)
        if not isinstance(data, dict):
            raise RuntimeError("GET /admin/status: not a JSON object")
        return data


async def fetch(url: str, token: str | None, window_s: float) -> tuple[dict[str, Any], str | None]:
    """The status snapshot and the /metrics text (None when it cannot be read: the status suffices)."""
    import aiohttp

    status = await fetch_status(url, token, window_s)
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10.0)) as s,
            s.get(url.rstrip("/") + "/metrics") as r,
        ):
            return status, (await r.text()) if r.status == 200 else None
    except (TimeoutError, OSError, aiohttp.ClientError):
        return status, None


def main(argv: Sequence[str]) -> int:
    import os

    import aiohttp

    p = argparse.ArgumentParser(prog="kvroute diagnose", description=__doc__.split("\n")[0])
    p.add_argument("url", help="the router's base URL, e.g. http://127.0.0.1:30000")
    p.add_argument("--admin-token", default=os.environ.get("KVROUTE_ADMIN_TOKEN"), help="admin bearer token")
    p.add_argument("--window", type=float, default=60.0, help="seconds of recent requests to look at")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(list(argv))
    try:
        status, metrics = asyncio.run(fetch(args.url, args.admin_token, args.window))
    except (TimeoutError, OSError, RuntimeError, ValueError, aiohttp.ClientError) as exc:
        print(f"kvroute diagnose: cannot read {args.url}: {exc}", file=sys.stderr)
        return 1
    d = diagnose(status, windows_from_metrics(metrics) if metrics else None)
    if args.json:
        sys.stdout.write(orjson.dumps(d.as_dict(), option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(d.report())
    return 0

"""PNG plots of a comparison: TTFT distributions, cache hits against the ceiling, load per worker, sweep.

matplotlib with the Agg backend (no display); one figure per file, closed after saving.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

if TYPE_CHECKING:
    from kvroute.bench.compare import RunResult, Summary


def _cdf(xs: Sequence[float]) -> tuple[list[float], list[float]]:
    s = sorted(xs)
    n = len(s)
    return s, [(i + 1) / n for i in range(n)]


def ttft_cdf(path: Path, runs: Sequence[RunResult], bounds: Sequence[float]) -> None:
    """TTFT distribution per router (CDF, log time axis) with the per-request lower bound dashed."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for run in runs:
        ttft = [r.ttft_s for r in run.results if r.ok and r.ttft_s is not None and r.ttft_s > 0]
        if ttft:
            ax.plot(*_cdf(ttft), label=run.router)
    lb = [b for b in bounds if b > 0]
    if lb:
        ax.plot(*_cdf(lb), "k--", label="lower bound (ceiling, no queueing)")
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (engine seconds)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TTFT distribution per router")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def hit_vs_ceiling(path: Path, sums: Sequence[Summary], ceiling: float) -> None:
    """Engine-reported cache-hit ratio per router, against the workload's prefix-reuse ceiling."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = [s.router for s in sums]
    vals = [s.hit_ratio * 100 for s in sums]
    bars = ax.bar(range(len(sums)), vals, color="tab:blue")
    ax.axhline(ceiling * 100, color="k", linestyle="--", label=f"ceiling {ceiling:.1%}")
    for b, s in zip(bars, sums, strict=True):
        ax.annotate(
            f"{s.hit_share_of_ceiling:.0%}",
            (b.get_x() + b.get_width() / 2, b.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xticks(range(len(sums)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("prompt tokens served from cache (%)")
    ax.set_title("Cache hits vs prefix-reuse ceiling (label: share of ceiling)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_per_worker(path: Path, runs: Sequence[RunResult]) -> None:
    """Requests running + waiting on each engine over time, one panel per router."""
    runs = [r for r in runs if r.load_series]
    if not runs:
        return
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 2.0 * len(runs) + 0.5), sharex=True, squeeze=False)
    for ax, run in zip(axes[:, 0], runs, strict=True):
        t = [p["t"] for p in run.load_series]
        n = len(run.load_series[0]["running"])
        for w in range(n):
            ax.plot(t, [p["running"][w] + p["waiting"][w] for p in run.load_series], linewidth=0.8)
        ax.set_ylabel("reqs", fontsize=8)
        ax.set_title(f"{run.router} (per-worker requests: {run.per_worker})", fontsize=8)
        ax.grid(True, alpha=0.3)
    axes[-1, 0].set_xlabel("time (engine seconds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sweep(path: Path, sums: Sequence[Summary], sla_ttft: float) -> None:
    """p99 TTFT and goodput against the arrival-rate factor, per router."""
    routers = list(dict.fromkeys(s.router for s in sums))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name in routers:
        pts = sorted((s.rate, s.ttft_p99, s.goodput_fraction) for s in sums if s.router == name)
        a1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        a2.plot([p[0] for p in pts], [p[2] * 100 for p in pts], marker="o", label=name)
    a1.axhline(sla_ttft, color="k", linestyle="--", label=f"SLA {sla_ttft:g} s")
    a1.set_yscale("log")
    a1.set_xlabel("arrival rate factor")
    a1.set_ylabel("p99 TTFT (engine s)")
    a2.set_xlabel("arrival rate factor")
    a2.set_ylabel("goodput (% of requests within SLA)")
    a1.legend(fontsize=8)
    for a in (a1, a2):
        a.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(
    out: Path,
    runs: Sequence[RunResult],
    sums: Sequence[Summary],
    bounds: Sequence[float],
    ceiling: float,
    sla_ttft: float,
) -> list[Path]:
    """Write every plot that applies; return their paths."""
    rates = sorted({s.rate for s in sums})
    top = rates[-1] if rates else 0.0
    base_runs = [r for r in runs if r.rate == top]
    base_sums = [s for s in sums if s.rate == top]
    paths = [out / "ttft_cdf.png", out / "hit_vs_ceiling.png", out / "load_per_worker.png"]
    ttft_cdf(paths[0], base_runs, bounds)
    hit_vs_ceiling(paths[1], base_sums, ceiling)
    load_per_worker(paths[2], base_runs)
    if len(rates) > 1:
        paths.append(out / "sweep.png")
        sweep(paths[-1], sums, sla_ttft)
    return [p for p in paths if p.exists()]

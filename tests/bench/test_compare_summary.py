"""Summaries, tables and CLI parsing of the comparison runner, on hand-made results (no processes)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from kvroute.bench.compare import (
    BenchConfig,
    RouterSpec,
    RunResult,
    markdown_table,
    parse_args,
    percentile,
    router_command,
    summarize,
    sweep_table,
)
from kvroute.bench.loadgen import RequestResult
from kvroute.bench.workloads import Request
from kvroute.bench.workloads.ceiling import prefix_reuse_ceiling


def _res(rid: str, ttft: float, itl: list[float], cached: int, prompt: int, done: float) -> RequestResult:
    return RequestResult(
        rid,
        "r",
        True,
        prompt,
        0.0,
        ttft_s=ttft,
        e2e_s=ttft + sum(itl),
        itl_s=itl,
        output_tokens=len(itl) + 1,
        cached_tokens=cached,
        done_s=done,
    )


def test_percentile_interpolates() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([5.0], 99) == 5.0
    assert math.isnan(percentile([], 50))


def test_summary_figures() -> None:
    reqs = [Request("a", 0.0, "aaaabbbbcc", 2), Request("b", 1.0, "aaaabbbbdd", 2)]
    ceiling = prefix_reuse_ceiling(reqs, 4)  # 8 of 20 prompt tokens
    results = [
        _res("a", 1.0, [0.05], cached=0, prompt=10, done=2.0),
        _res("b", 3.0, [0.2], cached=8, prompt=10, done=4.0),  # misses the TTFT and ITL SLAs
        RequestResult("c", "r", False, 10, 2.0, error="HTTP 503"),
    ]
    cfg = BenchConfig(sla_ttft_s=2.0, sla_itl_s=0.1)
    s = summarize(RunResult("r", 1.0, results, [2, 1], [], 1.0), ceiling, [0.5, 0.25], cfg)
    assert (s.requests, s.ok) == (3, 2)
    assert s.ttft_mean == pytest.approx(2.0)
    assert s.hit_ratio == pytest.approx(8 / 20)
    assert s.hit_share_of_ceiling == pytest.approx(1.0)
    assert s.worker_max_over_mean == pytest.approx(2 / 1.5)
    assert s.ttft_lower_bound_mean == pytest.approx(0.375)
    assert s.goodput_fraction == pytest.approx(1 / 3)
    assert s.throughput_tok_s == pytest.approx(4 / 4.0)  # 4 output tokens over 4 engine seconds
    # 8 engines (the default fleet) x 1 GPU x a 4 s span; 2 goodput tokens (request a) at 2.5 per GPU-hour
    assert s.gpu_seconds == pytest.approx(32.0)
    assert s.cost_per_m_goodput == pytest.approx(32.0 / 3600 * 2.5 / 2e-6)
    table = markdown_table([s])
    assert "| r | 2/3 | 2.000 |" in table and "40.0%" in table and "| 32 | 11111.11 |" in table

    fast = summarize(RunResult("r", 2.0, results[:1], [1, 0], [], 1.0), ceiling, [0.5], cfg)
    sweep = sweep_table([s, fast], sla_ttft=2.0)
    assert "| r |" in sweep and "breaks SLA at" in sweep
    assert sweep.strip().splitlines()[-1].endswith("| x1 |")  # p99 at x1 is ~3 s > 2 s


def test_cli_parsing(tmp_path: Path) -> None:
    cfg = parse_args(
        ["--routers", "kvroute-kv_aware,sglang-cache_aware", "--sweep", "1,2", "--out", str(tmp_path)]
    )
    assert cfg.routers == (RouterSpec("kvroute", "kv_aware"), RouterSpec("sglang", "cache_aware"))
    assert cfg.sweep == (1.0, 2.0) and cfg.out_dir == tmp_path
    tuned = RouterSpec.parse("kvroute-kv_aware:queue_weight=0.5")
    assert tuned == RouterSpec("kvroute", "kv_aware", ("queue_weight=0.5",))
    assert tuned.name == "kvroute-kv_aware:queue_weight=0.5"
    cmd = router_command(tuned, ["http://127.0.0.1:1"], 8000, 64)
    assert cmd[-2:] == ["--policy-param", "queue_weight=0.5"] and "--block-size" in cmd
    sg = router_command(RouterSpec.parse("sglang-cache_aware:cache-threshold=0.5"), ["u"], 8000, 16)
    assert sg[-2:] == ["--cache-threshold", "0.5"]
    # No flags = the comparison the README records, in real time (compression charges the proxy 1/scale x).
    d = parse_args([])
    assert (d.fleet.time_scale, d.fleet.page_size, d.fleet.workers, d.rate) == (1.0, 64, 8, 2.5)
    assert d.workload_args["count"] == 2000 and d.workload_args["output_scale"] == 0.25
    quick = parse_args(["--quick"])
    assert quick.fleet.workers < 8 and len(quick.routers) >= 4
    with pytest.raises(SystemExit):
        parse_args(["--routers", "nginx"])
    mt = parse_args(
        ["--workload", "multiturn", "--workload-arg", "sessions=4", "--workload-arg", "think_s=0.5"]
    )
    assert mt.workload_args == {"sessions": 4, "think_s": 0.5}

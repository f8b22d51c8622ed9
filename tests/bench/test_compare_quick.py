"""`python -m kvroute.bench.compare --quick` end to end: every router in front of the simulated fleet."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvroute.bench.compare import KVROUTE_POLICIES, SGLANG_POLICIES, peer_available, sglang_router_available

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_quick_comparison_completes_and_every_router_serves_every_request(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "kvroute.bench.compare", "--quick", "--out", str(out), "--no-progress"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    n = summary["workload"]["requests"]
    assert n > 0
    expected = [f"kvroute-{p}" for p in KVROUTE_POLICIES]
    if sglang_router_available():
        expected += [f"sglang-{p}" for p in SGLANG_POLICIES]
    expected += [f"{k}-cache_aware" for k in ("smg", "vllm-router") if peer_available(k)]  # today's peers
    by_router = {s["router"]: s for s in summary["summaries"]}
    assert sorted(by_router) == sorted(expected)
    for name in expected:
        s = by_router[name]
        assert s["ok"] == s["requests"] == n, name
        assert sum(s["per_worker"]) == n, name  # the engines saw exactly these requests
    table = (out / "results.md").read_text()
    assert all(f"| {name} |" in table for name in expected)
    for png in ("ttft_cdf.png", "hit_vs_ceiling.png", "load_per_worker.png"):
        assert (out / png).stat().st_size > 0

"""deploy/: the Grafana dashboard and the Prometheus rules parse, and every metric they name is one
kvroute exports (router/metrics.py's registry, PD metrics included) or a rule recorded in deploy/."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvroute.router.metrics import Metrics
from kvroute.router.pd_metrics import PDMetrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "kvroute-dashboard.json"
RULES = DEPLOY / "prometheus" / "kvroute-alerts.yaml"
NAME = re.compile(r"\bkvroute[a-z0-9_:]*")
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
}


def exported_series() -> set[str]:
    """Every series name a kvroute /metrics can carry."""
    metrics = Metrics()
    PDMetrics(metrics.registry)
    names: set[str] = set()
    for fam in metrics.registry.collect():
        for suffix in SUFFIXES.get(fam.type, ("",)):
            names.add(fam.name + suffix)
    return names


def _exprs(node: Any) -> Iterator[str]:
    """PromQL of panels and query variables (a datasource variable's `query` is a plugin type)."""
    if isinstance(node, dict) and node.get("type") == "datasource" and "name" in node:
        return
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("expr", "query", "definition") and isinstance(v, str):
                yield v
            else:
                yield from _exprs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _exprs(v)


def _rules() -> dict[str, Any]:
    data = yaml.safe_load(RULES.read_text())
    assert isinstance(data, dict) and data["groups"]
    return data


def _recorded(rules: dict[str, Any]) -> set[str]:
    return {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}


def test_exported_series_include_the_ones_deploy_relies_on() -> None:
    names = exported_series()
    assert {"kvroute_ttft_seconds_bucket", "kvroute_ttft_phase_seconds_sum", "kvroute_blind_workers"} <= names
    assert "kvroute_requests_total" in names and "kvroute_requests" not in names


def test_every_rule_parses_and_names_exported_metrics() -> None:
    rules = _rules()
    known = exported_series() | _recorded(rules)
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    assert {a["alert"] for a in alerts} >= {
        "KvrouteTTFTSLOFastBurn",
        "KvrouteBlindWorkers",
        "KvrouteBreakerOpen",
        "KvrouteReplicaDegraded",
        "KvrouteIndexBehindEvents",
    }
    for g in rules["groups"]:
        for r in g["rules"]:
            assert isinstance(r["expr"], str) and r["expr"].strip()
            used = set(NAME.findall(r["expr"]))
            assert used, f"{r.get('alert') or r.get('record')} names no kvroute metric"
            assert used <= known, f"{r.get('alert') or r.get('record')}: unknown {sorted(used - known)}"
    for a in alerts:
        assert a["annotations"]["summary"] and a["labels"]["severity"]


def test_every_dashboard_query_names_exported_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text())
    known = exported_series() | _recorded(_rules())
    exprs = list(_exprs(dash))
    assert len(exprs) >= 20
    for e in exprs:
        used = set(NAME.findall(e))
        assert used, f"query names no kvroute metric: {e}"
        assert used <= known, f"unknown {sorted(used - known)} in {e}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    titles = {p["title"] for p in dash["panels"]}
    assert "TTFT phases, fleet (mean seconds per request)" in titles


def test_promtool_accepts_the_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(
            "promtool not installed (Debian package 'prometheus'; scripts/setup.sh installs it as root)"
        )
    out = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout

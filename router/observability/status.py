"""The status snapshot behind `GET /admin/status`: the one JSON document the status page and
`kvroute diagnose` read. Fleet state comes from the registry and the index; latency (TTFT quantiles,
the phase split, hit ratios, routing decisions) from the recent-requests ring over a time window."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

from kvroute.router.observability.ring import RecentRequests, summarize


def build_status(
    *,
    ring: RecentRequests,
    workers: list[dict[str, Any]],
    index_stats: Mapping[str, Any],
    policy: str,
    ready: bool,
    replicas: Mapping[str, Any] | None,
    window_s: float,
    tenants: Any = None,
) -> dict[str, Any]:
    """`workers`: the registry's `describe_all()`; `index_stats`: `Router.index_stats()`;
    `replicas`: the replica runtime's status (None: a single replica); `tenants`: `tenant_rows`
    (None: admission off)."""
    now = time.time()
    recent = ring.window(now - window_s)
    by_worker: dict[str, list[Any]] = {}
    for ph in recent:
        by_worker.setdefault(ph.worker, []).append(ph)
    per_worker_index = index_stats.get("workers", {})
    blind = set(index_stats.get("blind_workers", []))
    fleet = summarize(recent)
    out_workers = []
    for d in workers:
        url = d["url"]
        st = per_worker_index.get(url, {}) if isinstance(per_worker_index, Mapping) else {}
        stream = st.get("stream") if isinstance(st, Mapping) else None
        load = d.get("load", {})
        out_workers.append(
            {
                "url": url,
                "role": d.get("role"),
                "state": d.get("state"),
                "circuit": d.get("circuit"),
                "blind": url in blind,
                "load": load,
                "kv_usage": load.get("engine_token_usage"),
                "cached_blocks": st.get("blocks") if isinstance(st, Mapping) else None,
                "events": (
                    {k: stream.get(k) for k in ("events", "gaps", "lag_s")}
                    if isinstance(stream, Mapping)
                    else None
                ),
                "window": summarize(by_worker.get(url, [])).as_dict(),
            }
        )
    decisions: Counter[tuple[str, str]] = Counter(
        (ph.policy, ph.reason_class) for ph in recent if ph.reason_class
    )
    return {
        "time": now,
        "window_s": window_s,
        "policy": policy,
        "ready": ready,
        "fleet": {
            **fleet.as_dict(),
            "workers": len(workers),
            "healthy": sum(1 for d in workers if d.get("state") == "healthy"),
            "request_rate": len(recent) / window_s if window_s else None,
        },
        "workers": out_workers,
        "decisions": [{"policy": p, "reason": r, "count": n} for (p, r), n in sorted(decisions.items())],
        "index": {
            "block_size": index_stats.get("block_size"),
            "blocks": sum(
                int(s.get("blocks") or 0) for s in per_worker_index.values() if isinstance(s, Mapping)
            )
            if isinstance(per_worker_index, Mapping)
            else None,
            "inflight_blocks": index_stats.get("inflight_blocks"),
            "dropped_batches": index_stats.get("dropped_batches"),
            "blind_workers": sorted(blind),
        },
        "replicas": {"enabled": False} if replicas is None else {"enabled": True, **replicas},
        "tenants": tenants,
    }


def tenant_rows(by_tenant: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Per (tenant, class): admitted, queued, in flight, rejected, SLO attainment and mean queue wait
    (from the tenants' usage book, `{tenant: {class: usage}}`)."""
    rows = []
    for tenant, classes in sorted(by_tenant.items()):
        for cls, u in sorted(classes.items()):
            rejected = u.get("rejected") or {}
            rows.append(
                {
                    "tenant": tenant,
                    "class": cls,
                    "admitted": u.get("admitted"),
                    "queued": u.get("queued"),
                    "in_flight": u.get("in_flight"),
                    "rejected": sum(rejected.values()) if isinstance(rejected, Mapping) else rejected,
                    "slo_attainment": u.get("slo_attainment"),
                    "mean_queue_wait_s": u.get("mean_queue_wait_s"),
                }
            )
    return rows

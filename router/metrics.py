"""Every Prometheus object of the router, on one per-app registry, prefix `kvroute_`.

Labels (bounded: routes and policies are fixed sets, workers are the registered fleet):
- `route`: the client path (`/generate`, `/v1/completions`, `/v1/chat/completions`).
- `policy`: the routing policy that chose the worker.
- `worker`: the engine's base URL; `"none"` when no worker was chosen.
- `status`: HTTP status returned to the client, as a string.
- `kind`: error class (`upstream_unreachable`, `upstream_timeout`, `upstream_5xx`, `upstream_429`,
  `stream_broken`, `client_disconnect`, `no_worker`, `bad_request`).
- `reason`: why a retry happened (same values as `kind`).
- `state`: worker state (`pending`, `healthy`, `unhealthy`, `draining`, `rejected`); on
  `kvroute_worker_circuit_state`, the breaker's (`closed`, `half_open`, `open`).
- `phase`: a part of TTFT (`kvroute.router.observability.phases.TTFT_PHASES`: admission, route, connect,
  engine_queue, engine_prefill, other).
- `reason`: on `kvroute_route_decisions`, the class of the policy's choice (`prefix_hit`, `load`,
  `imbalance`, `explore`).
- `tenant`: the tenant (router/tenants), its first `--tenant-metrics-limit` names, later ones `other`.
- `class`: the SLA class (the configured set). `outcome`: admitted | rejected | disconnected |
  unauthorized; `reason`: why a rejection (quota_concurrency, quota_tokens, queue_full, queue_timeout,
  no_queue), "" otherwise. `result`: met | missed (TTFT SLO). `kind`: prompt | output (tokens).

Under `kvroute serve --processes N` (router/supervisor.py) prometheus_client runs in multiprocess mode
(PROMETHEUS_MULTIPROC_DIR set): counters and histograms are summed over the processes; a gauge takes the
most recently set value among live processes (`livemostrecent`: the loads are router-wide already,
through Redis, and gauges are refreshed by whichever process answers the scrape).
"""

from __future__ import annotations

import bisect
import os
import platform
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from kvroute.router._version import __version__
from kvroute.router.types import Worker, WorkerState

# Latency buckets in seconds: sub-millisecond (router overhead, cached prefills) up to long generations.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0
)  # fmt: skip
# Gaps between tokens in seconds (TPOT, ITL; also `kvroute.router.pd_metrics`).
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)
# TTFT phases in seconds: from tens of microseconds (the routing decision) to minutes (a long queue).
PHASE_BUCKETS = (0.0001, 0.00025, 0.0005) + LATENCY_BUCKETS
# Prompt tokens per request (prefill work), up to long-context prompts.
TOKEN_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATEST: Final = "livemostrecent"  # gauges under multiprocess mode (see the module docstring)
CIRCUIT_STATES = ("closed", "half_open", "open")
_RATIO = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class Metrics:
    """The router's metrics. Create one per app (tests run many apps in one process)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.multiprocess_dir = os.environ.get(MULTIPROC_DIR_ENV) or None
        _runtime_collectors(r)
        self._children: dict[tuple[str, str, str, int], _Children] = {}
        self.requests = Counter(
            "kvroute_requests",
            "Requests answered, by route, policy, worker and status.",
            ["route", "policy", "worker", "status"],
            registry=r,
        )
        self.errors = Counter(
            "kvroute_errors",
            "Failed requests and failed attempts, by route, worker and kind.",
            ["route", "worker", "kind"],
            registry=r,
        )
        self.retries = Counter(
            "kvroute_retries",
            "Attempts re-sent to the next-best worker, by route and reason.",
            ["route", "reason"],
            registry=r,
        )
        self.ttft = Histogram(
            "kvroute_ttft_seconds",
            "Time from request arrival to the first token sent back.",
            ["policy", "worker"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "kvroute_tpot_seconds",
            "Mean time per output token after the first, per request.",
            ["policy", "worker"],
            buckets=TOKEN_GAP_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "kvroute_itl_seconds",
            "Inter-token latency: each gap between two streamed tokens (SSE data events), as the router "
            "received them; events delivered together share their gap evenly.",
            ["policy", "worker"],
            buckets=TOKEN_GAP_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "kvroute_e2e_seconds",
            "Time from request arrival to the end of the response.",
            ["route", "policy"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "kvroute_prompt_tokens", "Prompt tokens reported by the engines.", ["worker"], registry=r
        )
        self.cached_tokens = Counter(
            "kvroute_cached_tokens",
            "Prompt tokens the engines served from their prefix cache (cached_tokens).",
            ["worker"],
            registry=r,
        )
        self.cached_ratio = Histogram(
            "kvroute_cached_token_ratio",
            "Per request: engine-reported cached_tokens / prompt_tokens.",
            ["policy"],
            buckets=_RATIO,
            registry=r,
        )
        self.predicted_blocks = Counter(
            "kvroute_predicted_cached_blocks",
            "Blocks the router believed cached on the chosen worker.",
            ["worker"],
            registry=r,
        )
        self.index_blocks = Gauge(
            "kvroute_index_blocks",
            "Blocks the index holds per worker.",
            ["worker"],
            registry=r,
            multiprocess_mode=LATEST,
        )
        self.in_flight = Gauge(
            "kvroute_worker_in_flight",
            "Requests routed and not finished, per worker.",
            ["worker"],
            registry=r,
            multiprocess_mode=LATEST,
        )
        self.pending_prefill = Gauge(
            "kvroute_worker_pending_prefill_tokens",
            "Uncached prompt tokens routed with no first token yet, per worker.",
            ["worker"],
            registry=r,
            multiprocess_mode=LATEST,
        )
        self.active_blocks = Gauge(
            "kvroute_worker_active_blocks",
            "KV blocks held by running requests.",
            ["worker"],
            registry=r,
            multiprocess_mode=LATEST,
        )
        self.engine_running = Gauge(
            "kvroute_worker_engine_running",
            "Running requests per /get_load.",
            ["worker"],
            registry=r,
            multiprocess_mode=LATEST,
        )
        self.engine_queued = Gauge(
            "kvroute_worker_engine_queued",
            "Queued requests per /get_load.",
            ["worker"],
            registry=r,
            multiprocess_mode=LATEST,
        )
        self.worker_state = Gauge(
            "kvroute_worker_state",
            "1 for the worker's current state, else 0.",
            ["worker", "state"],
            registry=r,
            multiprocess_mode=LATEST,
        )
        self.event_lag = Gauge(
            "kvroute_event_lag_seconds",
            "Age of the last KV event applied per worker (engine timestamp to now).",
            ["worker"],
            registry=r,
            multiprocess_mode=LATEST,
        )
        # Counters (exposed as *_total), advanced at scrape time by what the subscriber counted since.
        self.event_gaps = Counter(
            "kvroute_event_gaps",
            "Sequence gaps seen in a worker's KV event stream.",
            ["worker"],
            registry=r,
        )
        self.events = Counter(
            "kvroute_events",
            "KV events applied per worker.",
            ["worker"],
            registry=r,
        )
        self._stream_seen: dict[tuple[str, str], float] = {}  # (counter, worker) -> subscriber count seen
        self.blind_workers = Gauge(
            "kvroute_blind_workers",
            "Workers serving traffic whose KV events never arrived (routing blind).",
            registry=r,
            multiprocess_mode=LATEST,
        )
        self.worker_blind = Gauge(
            "kvroute_worker_blind",
            "1 when this worker serves traffic with no KV events.",
            ["worker"],
            registry=r,
            multiprocess_mode=LATEST,
        )
        self.circuit_opened = Counter(
            "kvroute_circuit_opened", "Times a worker's circuit breaker opened.", ["worker"], registry=r
        )
        self.circuit_state = Gauge(
            "kvroute_worker_circuit_state",
            "1 for the state this worker's circuit breaker is in (closed, half_open, open).",
            ["worker", "state"],
            registry=r,
            multiprocess_mode=LATEST,
        )
        self.stalls = Counter(
            "kvroute_worker_stalls",
            "Times a worker with requests in flight made no progress for --stall-timeout-secs and was taken "
            "out of routing.",
            ["worker"],
            registry=r,
        )
        self.protocol_errors = Counter(
            "kvroute_protocol_errors",
            "Client connections refused or closed for a protocol reason (kind: bad_request, header_timeout, "
            "too_many_connections).",
            ["kind"],
            registry=r,
        )
        self.health_check_failures = Counter(
            "kvroute_health_check_failures", "Failed health checks.", ["worker"], registry=r
        )
        self.ttft_phase = Histogram(
            "kvroute_ttft_phase_seconds",
            "Per request: the part of its TTFT spent in each phase (the phases add up to the TTFT; "
            "docs/observability.md).",
            ["worker", "phase"],
            buckets=PHASE_BUCKETS,
            registry=r,
        )
        self.new_prompt_tokens = Histogram(
            "kvroute_new_prompt_tokens",
            "Per request: prompt tokens the engine had to prefill (prompt - cached_tokens), by worker.",
            ["worker"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.route_decisions = Counter(
            "kvroute_route_decisions",
            "Routing decisions by policy and class of reason.",
            ["policy", "reason"],
            registry=r,
        )
        self.replica_peers = Gauge(
            "kvroute_replica_peers",
            "Other router replicas whose load was counted at the last Redis sync (0 without --redis-url).",
            registry=r,
            multiprocess_mode=LATEST,
        )
        self.replica_degraded = Gauge(
            "kvroute_replica_degraded",
            "1 while Redis is unreachable and this replica routes on its own state only.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.build_info = Gauge(
            "kvroute_build_info",
            "Always 1; the labels say which kvroute (version) runs on which Python.",
            ["version", "python"],
            registry=r,
            multiprocess_mode=LATEST,
        )
        self.build_info.labels(__version__, platform.python_version()).set(1)
        # Discovery (router/discovery/): `source` is kubernetes | dns | file.
        self.discovered_workers = Gauge(
            "kvroute_discovery_workers",
            "Workers the discovery source listed in its last snapshot.",
            ["source"],
            registry=r,
            multiprocess_mode=LATEST,
        )
        self.discovery_changes = Counter(
            "kvroute_discovery_changes",
            "Registry changes made by discovery, by source and change (added, retired, returned).",
            ["source", "change"],
            registry=r,
        )
        self.discovery_errors = Counter(
            "kvroute_discovery_errors",
            "Discovery failures (API, DNS or file errors); the last known workers stay in force.",
            ["source"],
            registry=r,
        )

        tc = ["tenant", "class"]
        self.tenant_requests = Counter(
            "kvroute_tenant_requests",
            "Admission outcomes by tenant, class, outcome and rejection reason.",
            [*tc, "outcome", "reason"],
            registry=r,
        )
        self.tenant_queue_wait = Histogram(
            "kvroute_tenant_queue_wait_seconds",
            "Time admitted requests waited in the router's admission queue.",
            tc,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tenant_ttft = Histogram(
            "kvroute_tenant_ttft_seconds",
            "TTFT by tenant and class.",
            tc,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tenant_itl = Histogram(
            "kvroute_tenant_itl_seconds",
            "Inter-token latency by tenant and class.",
            tc,
            buckets=TOKEN_GAP_BUCKETS,
            registry=r,
        )
        self.tenant_slo = Counter(
            "kvroute_tenant_ttft_slo",
            "Requests judged against their class's TTFT SLO, by result (met | missed).",
            [*tc, "result"],
            registry=r,
        )
        self.tenant_tokens = Counter(
            "kvroute_tenant_tokens", "Tokens served by tenant, class and kind.", [*tc, "kind"], registry=r
        )
        self.tenant_ended = Counter(
            "kvroute_tenant_finished",
            "Admitted requests that ended, by tenant, class and result (ok | failed).",
            [*tc, "result"],
            registry=r,
        )
        self.quota_degraded = Gauge(
            "kvroute_quota_degraded",
            "1 while Redis is unreachable and tenant quotas are enforced per process.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.quota_redis_outages = Counter(
            "kvroute_quota_redis_outages", "Times the quotas fell back to per-process.", registry=r
        )

    # --- discovery (router.discovery.sync.DiscoveryObserver) ---------------------------------------

    def discovery_change(self, source: str, change: str) -> None:
        self.discovery_changes.labels(source, change).inc()

    def discovery_error(self, source: str) -> None:
        self.discovery_errors.labels(source).inc()

    def discovery_workers(self, source: str, n: int) -> None:
        self.discovered_workers.labels(source).set(n)

    # --- tenants (router.tenants.usage.TenantSink) ---------------------------------------------

    def tenant_outcome(self, tenant: str, sla_class: str, outcome: str, reason: str) -> None:
        self.tenant_requests.labels(tenant, sla_class, outcome, reason).inc()

    def tenant_finished(
        self,
        tenant: str,
        sla_class: str,
        *,
        queue_wait_s: float,
        ttft_s: float | None,
        itl_gaps: list[tuple[float, int]],
        slo_met: bool | None,
        prompt_tokens: int,
        output_tokens: int,
        ok: bool,
    ) -> None:
        self.tenant_ended.labels(tenant, sla_class, "ok" if ok else "failed").inc()
        self.tenant_queue_wait.labels(tenant, sla_class).observe(queue_wait_s)
        if ttft_s is not None:
            self.tenant_ttft.labels(tenant, sla_class).observe(ttft_s)
        if itl_gaps:
            child = self.tenant_itl.labels(tenant, sla_class)
            for gap, n in itl_gaps:
                observe_n(child, gap, n)
        if slo_met is not None:
            self.tenant_slo.labels(tenant, sla_class, "met" if slo_met else "missed").inc()
        if prompt_tokens:
            self.tenant_tokens.labels(tenant, sla_class, "prompt").inc(prompt_tokens)
        if output_tokens:
            self.tenant_tokens.labels(tenant, sla_class, "output").inc(output_tokens)

    def observe_request(
        self,
        route: str,
        policy: str,
        worker: str,
        status: int,
        *,
        e2e_s: float,
        ttft_s: float | None,
        tpot_s: float | None,
        itl_gaps: Iterable[tuple[float, int]] = (),
        prompt_tokens: int | None,
        cached_tokens: int | None,
        predicted_blocks: int,
    ) -> None:
        """Everything one answered request records; label children are cached (this is the hot path)."""
        key = (route, policy, worker, status)
        ch = self._children.get(key)
        if ch is None:
            ch = self._children[key] = _Children(
                self.requests.labels(route, policy, worker, str(status)),
                self.e2e.labels(route, policy),
                self.ttft.labels(policy, worker),
                self.tpot.labels(policy, worker),
                self.itl.labels(policy, worker),
                self.prompt_tokens.labels(worker),
                self.cached_tokens.labels(worker),
                self.cached_ratio.labels(policy),
                self.predicted_blocks.labels(worker),
            )
        ch.requests.inc()
        if status >= 400:
            return
        ch.e2e.observe(e2e_s)
        if predicted_blocks:
            ch.predicted.inc(predicted_blocks)
        if ttft_s is not None:
            ch.ttft.observe(ttft_s)
        if tpot_s is not None:
            ch.tpot.observe(tpot_s)
        for gap, n in itl_gaps:
            observe_n(ch.itl, gap, n)
        if prompt_tokens:
            ch.prompt.inc(prompt_tokens)
            if cached_tokens is not None:
                ch.cached.inc(cached_tokens)
                ch.ratio.observe(min(1.0, cached_tokens / prompt_tokens))

    def refresh_replicas(self, status: Mapping[str, Any] | None) -> None:
        """Replica gauges from `ReplicaRuntime.status()` (None: a single replica)."""
        self.replica_peers.set(len(status["peers"]) if status else 0)
        self.replica_degraded.set(1 if status and status["degraded"] else 0)

    def refresh(
        self, workers: Iterable[Worker], index_stats: Mapping[str, Any], blind: Iterable[str]
    ) -> None:
        """Pull the gauges from the router's state; called at scrape time (no per-event cost)."""
        blind_set = set(blind)
        for w in workers:
            u = w.url
            self.in_flight.labels(u).set(w.load.in_flight)
            self.pending_prefill.labels(u).set(w.load.pending_prefill_tokens)
            self.active_blocks.labels(u).set(w.load.active_blocks)
            if w.load.engine_running is not None:
                self.engine_running.labels(u).set(w.load.engine_running)
            if w.load.engine_queued is not None:
                self.engine_queued.labels(u).set(w.load.engine_queued)
            for s in WorkerState:
                self.worker_state.labels(u, s.value).set(1 if w.state is s else 0)
            self.worker_blind.labels(u).set(1 if u in blind_set else 0)
            st = index_stats.get(u)
            if isinstance(st, Mapping):
                _set(self.index_blocks, u, st, "blocks")
                stream = st.get("stream")
                if isinstance(stream, Mapping):
                    _set(self.event_lag, u, stream, "lag_s")
                    self._advance(self.event_gaps, "gaps", u, stream.get("gaps"))
                    self._advance(self.events, "events", u, stream.get("events"))
        self.blind_workers.set(len(blind_set))

    def _advance(self, counter: Counter, name: str, url: str, count: Any) -> None:
        """Move `counter` to the subscriber's running `count`: by the difference, or by the whole count
        when the subscriber restarted (the worker re-registered, its count went back)."""
        if not isinstance(count, int | float) or isinstance(count, bool):
            return
        seen = self._stream_seen.get((name, url), 0.0)
        delta = count - seen if count >= seen else count
        if delta > 0:
            counter.labels(url).inc(delta)
        self._stream_seen[(name, url)] = float(count)

    def refresh_circuits(self, states: Mapping[str, str]) -> None:
        """Breaker states from the registry (scrape time)."""
        for url, state in states.items():
            for s in CIRCUIT_STATES:
                self.circuit_state.labels(url, s).set(1 if s == state else 0)

    def forget_worker(self, url: str) -> None:
        """Drop a removed worker's gauge series (counters keep their history). In multiprocess mode a
        series cannot be deleted from the shared files: it is set to 0 first, and stays at 0."""
        for key in [k for k in self._children if k[2] == url]:
            del self._children[key]
        for g in (
            self.in_flight,
            self.pending_prefill,
            self.active_blocks,
            self.engine_running,
            self.engine_queued,
            self.worker_blind,
            self.index_blocks,
            self.event_lag,
        ):
            self._drop(g, url)
        for seen in [k for k in self._stream_seen if k[1] == url]:
            del self._stream_seen[seen]
        for s in WorkerState:
            self._drop(self.worker_state, url, s.value)
        for c in CIRCUIT_STATES:
            self._drop(self.circuit_state, url, c)

    def _drop(self, gauge: Gauge, *labels: str) -> None:
        if self.multiprocess_dir is not None:  # prometheus_client cannot remove a series there
            gauge.labels(*labels).set(0)
            return
        try:
            gauge.remove(*labels)
        except KeyError:
            pass

    def exposition(self) -> bytes:
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        _runtime_collectors(merged)  # process_* and python_* of the process answering the scrape
        return generate_latest(merged)


@dataclass(frozen=True, slots=True)
class _Children:
    """Label children of one (route, policy, worker, status), looked up once."""

    requests: Any
    e2e: Any
    ttft: Any
    tpot: Any
    itl: Any
    prompt: Any
    cached: Any
    ratio: Any
    predicted: Any


def _runtime_collectors(registry: CollectorRegistry) -> None:
    """`process_*` (CPU, memory, descriptors, start time) and `python_*` (version, GC) series, as every
    Prometheus client exports by default (ours is a per-app registry, so they are added here)."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)


def observe_n(child: Any, amount: float, n: int) -> None:
    """`n` observations of `amount` on a histogram child in O(1): ITL has one observation per token, and
    a per-token `observe` loop would cost the router ~1 us per streamed token. Uses prometheus_client's
    child internals (`_sum`, `_buckets`, `_upper_bounds`, stable since 0.4); loops where they are absent."""
    buckets = getattr(child, "_buckets", None)
    bounds = getattr(child, "_upper_bounds", None)
    total = getattr(child, "_sum", None)
    if buckets is None or bounds is None or total is None:
        for _ in range(n):
            child.observe(amount)
        return
    total.inc(amount * n)
    buckets[bisect.bisect_left(bounds, amount)].inc(n)


def add_bucket_counts(child: Any, total: float, counts: list[int]) -> None:
    """Add observations gathered elsewhere to a histogram child: their sum and, per bucket (the child's
    upper bounds, +Inf last), how many fell in it. Same internals as `observe_n`; where they are absent,
    each observation is replayed at its bucket's upper bound (the finite one below +Inf for the last)."""
    buckets = getattr(child, "_buckets", None)
    sum_value = getattr(child, "_sum", None)
    if buckets is None or sum_value is None or len(buckets) != len(counts):
        bounds = [b for b in getattr(child, "_upper_bounds", None) or [] if b != float("inf")] or [0.0]
        for i, c in enumerate(counts):
            v = bounds[min(i, len(bounds) - 1)]
            for _ in range(c):
                child.observe(v)
        return
    sum_value.inc(total)
    for b, c in zip(buckets, counts, strict=True):
        if c:
            b.inc(c)


def _set(gauge: Gauge, url: str, stats: Mapping[str, Any], *keys: str) -> None:
    for k in keys:
        v = stats.get(k)
        if isinstance(v, int | float) and not isinstance(v, bool):
            gauge.labels(url).set(v)
            return

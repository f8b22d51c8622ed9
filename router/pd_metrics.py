"""PD metrics: per-pool queue depth, TTFT split (prefill queueing, prefill, transfer), decode ITL, and
the sliding window of observations the planner (`GET /admin/plan`) reads.

Registered on the app's registry (`kvroute.router.metrics.Metrics.registry`), prefix `kvroute_pd_`. Labels:
- `pool`: `prefill`, `decode` (disaggregated pairs) or `local` (conditional disaggregation).
- `mode`: `disaggregated` or `local`.
- `outcome`: `ok`, `client_error`, `upstream_error`, `client_gone`.
- `phase`: `prefill_queue`, `prefill`, `transfer`, `ttft` (seconds on the router's clock; see docs/pd.md).
- `side`: the side of a pair (`prefill`, `decode`) that failed or was sent `/abort_request`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kvroute.router.metrics import LATENCY_BUCKETS, TOKEN_GAP_BUCKETS
from kvroute.router.pd import PDRecord
from kvroute.router.planner import ObservedLoad, burstiness

# The router's buckets; PD's TTFT phases stop at 60 s.
_LAT = tuple(b for b in LATENCY_BUCKETS if b <= 60.0)
_ITL = TOKEN_GAP_BUCKETS
PROMPT_SAMPLES = 512  # newest requests (over the whole window, whatever the horizon asked) whose lengths
# the planner models the prefill queue with: the prompt mix changes slowly, and a 30 s horizon's hundred
# heavy-tailed samples moved the modelled tail (and the plan) by +-2 workers between decisions
BURST_MIN_ARRIVALS = 20  # fewer arrivals in the window: the stream is taken as Poisson
BURST_GAP = 0.05  # arrivals closer than this share of the mean gap arrived together (Poisson: ~5% do)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


@dataclass(frozen=True)
class WindowSummary:
    """What the window saw over its span (seconds); latencies are means unless named p99."""

    requests: int
    span_s: float
    local_fraction: float
    load: ObservedLoad
    itl_p99_s: float | None
    ttft_p99_s: float | None


class PDWindow:
    """The last `horizon_s` seconds of served requests, for the planner. Bounded by `max_records`."""

    def __init__(
        self,
        horizon_s: float = 300.0,
        max_records: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.horizon_s = horizon_s
        self.clock = clock
        self._records: deque[PDRecord] = deque(maxlen=max_records)
        self._arrivals: deque[float] = deque(maxlen=max_records)
        self._started = clock()

    def add(self, record: PDRecord) -> None:
        self._records.append(record)

    def arrive(self) -> None:
        """A request entered the decode (or local) pool: counted as demand before it finishes, so the rate
        the planner reads is what arrives, not what an overloaded fleet manages to finish."""
        self._arrivals.append(self.clock())

    def _live(self, horizon_s: float) -> list[PDRecord]:
        now = self.clock()
        keep = now - self.horizon_s
        while self._records and self._records[0].finished_at < keep:
            self._records.popleft()
        while self._arrivals and self._arrivals[0] < keep:
            self._arrivals.popleft()
        cutoff = now - horizon_s
        return [r for r in self._records if r.outcome == "ok" and r.finished_at >= cutoff]

    def summary(
        self,
        current_prefill: int | None = None,
        current_decode: int | None = None,
        horizon_s: float | None = None,
    ) -> WindowSummary:
        """The window's load over the last `horizon_s` seconds (default and at most: the whole window).
        The request rate counts arrivals when any were recorded (`arrive`), else finished requests."""
        horizon = min(self.horizon_s, horizon_s) if horizon_s else self.horizon_s
        recs = self._live(horizon)
        n = len(recs)
        span = min(horizon, max(1e-9, self.clock() - recs[0].finished_at)) if recs else horizon
        rate = n / span if n else 0.0
        bursts = 1.0
        if self._arrivals:
            now = self.clock()
            recent = [t for t in self._arrivals if t >= now - horizon]
            rate = len(recent) / max(1e-9, min(horizon, now - self._started))
            if len(recent) >= BURST_MIN_ARRIVALS and rate > 0:
                bursts = burstiness(recent, BURST_GAP / rate)
        prompt = sum(r.prompt_tokens for r in recs)
        cached = sum(min(r.cached_tokens, r.prompt_tokens) for r in recs)
        itls = [x for r in recs for x in r.itls]
        ttfts = [r.ttft_s for r in recs if r.ttft_s is not None]
        sampled = self._live(self.horizon_s)[-PROMPT_SAMPLES:]
        prefills = [r.prefill_s for r in sampled if r.prefill_s is not None]
        load = ObservedLoad(
            request_rate=rate,
            prompt_tokens=prompt / n if n else 0.0,
            output_tokens=sum(r.output_tokens for r in recs) / n if n else 0.0,
            cache_hit_ratio=cached / prompt if prompt else 0.0,
            measured_ttft_s=sum(ttfts) / len(ttfts) if ttfts else None,
            measured_itl_s=sum(itls) / len(itls) if itls else None,
            current_prefill=current_prefill,
            current_decode=current_decode,
            arrival_burstiness=bursts,
            prompt_samples=tuple((r.prompt_tokens, min(r.cached_tokens, r.prompt_tokens)) for r in sampled),
            # paired with the samples: only when every sampled request has its prefill measured
            measured_prefill_s=sum(prefills) / len(prefills)
            if prefills and len(prefills) == len(sampled)
            else None,
        )
        local = sum(1 for r in recs if r.mode == "local")
        return WindowSummary(
            n, span, local / n if n else 0.0, load, _percentile(itls, 0.99), _percentile(ttfts, 0.99)
        )


class PDMetrics:
    """Implements `kvroute.router.pd.PDObserver`: Prometheus series plus the planner's window."""

    def __init__(self, registry: CollectorRegistry, window: PDWindow | None = None) -> None:
        r = registry
        self.window = window if window is not None else PDWindow()
        self.listeners: list[Callable[[PDRecord], None]] = []  # e.g. the cost meter (router.autoscale)
        self.requests = Counter(
            "kvroute_pd_requests", "PD requests by mode and outcome.", ["mode", "outcome"], registry=r
        )
        self.queue_depth = Gauge(
            "kvroute_pd_queue_depth",
            "Requests in each pool now: prefill = sent, prefill not answered; "
            "decode/local = sent, response not finished.",
            ["pool"],
            registry=r,
            multiprocess_mode="livesum",  # each process counts its own requests
        )
        self.ttft_phase = Histogram(
            "kvroute_pd_ttft_phase_seconds",
            "TTFT split: prefill_queue (engine-reported), prefill, transfer "
            "(prefill answered -> decode's first token), ttft (whole).",
            ["mode", "phase"],
            buckets=_LAT,
            registry=r,
        )
        self.itl = Histogram(
            "kvroute_pd_itl_seconds",
            "Time between decode chunks sent to the client.",
            ["pool"],
            buckets=_ITL,
            registry=r,
        )
        self.retries = Counter(
            "kvroute_pd_retries", "Pairs re-chosen after a side failed.", ["side"], registry=r
        )
        self.aborts = Counter(
            "kvroute_pd_aborts_sent",
            "`/abort_request` calls sent to the surviving side.",
            ["side"],
            registry=r,
        )

    def arrive(self) -> None:
        """One request arrived, counted before the router's queue (admission) and once, not per
        attempt: the demand the planner reads is what arrives, not what the fleet takes in."""
        self.window.arrive()

    def pool_enter(self, pool: str) -> None:
        self.queue_depth.labels(pool).inc()

    def pool_leave(self, pool: str) -> None:
        self.queue_depth.labels(pool).dec()

    def retry(self, side: str) -> None:
        self.retries.labels(side).inc()

    def abort_sent(self, side: str) -> None:
        self.aborts.labels(side).inc()

    def observe(self, record: PDRecord) -> None:
        self.requests.labels(record.mode, record.outcome).inc()
        for listener in self.listeners:
            listener(record)
        if record.outcome != "ok":
            return
        for phase, value in (
            ("prefill_queue", record.prefill_queue_s),
            ("prefill", record.prefill_s),
            ("transfer", record.transfer_s),
            ("ttft", record.ttft_s),
        ):
            if value is not None:
                self.ttft_phase.labels(record.mode, phase).observe(value)
        pool = "decode" if record.mode == "disaggregated" else "local"
        hist = self.itl.labels(pool)
        for x in record.itls:
            hist.observe(x)
        self.window.add(record)

"""`Observability`: the proxy's hooks. Phases are stamped on the request as it moves and emitted once,
at the end, to the metrics, the access log, the recent-requests ring and the trace."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from kvroute.router.metrics import Metrics
from kvroute.router.observability.access_log import AccessLog
from kvroute.router.observability.phase_metrics import PhaseMetrics
from kvroute.router.observability.phases import RequestPhases, engine_timings, reason_class
from kvroute.router.observability.ring import RecentRequests
from kvroute.router.observability.tracing import Tracing
from kvroute.router.wire import Usage

# The request's phases, on the aiohttp request (the admission queue, the proxy and PD read the same one).
PHASES: web.RequestKey[RequestPhases] = web.RequestKey("kvroute_phases", RequestPhases)


class Observability:
    """One per app. `tracing` and `access_log` are None when off (the default)."""

    def __init__(
        self,
        metrics: Metrics,
        recent: int = 1000,
        access_log: AccessLog | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.metrics = metrics
        self.ring = RecentRequests(recent)
        self.access_log = access_log
        self.tracing = tracing
        self.phase_metrics = PhaseMetrics(metrics)
        self._decision_children: dict[tuple[str, str], Any] = {}

    # ---- hooks, in the order a request meets them
    def start(self, request: web.Request, route: str, rid: str, t0: float) -> RequestPhases:
        ph = RequestPhases.start(rid, route, t0)
        request[PHASES] = ph
        if self.tracing is not None:
            self.tracing.begin(ph, request.headers)
        return ph

    @staticmethod
    def routed(request: web.Request, decision: Any) -> None:
        """The policy chose: the routing phase is everything since arrival but the admission wait (reading
        the body, tokenizing and hashing the prompt, the policy)."""
        ph = request.get(PHASES)
        if ph is None:
            return
        ph.route_s = time.perf_counter() - ph.t0 - ph.admission_s
        ph.policy = decision.policy
        ph.reason = decision.reason
        ph.reason_class = reason_class(decision.reason, decision.cached_blocks)

    def before_send(
        self, request: web.Request, url: str, headers: CIMultiDict[str], cached_blocks: int
    ) -> CIMultiDict[str]:
        """An attempt on `url` starts; returns the headers to send (a traced copy when tracing)."""
        ph = request.get(PHASES)
        if ph is None:
            return headers
        ph.worker = url
        ph.attempts += 1
        ph.cached_blocks_predicted = cached_blocks
        ph.head_at = None
        ph.sent_at = time.perf_counter()
        if self.tracing is not None:
            self.tracing.before_send(ph, url, headers)
        return headers

    @staticmethod
    def head(request: web.Request, stream: bool) -> None:
        """The engine's response head arrived (`stream`: an SSE answer)."""
        ph = request.get(PHASES)
        if ph is not None:
            ph.head_at = time.perf_counter()
            ph.stream = stream

    @staticmethod
    def answered(request: web.Request, status: int, first_at: float | None, usage: Usage) -> None:
        """The attempt ended (answered, broken or abandoned): what the engine reported."""
        ph = request.get(PHASES)
        if ph is None:
            return
        ph.status = status
        ph.first_at = first_at
        ph.prompt_tokens, ph.cached_tokens = usage.prompt_tokens, usage.cached_tokens
        ph.output_tokens = usage.output_tokens
        ph.engine_queue_s, ph.engine_prefill_s = engine_timings(usage.engine_meta)

    def finish(self, ph: RequestPhases, status: int | None = None, error: str | None = None) -> None:
        """Emit once: metrics, ring, access log, trace."""
        ph.end_at = time.perf_counter()
        if ph.status == 0 and ph.error is None:  # an exception left the proxy (the middleware answers 500)
            ph.status, ph.error = 500, "internal_error"
        if status is not None:
            ph.status = status
        if error is not None:
            ph.error = error
        elif ph.status == 499:
            ph.error = "client_disconnect"
        if ph.reason_class:
            key = (ph.policy, ph.reason_class)
            c = self._decision_children.get(key)
            if c is None:
                c = self._decision_children[key] = self.metrics.route_decisions.labels(*key)
            c.inc()
        parts = ph.ttft_breakdown()
        if parts is not None and ph.status < 400:
            new = None if ph.prompt_tokens is None else ph.prompt_tokens - (ph.cached_tokens or 0)
            self.phase_metrics.observe(ph.worker, parts, new)
        self.ring.add(ph)
        if self.access_log is not None:
            self.access_log.write(ph)
        if self.tracing is not None:
            self.tracing.end(ph)

    def open(self, access_log: str | None, otlp_endpoint: str | None, sample_ratio: float) -> None:
        """Start the optional outputs (at app start-up: files and exporter threads live with the app)."""
        if access_log:
            self.access_log = AccessLog(access_log)
        if otlp_endpoint:
            self.tracing = Tracing(otlp_endpoint, sample_ratio)

    def flush_metrics(self) -> None:
        """Bring the phase histograms up to date (before a scrape)."""
        self.phase_metrics.flush()

    async def aclose(self) -> None:
        """Flush the phase metrics, the access log and the spans still waiting for export."""
        self.phase_metrics.flush()
        if self.access_log is not None:
            self.access_log.close()
            self.access_log = None
        if self.tracing is not None:
            tracing, self.tracing = self.tracing, None
            await tracing.aclose()

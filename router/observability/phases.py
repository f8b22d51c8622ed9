"""A request's latency phases: stamped by the proxy as the request moves, read once when it ends.

TTFT is split into disjoint parts that add up to it (`ttft_breakdown`), so "where did the first token's
time go" has one answer per request, and the same answer in the metrics, the access log, the
recent-requests ring, the status page, the trace and `kvroute diagnose`:

    ttft = admission + route + connect + engine_queue + engine_prefill + other

- admission: waiting in the router's admission queue (tenants); 0 where there is none.
- route: reading the body, tokenizing/hashing the prompt and the policy's choice.
- connect: from sending the request to the engine's response head (a new or pooled connection,
  the request bytes, the engine accepting it); streamed answers only: a non-streamed answer sends
  its head with the body, so there it is not separable and counts in `other`.
- engine_queue / engine_prefill: what the engine reports in `meta_info` (SGLang 0.5.10
  `observability/req_time_stats.py`): `queue_time` (+ `prefill_waiting_latency`, waiting for a
  prefill batch after leaving the queue) and `prefill_launch_latency` (the prefill forward). Engines
  that report nothing leave them at 0, and their time lands in `other`.
- other: the rest (network, the engine's tokenizer and detokenizer, chunked prefill steps the engine
  does not count, the router's relay).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Final

# The TTFT parts, in the order a request passes them (a bounded label set for the metrics).
TTFT_PHASES: Final = ("admission", "route", "connect", "engine_queue", "engine_prefill", "other")


@dataclass(slots=True, eq=False)
class RequestPhases:
    """One request's timeline. Times are `time.perf_counter()` stamps; durations are seconds.

    Invariant: written only by the task serving the request, read once by `Observability.finish`
    (then immutable: the ring keeps the object itself).
    """

    rid: str
    route: str  # client path
    t0: float  # perf_counter at arrival
    started_at: float  # wall clock (epoch seconds) at arrival, for logs and the ring
    policy: str = ""
    worker: str = "none"
    reason: str = ""  # the policy's own words for its choice
    reason_class: str = ""  # bounded class of `reason` (metrics label)
    status: int = 0
    error: str | None = None  # error kind (see router.metrics) when the request failed
    stream: bool = False
    attempts: int = 0  # workers tried
    admission_s: float = 0.0  # filled by the admission queue when there is one
    route_s: float | None = None
    sent_at: float | None = None  # perf_counter when the request went to the chosen worker
    head_at: float | None = None  # perf_counter when its response head arrived
    first_at: float | None = None  # perf_counter of the first token sent back
    end_at: float | None = None
    engine_queue_s: float | None = None
    engine_prefill_s: float | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    output_tokens: int | None = None
    cached_blocks_predicted: int = 0
    trace_id: str | None = None  # hex, when tracing sampled this request
    span: Any = None  # the request's trace ids while traced (router.observability.tracing), else None

    @classmethod
    def start(cls, rid: str, route: str, t0: float) -> RequestPhases:
        return cls(rid=rid, route=route, t0=t0, started_at=time.time())

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_at is None else self.first_at - self.t0

    @property
    def e2e_s(self) -> float | None:
        return None if self.end_at is None else self.end_at - self.t0

    @property
    def connect_s(self) -> float | None:
        if self.sent_at is None or self.head_at is None:
            return None
        return self.head_at - self.sent_at

    @property
    def first_byte_s(self) -> float | None:
        """Engine time to first byte: request sent -> first token received."""
        if self.sent_at is None or self.first_at is None:
            return None
        return self.first_at - self.sent_at

    @property
    def itl_s(self) -> float | None:
        """Mean gap between output tokens after the first."""
        n = self.output_tokens
        if self.first_at is None or self.end_at is None or not n or n < 2:
            return None
        return (self.end_at - self.first_at) / (n - 1)

    def ttft_breakdown(self) -> dict[str, float] | None:
        """TTFT as disjoint parts that add up to it (see the module docstring); None without a TTFT."""
        ttft = self.ttft_s
        if ttft is None:
            return None
        admission = min(max(self.admission_s, 0.0), ttft)
        route = min(max(self.route_s or 0.0, 0.0), ttft - admission)
        upstream = ttft - admission - route  # from routed to first token: sending, the engine, relay
        eq = min(max(self.engine_queue_s or 0.0, 0.0), upstream)
        ep = min(max(self.engine_prefill_s or 0.0, 0.0), upstream - eq)
        # A non-streamed answer's head comes with its body: its "connect" is the whole exchange, unknown.
        connect = min(max(self.connect_s or 0.0, 0.0), upstream - eq - ep) if self.stream else 0.0
        other = max(upstream - eq - ep - connect, 0.0)
        return {
            "admission": admission,
            "route": route,
            "connect": connect,
            "engine_queue": eq,
            "engine_prefill": ep,
            "other": other,
        }

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (access log line, ring entry): durations in seconds, None where unknown."""
        return {
            "ts": round(self.started_at, 6),
            "rid": self.rid,
            "route": self.route,
            "status": self.status,
            "error": self.error,
            "worker": self.worker,
            "policy": self.policy,
            "reason": self.reason,
            "stream": self.stream,
            "attempts": self.attempts,
            "ttft_s": _r(self.ttft_s),
            "e2e_s": _r(self.e2e_s),
            "itl_s": _r(self.itl_s),
            "phases": {k: round(v, 6) for k, v in (self.ttft_breakdown() or {}).items()} or None,
            "first_byte_s": _r(self.first_byte_s),
            "engine_queue_s": _r(self.engine_queue_s),
            "engine_prefill_s": _r(self.engine_prefill_s),
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "new_tokens": (
                None if self.prompt_tokens is None else self.prompt_tokens - (self.cached_tokens or 0)
            ),
            "output_tokens": self.output_tokens,
            "cached_blocks_predicted": self.cached_blocks_predicted,
            "trace_id": self.trace_id,
        }


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 6)


def engine_timings(meta: Any) -> tuple[float | None, float | None]:
    """(queue seconds, prefill seconds) from an SGLang `meta_info` (a batch: its first item's).

    `queue_time` is the waiting-queue time; `prefill_waiting_latency` (leaving the queue -> the prefill
    batch starts) is queueing too, from the request's point of view. Missing or null fields (an engine
    without metrics, older versions, the OpenAI routes, which carry no `meta_info`) give None.
    """
    if not isinstance(meta, dict):
        return None, None
    q = _num(meta.get("queue_time"))
    w = _num(meta.get("prefill_waiting_latency"))
    p = _num(meta.get("prefill_launch_latency"))
    queue = None if q is None and w is None else (q or 0.0) + (w or 0.0)
    return queue, p


def _num(v: Any) -> float | None:
    if isinstance(v, int | float) and not isinstance(v, bool) and v >= 0:
        return float(v)
    return None


def reason_class(reason: str, cached_blocks: int) -> str:
    """A policy's free-text reason reduced to a bounded class (a metrics label)."""
    if "imbalanced" in reason:
        return "imbalance"
    if "softmax" in reason:
        return "explore"
    if cached_blocks > 0:
        return "prefix_hit"
    return "load"

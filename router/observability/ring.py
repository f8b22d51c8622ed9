"""The recent-requests ring behind `GET /admin/requests/recent`: the last N finished requests, bounded.

Appending is O(1) and keeps the `RequestPhases` object itself (serialised only when asked for), so the
ring costs the request path one deque append.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from kvroute.router.observability.phases import TTFT_PHASES, RequestPhases


@dataclass(frozen=True)
class RecentQuery:
    """Filters of `GET /admin/requests/recent` (every one optional).

    worker: only requests served by this worker URL. min_ttft_s / min_e2e_s: only requests at least
    this slow. errors: only failed requests. limit: most recent first, at most this many.
    """

    worker: str | None = None
    min_ttft_s: float | None = None
    min_e2e_s: float | None = None
    errors: bool = False
    limit: int = 100

    def matches(self, ph: RequestPhases) -> bool:
        if self.worker is not None and ph.worker != self.worker:
            return False
        if self.errors and ph.error is None and ph.status < 400:
            return False
        if self.min_ttft_s is not None:
            t = ph.ttft_s
            if t is None or t < self.min_ttft_s:
                return False
        if self.min_e2e_s is not None:
            e = ph.e2e_s
            if e is None or e < self.min_e2e_s:
                return False
        return True


class RecentRequests:
    """The last `capacity` finished requests (0: none kept)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._ring: deque[RequestPhases] = deque(maxlen=max(capacity, 1))

    def add(self, ph: RequestPhases) -> None:
        if self.capacity:
            self._ring.append(ph)

    def __len__(self) -> int:
        return len(self._ring) if self.capacity else 0

    def query(self, q: RecentQuery) -> list[RequestPhases]:
        out: list[RequestPhases] = []
        for ph in reversed(self._ring):
            if len(out) >= q.limit:
                break
            if q.matches(ph):
                out.append(ph)
        return out

    def window(self, since: float) -> list[RequestPhases]:
        """Requests that arrived at or after `since` (epoch seconds), oldest first."""
        return [ph for ph in self._ring if ph.started_at >= since] if self.capacity else []


@dataclass
class WorkerWindow:
    """Latency summary of one worker's recent requests (status page, diagnose)."""

    requests: int
    errors: int
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    ttft_mean_s: float | None
    phases_mean_s: dict[str, float]  # mean seconds per TTFT phase over requests with a TTFT
    p99_phases_s: dict[str, float]  # the same over the slowest 1% (at least one request)
    prompt_tokens: int
    cached_tokens: int
    new_tokens_mean: float | None

    @property
    def hit_ratio(self) -> float | None:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else None

    def as_dict(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "ttft_p50_s": self.ttft_p50_s,
            "ttft_p99_s": self.ttft_p99_s,
            "ttft_mean_s": self.ttft_mean_s,
            "phases_mean_s": self.phases_mean_s,
            "p99_phases_s": self.p99_phases_s,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "hit_ratio": self.hit_ratio,
            "new_tokens_mean": self.new_tokens_mean,
        }


def quantile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank quantile of an ascending list."""
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[i]


def summarize(requests: Iterable[RequestPhases]) -> WorkerWindow:
    """Per-worker window summary: TTFT quantiles, the mean phase split, and the split of the tail."""
    reqs = list(requests)
    timed = sorted((r for r in reqs if r.ttft_s is not None), key=lambda r: r.ttft_s or 0.0)
    ttfts = [r.ttft_s or 0.0 for r in timed]
    tail = timed[-max(1, math.ceil(len(timed) * 0.01)) :] if timed else []
    prompt = sum(r.prompt_tokens or 0 for r in reqs if r.cached_tokens is not None)
    cached = sum(r.cached_tokens or 0 for r in reqs if r.prompt_tokens is not None)
    new = [r.prompt_tokens - (r.cached_tokens or 0) for r in reqs if r.prompt_tokens is not None]
    return WorkerWindow(
        requests=len(reqs),
        errors=sum(1 for r in reqs if r.error is not None or r.status >= 400),
        ttft_p50_s=quantile(ttfts, 0.5),
        ttft_p99_s=quantile(ttfts, 0.99),
        ttft_mean_s=sum(ttfts) / len(ttfts) if ttfts else None,
        phases_mean_s=_mean_phases(timed),
        p99_phases_s=_mean_phases(tail),
        prompt_tokens=prompt,
        cached_tokens=cached,
        new_tokens_mean=sum(new) / len(new) if new else None,
    )


def _mean_phases(reqs: list[RequestPhases]) -> dict[str, float]:
    if not reqs:
        return {}
    total = dict.fromkeys(TTFT_PHASES, 0.0)
    for r in reqs:
        for k, v in (r.ttft_breakdown() or {}).items():
            total[k] += v
    return {k: v / len(reqs) for k, v in total.items()}

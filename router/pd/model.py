"""PD value types: the config knobs, one attempt's route, one request's record, the error, and the
protocols the fan-out reports through (metrics, circuit breaker). No I/O here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from kvroute.router.types import Decision, Worker, WorkerRole


class PDError(Exception):
    """The PD path could not serve the request; `status` and `body` are what the client gets."""

    def __init__(self, status: int, message: str, body: bytes | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


@dataclass(frozen=True)
class PDConfig:
    """PD knobs. Tokens are prompt tokens; 0 disables the feature named."""

    local_prefill_max_tokens: int = 0
    """Conditional disaggregation: serve a request on the local pool alone when its uncached prompt
    (tokens the chosen local worker does not hold) is at most this many tokens. 0 = always disaggregate."""
    local_queue_scale_tokens: int = 8192
    """The threshold grows with the prefill pool's queue: x (1 + q / this), q = the least queued prefill
    tokens of any prefill worker, because a short prompt waiting behind that queue loses more than it costs
    a decode batch to prefill it there. 0 = threshold ignores the queue."""
    local_prefill_cap_tokens: int = 4096
    """Upper bound of the queue-grown threshold (bounds the ITL hit a local prefill gives a decode batch)."""
    local_role: WorkerRole = WorkerRole.REGULAR
    """Which pool serves local requests. SGLang's decode mode rejects a request without a bootstrap room
    (400, `scheduler.py`), so with real SGLang this is the regular pool (`--disaggregation-mode null`
    servers). DECODE only for engines whose decode workers accept plain requests (the simulator's
    `--accept-plain`)."""
    max_attempts: int = 3
    """Pairs tried while nothing has reached the client (1 = no retry)."""
    abort_timeout_s: float = 2.0
    """Seconds allowed for each `POST /abort_request` sent to the side still running; 0 = do not send."""
    prefill_timeout_s: float = 0.0
    """Seconds the prefill side may take to answer in full; 0 = no limit beyond the session's."""
    prefill_policy: str = "kv_aware"
    prefill_policy_params: tuple[tuple[str, Any], ...] = ()
    """Typed params of the prefill policy; kv_aware gets `decode_weight=0` unless given here."""
    decode_policy: str = "least_load"
    decode_policy_params: tuple[tuple[str, Any], ...] = ()

    @property
    def conditional(self) -> bool:
        return self.local_prefill_max_tokens > 0

    def local_threshold(self, prefill_queue_tokens: int | None) -> int:
        """The uncached-token threshold under the current prefill queue (None: no prefill worker up)."""
        base = self.local_prefill_max_tokens
        if base <= 0:
            return 0
        if prefill_queue_tokens is None:
            return max(base, self.local_prefill_cap_tokens)
        if self.local_queue_scale_tokens <= 0:
            return base
        grown = base * (1.0 + prefill_queue_tokens / self.local_queue_scale_tokens)
        return int(min(max(grown, base), max(self.local_prefill_cap_tokens, base)))


class PDHealth(Protocol):
    """The registry's circuit breaker (`kvroute.router.workers.WorkerRegistry` satisfies it)."""

    def breaker_allows(self, url: str) -> bool: ...

    def record_success(self, url: str) -> None: ...

    def record_failure(self, url: str, why: str) -> None: ...


class PDObserver(Protocol):
    """Receives per-request PD timings (`kvroute.router.pd_metrics.PDMetrics` implements it)."""

    def arrive(self) -> None:
        """A request arrived (once per request, before any queueing): the demand the planner reads."""
        ...

    def pool_enter(self, pool: str) -> None: ...

    def pool_leave(self, pool: str) -> None: ...

    def observe(self, record: PDRecord) -> None: ...

    def retry(self, side: str) -> None: ...

    def abort_sent(self, side: str) -> None: ...


@dataclass(frozen=True)
class PDRoute:
    """One attempt's choice. `prefill is None` means local (conditional disaggregation)."""

    decode: Worker
    prefill: Worker | None
    decode_decision: Decision
    prefill_decision: Decision | None
    uncached_tokens: int
    threshold: int
    reason: str

    @property
    def mode(self) -> str:
        return "disaggregated" if self.prefill is not None else "local"


@dataclass
class PDRecord:
    """What one served request measured, seconds on the router's clock (None = not observed)."""

    mode: str
    outcome: str  # ok | client_error | upstream_error | client_gone
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    prefill_queue_s: float | None = None
    prefill_s: float | None = None
    transfer_s: float | None = None
    ttft_s: float | None = None
    itls: list[float] = field(default_factory=list)
    attempts: int = 1
    finished_at: float = 0.0

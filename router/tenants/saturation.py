"""When is a worker saturated for a request: the prefill queued ahead of it, read from the load the
tickets keep (`WorkerLoad.pending_prefill_tokens`, the kv_aware cost's queue term), turned into
seconds at the engines' prefill rate.

With engine priority scheduling (SGLang `--enable-priority-scheduling`, the sim's the same), a
request waits only behind queued prefill of equal or higher priority: lower-priority prefill this
replica routed is not ahead of it. Prefill whose priority is unknown (another replica's) counts as
ahead: the estimate errs towards waiting, never towards a broken SLO.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvroute.router.tenants.classes import SlaClass, TenantConfigError
from kvroute.router.types import WorkerLoad


@dataclass(frozen=True)
class SaturationConfig:
    """How admission judges a worker full. Every field says its unit and its disabling value."""

    # Prefill throughput of one engine, tokens/s (turns queued prefill into a wait). H100 Llama-3-8B
    # profile (engines/sim): 42.8k tokens/s for 1.5k-token prompts, 39k at 8k, 33.6k at 12k: 35000.
    prefill_tokens_per_s: float = 35000.0
    # Prefill queued ahead of a request on one worker, in tokens, past which that worker takes nothing
    # more of its priority (the engine's queue bound; a request alone on a worker always passes).
    # 32768 = ~1 s of H100 prefill: enough that the engine never idles between two releases. 0 = none.
    max_queued_prefill_tokens: int = 32768
    # Engines schedule by the forwarded priority: lower-priority prefill is not ahead of a request.
    engine_priority: bool = True

    def __post_init__(self) -> None:
        r = self.prefill_tokens_per_s
        if not math.isfinite(r) or r <= 0:
            raise TenantConfigError(f"admission prefill_tokens_per_s must be > 0, got {r}")
        if self.max_queued_prefill_tokens < 0:
            raise TenantConfigError("admission max_queued_prefill_tokens must be >= 0")


def prefill_ahead(load: WorkerLoad, priority: int, engine_priority: bool) -> int:
    """Tokens of prefill queued on the worker that a request of `priority` waits behind."""
    total = load.pending_prefill_tokens
    if not engine_priority or not load.pending_prefill_by_priority:
        return total
    lower = sum(v for p, v in load.pending_prefill_by_priority.items() if p < priority)
    return max(0, total - lower)


def saturated(load: WorkerLoad, own_tokens: int, cls: SlaClass, cfg: SaturationConfig) -> bool:
    """True when sending the request here would break its TTFT objective (estimated wait plus its own
    prefill past `ttft_slo_s`) or push the queue ahead of it past the bound."""
    ahead = prefill_ahead(load, cls.priority, cfg.engine_priority)
    if ahead <= 0:
        return False  # nothing ahead: the request is the next prefill there whatever its size
    bound = cfg.max_queued_prefill_tokens
    if bound and ahead + own_tokens > bound:
        return True
    return cls.ttft_slo_s > 0 and (ahead + own_tokens) / cfg.prefill_tokens_per_s > cls.ttft_slo_s

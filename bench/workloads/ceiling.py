"""The limits no router can beat: the prefix-reuse ceiling and the per-request TTFT lower bound.

Ceiling: the fraction of prompt tokens an unlimited cache that had seen every earlier prompt (in arrival
order) would serve, counted as an SGLang engine counts `cached_tokens`: whole pages of `page_size`
tokens, and never the prompt's last token (the engine always computes at least one token to produce
logits, so at most `floor((len - 1) / page_size)` pages hit).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from kvroute.bench.workloads import Request
from kvroute.cache_index.hashing import hash_text_blocks

PrefillCost = Callable[[int, int], float]
"""Seconds of prefill for (new_tokens, cached_tokens), no queueing: the simulator's cost profile."""


@dataclass(frozen=True)
class Ceiling:
    """Per-request best-case cached tokens and their total share of the prompt tokens."""

    page_size: int
    cached_tokens: tuple[int, ...]  # per request, same order as the workload
    prompt_tokens: tuple[int, ...]

    @property
    def total_prompt(self) -> int:
        return sum(self.prompt_tokens)

    @property
    def total_cached(self) -> int:
        return sum(self.cached_tokens)

    @property
    def ratio(self) -> float:
        """Fraction of prompt tokens served from cache in the best case (0 for an empty workload)."""
        return self.total_cached / self.total_prompt if self.total_prompt else 0.0


def prefix_reuse_ceiling(requests: Sequence[Request], page_size: int) -> Ceiling:
    """Replay the prompts through an unlimited page-granular prefix cache, in order.

    Chained page hashes (equal hash = equal whole prefix) make the cache a set; cost is linear in the
    total prompt length.
    """
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")
    seen: set[int] = set()
    cached = []
    for r in requests:
        hashes = hash_text_blocks(r.text, page_size)
        limit = max(0, (r.prompt_tokens - 1) // page_size)  # never the last token
        k = 0
        for h in hashes[:limit]:
            if h not in seen:
                break
            k += 1
        cached.append(k * page_size)
        seen.update(hashes)
    return Ceiling(page_size, tuple(cached), tuple(r.prompt_tokens for r in requests))


def ttft_lower_bounds(ceiling: Ceiling, prefill_cost: PrefillCost) -> list[float]:
    """Each request's TTFT if it ran alone on a worker holding every earlier prompt: prefill only."""
    return [prefill_cost(p - c, c) for p, c in zip(ceiling.prompt_tokens, ceiling.cached_tokens, strict=True)]


class StepCostProfile(Protocol):
    """What the TTFT bound needs of a simulator profile (`kvroute.engines.sim.profiles.GpuProfile`)."""

    @property
    def chunked_prefill_size(self) -> int: ...

    def step_ms(
        self, chunks: Sequence[tuple[int, int]], decode_batch: int, decode_ctx_total: int
    ) -> float: ...


def profile_prefill_cost(profile: StepCostProfile) -> PrefillCost:
    """Prefill alone on an idle engine, as the simulator runs it: chunks of `chunked_prefill_size`
    new tokens, each one step over the tokens before it (cached or computed by earlier chunks)."""
    chunk = profile.chunked_prefill_size

    def cost(new_tokens: int, cached_tokens: int) -> float:
        ms, prior, left = 0.0, cached_tokens, max(1, new_tokens)
        while left > 0:
            n = min(left, chunk)
            ms += profile.step_ms([(n, prior)], 0, 0)
            prior += n
            left -= n
        return ms / 1000.0

    return cost


def owner_affinity(
    requests: Sequence[Request], workers: Sequence[str | None], page_size: int, min_share: float = 0.25
) -> float:
    """Of the requests whose ceiling is >= `min_share` of their prompt, the fraction a router sent to the
    worker that last computed their deepest reusable page (`workers[i]` served `requests[i]`).

    Explains a hit ratio below the ceiling: a router that moves a continuation away from its prefix's
    owner recomputes it. NaN when no request qualifies or a worker is unknown.
    """
    if len(workers) != len(requests) or any(w is None for w in workers):
        return float("nan")
    owner: dict[int, str | None] = {}
    eligible = same = 0
    for r, w in zip(requests, workers, strict=True):
        hashes = hash_text_blocks(r.text, page_size)
        limit = max(0, (r.prompt_tokens - 1) // page_size)
        k, last = 0, None
        for h in hashes[:limit]:
            if h not in owner:
                break
            k, last = k + 1, owner[h]
        if k * page_size >= min_share * r.prompt_tokens and k:
            eligible += 1
            same += last == w
        for h in hashes:
            owner[h] = w
    return same / eligible if eligible else float("nan")

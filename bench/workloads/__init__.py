"""Benchmark workloads: timed requests with deterministic prompts, and the registry that builds them.

Every prompt is ASCII text, so under the byte tokenizer (the simulated engine's and kvroute's default)
one character is one token: the same prompt can be sent as `text`, as OpenAI `prompt`, or as
`input_ids`, and every router (including SGLang's character-level one) sees the same prefixes.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

ALPHABET = string.ascii_letters + string.digits
"""Characters of generated text: one byte each, no JSON escaping, valid token ids for any byte vocab."""


class WorkloadError(ValueError):
    """A workload was asked for with impossible parameters, or its trace could not be read."""


@dataclass(frozen=True, slots=True)
class Request:
    """One request of a workload.

    Invariants: `text` is ASCII (one byte = one token); `arrival_s` >= 0, non-decreasing in a
    workload; `messages`, when set, render (`render_plain_chat`) to exactly `text`.
    """

    rid: str
    arrival_s: float  # seconds from the start of the run, in engine time (before any time scale)
    text: str
    output_tokens: int  # max_new_tokens, with ignore_eos so that the engine generates exactly this many
    session: str | None = None  # session / group key (consistent-hash affinity, per-session stats)
    messages: tuple[dict[str, str], ...] | None = None  # for the chat API (multi-turn workload)

    @property
    def prompt_tokens(self) -> int:
        return len(self.text)

    def token_ids(self) -> list[int]:
        return list(self.text.encode("ascii"))


@dataclass(frozen=True)
class Workload:
    """A named, ordered list of requests plus the parameters that built it (for the report)."""

    name: str
    requests: tuple[Request, ...]
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        last = 0.0
        for r in self.requests:
            if r.arrival_s < last:
                raise WorkloadError(f"{self.name}: arrivals must be non-decreasing (request {r.rid})")
            last = r.arrival_s

    @property
    def duration_s(self) -> float:
        return self.requests[-1].arrival_s if self.requests else 0.0

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.requests)

    def with_rate(self, factor: float) -> Workload:
        """The same requests arriving `factor` times faster (factor 2 halves every gap)."""
        if factor <= 0:
            raise WorkloadError(f"rate factor must be positive, got {factor}")
        reqs = tuple(replace(r, arrival_s=r.arrival_s / factor) for r in self.requests)
        return Workload(self.name, reqs, {**self.params, "rate_factor": factor})

    def head(self, n: int) -> Workload:
        return Workload(self.name, self.requests[:n], {**self.params, "head": n})


def block_text(key: int, n: int, salt: int = 0) -> str:
    """`n` characters fully determined by (`key`, `salt`): the same key always gives the same text."""
    rng = random.Random((salt << 64) ^ key)
    return "".join(rng.choices(ALPHABET, k=n))


def poisson_arrivals(n: int, rate_per_s: float, rng: random.Random) -> list[float]:
    """`n` arrival times (s) of a Poisson process of `rate_per_s`, starting with the first gap at 0."""
    if rate_per_s <= 0:
        raise WorkloadError(f"rate must be positive, got {rate_per_s}")
    t = 0.0
    out = []
    for i in range(n):
        if i:
            t += rng.expovariate(rate_per_s)
        out.append(t)
    return out


def build(name: str, **kwargs: Any) -> Workload:
    """Build a workload by name (one of `WORKLOADS`; kwargs per builder)."""
    from kvroute.bench.workloads import mooncake, multiturn, routing_defects, shared_prefix

    builders: dict[str, Callable[..., Workload]] = {
        "mooncake": mooncake.load,
        "shared_prefix": shared_prefix.generate,
        "multiturn": multiturn.generate,
        "hot_prompt": routing_defects.hot_prompt,
        "low_reuse": routing_defects.low_reuse,
        "idle_then_busy": routing_defects.idle_then_busy,
    }
    try:
        fn = builders[name]
    except KeyError:
        raise WorkloadError(f"unknown workload {name!r}; known: {sorted(builders)}") from None
    return fn(**kwargs)


WORKLOADS: Sequence[str] = (
    "mooncake",
    "shared_prefix",
    "multiturn",
    "hot_prompt",
    "low_reuse",
    "idle_then_busy",
)

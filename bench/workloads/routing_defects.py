"""Workloads that show a router's placement defects (issue #11): a hot shared prompt, long prompts with
little reuse, and an idle-then-busy fleet. Deterministic from `seed`; Poisson arrivals unless said.

- `hot_prompt`: most requests share one system prompt (agents, one product's assistant); its holders
  must multiply as traffic grows, or the queue on them grows with it.
- `low_reuse`: long prompts (RAG over fresh documents) sharing little: the prefill load itself must be
  balanced, since the cache barely helps.
- `idle_then_busy`: sessions open one after another on a quiet fleet (each answered before the next),
  then all of them continue at once: where the quiet period placed them is where the burst lands.
"""

from __future__ import annotations

import random

from kvroute.bench.workloads import Request, Workload, WorkloadError, block_text, poisson_arrivals


def hot_prompt(
    requests: int = 600,
    hot_share: float = 0.9,
    system_tokens: int = 2048,
    user_tokens: int = 256,
    output_tokens: int = 32,
    rate_per_s: float = 24.0,
    seed: int = 0,
) -> Workload:
    """`hot_share` of the requests are the one system prompt + a unique user part; the rest are unique
    prompts of the same length."""
    if requests < 1 or not 0 <= hot_share <= 1 or min(system_tokens, user_tokens, output_tokens) < 1:
        raise WorkloadError("hot_prompt: requests, sizes >= 1 and hot_share in [0, 1]")
    rng = random.Random(seed)
    system = block_text(0, system_tokens, salt=11 + seed)
    arrivals = poisson_arrivals(requests, rate_per_s, rng)
    reqs = []
    for i, t in enumerate(arrivals):
        hot = rng.random() < hot_share
        user = block_text(i, user_tokens, salt=(11 << 20) + seed)
        text = system + user if hot else block_text(i, system_tokens, salt=(12 << 20) + seed) + user
        reqs.append(Request(f"hot{i}", t, text, output_tokens, session="hot" if hot else f"cold{i}"))
    params = {
        "requests": requests,
        "hot_share": hot_share,
        "system_tokens": system_tokens,
        "user_tokens": user_tokens,
        "output_tokens": output_tokens,
        "rate_per_s": rate_per_s,
        "seed": seed,
    }
    return Workload("hot_prompt", tuple(reqs), params)


def low_reuse(
    requests: int = 300,
    min_tokens: int = 4096,
    max_tokens: int = 16384,
    shared_share: float = 0.1,
    documents: int = 8,
    document_tokens: int = 2048,
    output_tokens: int = 32,
    rate_per_s: float = 6.0,
    seed: int = 0,
) -> Workload:
    """Long unique prompts of uniform length in [min_tokens, max_tokens]; `shared_share` of them open with
    one of `documents` shared documents."""
    if requests < 1 or not 1 <= min_tokens <= max_tokens or min(documents, document_tokens) < 1:
        raise WorkloadError("low_reuse: requests >= 1, 1 <= min_tokens <= max_tokens, documents >= 1")
    rng = random.Random(seed)
    docs = [block_text(d, document_tokens, salt=21 + seed) for d in range(documents)]
    arrivals = poisson_arrivals(requests, rate_per_s, rng)
    reqs = []
    for i, t in enumerate(arrivals):
        n = rng.randint(min_tokens, max_tokens)
        head = docs[rng.randrange(documents)] if rng.random() < shared_share else ""
        text = head + block_text(i, max(1, n - len(head)), salt=(21 << 20) + seed)
        reqs.append(Request(f"lr{i}", t, text, output_tokens, session=f"lr{i}"))
    params = {
        "requests": requests,
        "min_tokens": min_tokens,
        "max_tokens": max_tokens,
        "shared_share": shared_share,
        "documents": documents,
        "document_tokens": document_tokens,
        "output_tokens": output_tokens,
        "rate_per_s": rate_per_s,
        "seed": seed,
    }
    return Workload("low_reuse", tuple(reqs), params)


def idle_then_busy(
    sessions: int = 16,
    context_tokens: int = 4096,
    quiet_gap_s: float = 1.0,
    turns: int = 12,
    user_tokens: int = 128,
    output_tokens: int = 32,
    busy_rate_per_s: float = 24.0,
    seed: int = 0,
) -> Workload:
    """Quiet: session s opens at s * quiet_gap_s (its context + a first question; the gap outlasts one
    request on an idle engine). Busy: `sessions * turns` follow-ups (the session's context + a new
    question), sessions in random order, arriving at `busy_rate_per_s`."""
    if min(sessions, context_tokens, turns, user_tokens, output_tokens) < 1 or quiet_gap_s <= 0:
        raise WorkloadError("idle_then_busy: sizes >= 1 and quiet_gap_s > 0")
    rng = random.Random(seed)
    contexts = [block_text(s, context_tokens, salt=31 + seed) for s in range(sessions)]
    reqs = []
    for s in range(sessions):
        q = block_text(s, user_tokens, salt=(31 << 20) + seed)
        reqs.append(Request(f"ib{s}.0", s * quiet_gap_s, contexts[s] + q, output_tokens, session=f"s{s}"))
    busy_start = sessions * quiet_gap_s
    order = [s for s in range(sessions) for _ in range(turns)]
    rng.shuffle(order)
    arrivals = poisson_arrivals(len(order), busy_rate_per_s, rng)
    for k, (s, t) in enumerate(zip(order, arrivals, strict=True)):
        q = block_text(sessions + k, user_tokens, salt=(31 << 20) + seed)
        text = contexts[s] + q
        reqs.append(Request(f"ib{s}.{k + 1}", busy_start + t, text, output_tokens, session=f"s{s}"))
    params = {
        "sessions": sessions,
        "context_tokens": context_tokens,
        "quiet_gap_s": quiet_gap_s,
        "turns": turns,
        "user_tokens": user_tokens,
        "output_tokens": output_tokens,
        "busy_rate_per_s": busy_rate_per_s,
        "seed": seed,
    }
    return Workload("idle_then_busy", tuple(reqs), params)

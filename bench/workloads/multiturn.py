"""Multi-turn chat sessions: every turn's prompt is the previous turn's prompt, its answer and a new question.

Sessions start as a Poisson process; turns of one session are separated by exponential think times
(open loop: fixed in advance, not waiting for the answer). The assistant turns in the history are
deterministic stand-ins of `output_tokens` characters (what a client would send back is the model's
answer; the stand-in keeps prompts reproducible). Prompts are rendered with `render_plain_chat`, the
byte tokenizer's template, so `text` equals what the simulated engine tokenizes for the chat API.
"""

from __future__ import annotations

import random

from kvroute.bench.workloads import Request, Workload, WorkloadError, block_text, poisson_arrivals
from kvroute.cache_index.hashing import render_plain_chat


def generate(
    sessions: int = 32,
    turns: int = 6,
    system_tokens: int = 1024,
    user_tokens: int = 256,
    output_tokens: int = 128,
    session_rate_per_s: float = 1.0,
    think_s: float = 5.0,
    seed: int = 0,
) -> Workload:
    """`sessions` x `turns` requests; the system prompt is shared by all sessions."""
    if min(sessions, turns, user_tokens, output_tokens) < 1 or system_tokens < 0 or think_s < 0:
        raise WorkloadError("multiturn sizes must be >= 1 (system_tokens, think_s >= 0)")
    rng = random.Random(seed)
    system = block_text(0, system_tokens, salt=2 + seed)
    starts = poisson_arrivals(sessions, session_rate_per_s, rng)
    pending: list[tuple[float, int, int, tuple[dict[str, str], ...]]] = []
    for s, t0 in enumerate(starts):
        history: list[dict[str, str]] = [{"role": "system", "content": system}] if system_tokens else []
        t = t0
        for k in range(turns):
            key = s * turns + k
            history.append({"role": "user", "content": block_text(key, user_tokens, salt=(2 << 20) + seed)})
            pending.append((t, s, k, tuple(history)))
            history.append(
                {"role": "assistant", "content": block_text(key, output_tokens, salt=(3 << 20) + seed)}
            )
            t += rng.expovariate(1.0 / think_s) if think_s > 0 else 0.0
    pending.sort(key=lambda p: (p[0], p[1], p[2]))
    reqs = tuple(
        Request(
            rid=f"mt{s}.{k}",
            arrival_s=t,
            text=render_plain_chat(msgs),
            output_tokens=output_tokens,
            session=f"s{s}",
            messages=msgs,
        )
        for t, s, k, msgs in pending
    )
    params = {
        "sessions": sessions,
        "turns": turns,
        "system_tokens": system_tokens,
        "user_tokens": user_tokens,
        "output_tokens": output_tokens,
        "session_rate_per_s": session_rate_per_s,
        "think_s": think_s,
        "seed": seed,
    }
    return Workload("multiturn", reqs, params)

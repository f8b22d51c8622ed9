"""Generated shared-prefix groups: N groups x M users, a long per-group context plus a per-user question.

The shape of RAG / few-shot / agent traffic: many requests share a long document prefix and differ only
at the end. Arrivals are Poisson; everything is determined by `seed`.
"""

from __future__ import annotations

import random

from kvroute.bench.workloads import Request, Workload, WorkloadError, block_text, poisson_arrivals


def generate(
    groups: int = 8,
    users_per_group: int = 16,
    questions_per_user: int = 2,
    context_tokens: int = 4096,
    question_tokens: int = 128,
    output_tokens: int = 64,
    rate_per_s: float = 8.0,
    seed: int = 0,
) -> Workload:
    """Requests in random order over every (group, user, question), with Poisson arrivals.

    Prompt = context(group) + question(group, user, k): the context is shared by the group, the question
    is unique, so the ceiling is about 1 - 1/(users*questions) of the context's share of the prompt.
    """
    if min(groups, users_per_group, questions_per_user, context_tokens, question_tokens, output_tokens) < 1:
        raise WorkloadError("every shared_prefix size must be >= 1")
    rng = random.Random(seed)
    contexts = [block_text(g, context_tokens, salt=1 + seed) for g in range(groups)]
    items = [
        (g, u, k) for g in range(groups) for u in range(users_per_group) for k in range(questions_per_user)
    ]
    rng.shuffle(items)
    arrivals = poisson_arrivals(len(items), rate_per_s, rng)
    reqs = []
    for i, ((g, u, k), t) in enumerate(zip(items, arrivals, strict=True)):
        qkey = (g * users_per_group + u) * questions_per_user + k
        question = block_text(qkey, question_tokens, salt=(1 << 20) + seed)
        reqs.append(
            Request(
                rid=f"sp{i}",
                arrival_s=t,
                text=contexts[g] + question,
                output_tokens=output_tokens,
                session=f"g{g}u{u}",
            )
        )
    params = {
        "groups": groups,
        "users_per_group": users_per_group,
        "questions_per_user": questions_per_user,
        "context_tokens": context_tokens,
        "question_tokens": question_tokens,
        "output_tokens": output_tokens,
        "rate_per_s": rate_per_s,
        "seed": seed,
    }
    return Workload("shared_prefix", tuple(reqs), params)

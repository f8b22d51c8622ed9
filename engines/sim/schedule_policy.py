"""Waiting-queue ordering as SGLang 0.5.10's `SchedulePolicy.calc_priority` does it (fcfs | lpm).

Mirrors `sglang/srt/managers/schedule_policy.py`: `fcfs` leaves the queue in arrival order; `lpm` matches
every waiting prompt against the prefix cache, runs the in-batch prefix-caching check (a request with a
short cache match whose first tokens another waiting request already carries is deprioritised, so one
of them computes the shared prefix and the others find it cached when they are admitted later), then
sorts by longest match with the deprioritised last (a stable sort). Above 128 waiting requests SGLang
turns lpm off for that round (`_determine_active_policy`). The ordering only decides who is admitted
first: the prefix a request reuses is matched again when it is admitted (`Req.init_next_round_input`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

SchedulePolicyName = Literal["fcfs", "lpm"]
SCHEDULE_POLICIES: tuple[SchedulePolicyName, ...] = ("fcfs", "lpm")

LPM_MAX_WAITING = 128
"""SGLang `_determine_active_policy`: with more waiting requests lpm falls back to fcfs for that round."""

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class SchedulePolicy:
    """How the waiting queue is ordered before admission. Defaults are SGLang 0.5.10's."""

    name: SchedulePolicyName = "fcfs"
    """`--schedule-policy`; SGLang's default is fcfs."""
    in_batch_check_threshold: int = 32
    """Tokens (env IN_BATCH_PREFIX_CACHING_CHECK_THRESHOLD): a request whose cache match is at most this
    long runs the in-batch check; -1 disables in-batch prefix caching."""
    in_batch_deprioritize_threshold: int = 32
    """Tokens (env IN_BATCH_PREFIX_CACHING_DEPRIORITIZE_THRESHOLD): a match at least this long against
    the other waiting requests deprioritises the request. Must be positive."""

    def __post_init__(self) -> None:
        if self.name not in SCHEDULE_POLICIES:
            allowed = ", ".join(SCHEDULE_POLICIES)
            raise ValueError(f"schedule_policy must be one of {allowed}, not {self.name!r}")
        if self.in_batch_deprioritize_threshold < 1:
            raise ValueError("in_batch_deprioritize_threshold must be at least 1 token")

    def order(
        self, waiting: Sequence[T], prompt: Callable[[T], Sequence[int]], matched: Callable[[T], int]
    ) -> list[T] | None:
        """The queue in admission order, or None to keep it as it is (fcfs, or lpm over a long queue).

        `prompt` gives a request's token ids; `matched` how many of them the prefix cache holds
        (calc_priority matches the whole prompt, `origin_input_ids + output_ids`)."""
        if self.name == "fcfs" or len(waiting) > LPM_MAX_WAITING or len(waiting) < 2:
            return None
        # SGLang's in-batch tree is a page-size-1 radix tree over the waiting prompts: a match of at
        # least T tokens against it means "another waiting prompt has the same first T tokens", which a
        # set of T-token heads answers exactly, without building a tree.
        items = list(waiting)
        t = self.in_batch_deprioritize_threshold
        heads: set[tuple[int, ...]] = set()
        keys: list[tuple[float, int]] = []
        for i, r in enumerate(items):
            ids = prompt(r)
            n = matched(r)
            key: float = -n
            if n <= self.in_batch_check_threshold:
                head = tuple(ids[:t])
                if len(head) == t and head in heads:
                    key = float("inf")  # temporary_deprioritized
                else:
                    heads.add(head)
            keys.append((key, i))
        keys.sort()  # (key, queue position): the same order as SGLang's stable list.sort on the key
        return [items[i] for _, i in keys]

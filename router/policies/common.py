"""Helpers every policy shares: params dict -> frozen config, the load readings, and cost ranking.

Load readings combine the router's own counters (exact for its own traffic, updated per request) with
the engine's last `/get_load` poll (sees other routers' traffic, but stale) by taking the larger one.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from kvroute.router.types import Decision, Worker, WorkerScore

C = TypeVar("C")


def config_from_params(cls: type[C], params: Mapping[str, Any] | None, policy: str) -> C:
    """Build the frozen config `cls` from a params dict; ValueError on unknown or ill-typed params.

    Strict types (no string parsing): an int is accepted where a float is expected, a bool never
    stands for a number. Range checks live in each config's `__post_init__` (also ValueError).
    """
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise ValueError(f"policy {policy!r}: params must be an object, got {type(params).__name__}")
    assert dataclasses.is_dataclass(cls)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(
            f"policy {policy!r}: unknown parameter(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(known)) or 'none'}"
        )
    for key, value in params.items():
        if not _type_ok(value, hints[key]):
            raise ValueError(
                f"policy {policy!r}: parameter {key!r} must be {_type_name(hints[key])}, "
                f"got {type(value).__name__} {value!r}"
            )
    kwargs = {k: float(v) if hints[k] is float and isinstance(v, int) else v for k, v in params.items()}
    return cls(**kwargs)


def _type_ok(value: Any, tp: Any) -> bool:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if typing.get_origin(tp) is typing.Literal:
        return value in typing.get_args(tp)
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def require(cond: bool, policy: str, message: str) -> None:
    """Range check for a config's `__post_init__`."""
    if not cond:
        raise ValueError(f"policy {policy!r}: {message}")


# --- load readings -------------------------------------------------------------------------------


def in_flight(w: Worker) -> int:
    """Requests in flight: the router's count, floored by the engine's running + queued."""
    load = w.load
    engine = (load.engine_running or 0) + (load.engine_queued or 0)
    return max(load.in_flight, engine)


def capacity_blocks(w: Worker, block_size: int) -> float | None:
    if not w.max_total_tokens:
        return None
    return w.max_total_tokens / block_size


def active_blocks(w: Worker, block_size: int) -> float:
    """KV blocks held by running requests: the router's count, floored by the engine's token usage."""
    own = float(w.load.active_blocks)
    cap = capacity_blocks(w, block_size)
    if cap is not None and w.load.engine_token_usage is not None:
        return max(own, w.load.engine_token_usage * cap)
    return own


def pending_prefill_blocks(w: Worker, block_size: int) -> float:
    """Uncached prompt tokens routed there that have not produced a first token, in blocks."""
    return w.load.pending_prefill_tokens / block_size


def block_load(w: Worker, block_size: int) -> float:
    """Work a worker has, in blocks: pending prefill plus active KV."""
    return pending_prefill_blocks(w, block_size) + active_blocks(w, block_size)


# --- ranking -------------------------------------------------------------------------------------

DECISION_SCORES = 8
"""Scores a Decision carries (the first ranked workers): enough for logs and headers, cheap per
request on a fleet of hundreds; `explain` gives every worker's."""


def decision_from_scores(
    policy: str, scores: Sequence[WorkerScore], reason: str, chosen: str | None = None, **extra: Any
) -> Decision:
    """`scores` must already be best first; `chosen` (default: the first) is moved to the front."""
    ranked = [s.url for s in scores]
    if chosen is not None and chosen != ranked[0]:
        ranked.remove(chosen)
        ranked.insert(0, chosen)
    by_url = {s.url: s for s in scores}
    return Decision(
        worker=ranked[0],
        ranked=tuple(ranked),
        policy=policy,
        cached_blocks=by_url[ranked[0]].cached_blocks,
        reason=reason,
        scores=tuple(by_url[u] for u in ranked[:DECISION_SCORES]),
        extra=dict(extra),
    )


def sort_scores(scores: list[WorkerScore], order: Mapping[str, int]) -> list[WorkerScore]:
    """Best first: lower cost, then more cached blocks, then candidate order (deterministic)."""
    return sorted(scores, key=lambda s: (s.cost, -s.cached_blocks, order[s.url]))

"""Small builders shared by the policy tables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from kvroute.cache_index.hashing import BlockHash, hash_blocks
from kvroute.router.types import RoutingRequest, Worker, WorkerLoad, WorkerState

BS = 16


def worker(
    url: str,
    in_flight: int = 0,
    pending_tokens: int = 0,
    active: int = 0,
    capacity_tokens: int | None = None,
    **engine: float,
) -> Worker:
    load = WorkerLoad(in_flight=in_flight, pending_prefill_tokens=pending_tokens, active_blocks=active)
    for k, v in engine.items():
        setattr(load, k, v)
    return Worker(url=url, state=WorkerState.HEALTHY, load=load, max_total_tokens=capacity_tokens)


def request(
    n_blocks: int = 0, prefix: int = 1, session: str | None = None, extra_tokens: int = 0
) -> RoutingRequest:
    """A prompt of `n_blocks` full blocks, its content set by `prefix` (same prefix, same hashes)."""
    ids = [prefix * 1000 + i for i in range(n_blocks * BS + extra_tokens)]
    return RoutingRequest(
        block_hashes=tuple(hash_blocks(ids, BS)),
        prompt_tokens=max(1, len(ids)),
        block_size=BS,
        session_key=session,
    )


class FakeOverlap:
    """An OverlapSource answering fixed leading-block counts per worker."""

    def __init__(self, held: Mapping[str, int] | None = None) -> None:
        self.held = dict(held or {})
        self.calls = 0

    def match(self, block_hashes: Sequence[BlockHash]) -> dict[str, int]:
        self.calls += 1
        return {u: min(n, len(block_hashes)) for u, n in self.held.items() if n > 0}

"""ApproxIndex: the router's own guess of each worker's cache, for fleets that publish no KV events.

What the router sent to a worker (the prompt's blocks, plus the generated tail when known) is
assumed cached there until it is older than the TTL or pushed out by the worker's capacity (LRU):
the same idea as SGLang's cache_aware router, at block granularity and with an explicit bound.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from kvroute.cache_index.hashing import BlockHash
from kvroute.cache_index.radix import OverlapScores, RadixIndex

__all__ = ["ApproxIndex"]


class ApproxIndex:
    """Blocks recently routed to each worker, with a TTL and a per-worker capacity.

    ``ttl``: seconds a recorded block is assumed cached after its last use (None = no expiry).
    ``capacity``: blocks per worker kept, least recently used dropped first (None = unbounded).
    ``clock``: seconds, monotonic; ``now`` arguments override it (tests pass time explicitly).
    Invariant: every block held is younger than ``ttl`` as of the last ``record``/``match``/
    ``expire`` that concerned its worker; ``match`` expires lazily, only the workers it reports.
    """

    def __init__(
        self,
        ttl: float | None = 600.0,
        capacity: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl is not None and ttl <= 0:
            raise ValueError(f"ttl must be positive seconds or None, got {ttl}")
        self._ttl = ttl
        self._clock = clock
        self._index = RadixIndex(capacity, track_recency=True)
        self._last: dict[str, float] = {}  # per worker: latest stamp, so stamps never go back

    @property
    def index(self) -> RadixIndex:
        """The underlying RadixIndex (read it; write through this class)."""
        return self._index

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else now

    def record(self, worker: str, block_hashes: Sequence[BlockHash], now: float | None = None) -> int:
        """Note that ``worker`` was sent this chain of blocks (from the root); returns blocks new to it."""
        t = max(self._now(now), self._last.get(worker, float("-inf")))
        self._last[worker] = t
        self._expire_worker(worker, t)
        return self._index.insert(worker, None, block_hashes, stamp=t)

    def match(self, block_hashes: Sequence[BlockHash], now: float | None = None) -> OverlapScores:
        """Per worker, leading blocks of the prompt assumed cached there (read-only but for expiry)."""
        scores = self._index.match(block_hashes)
        if self._ttl is None or not scores:
            return scores
        t = self._now(now)
        expired = 0
        for worker in scores:
            expired += self._expire_worker(worker, t)
        # Expiry only shrinks, so the workers of a second match were all expired in the first.
        return self._index.match(block_hashes) if expired else scores

    def _expire_worker(self, worker: str, now: float) -> int:
        if self._ttl is None:
            return 0
        return self._index.evict_before(worker, now - self._ttl)

    def expire(self, now: float | None = None) -> int:
        """Drop every expired block of every worker (a periodic sweep bounds memory); returns how many."""
        t = self._now(now)
        return sum(self._expire_worker(w, t) for w in self._index.workers())

    def set_capacity(self, worker: str, capacity: int | None) -> int:
        """Capacity of one worker in blocks (e.g. from its KV pool size); returns blocks evicted now."""
        return self._index.set_capacity(worker, capacity)

    def clear(self, worker: str) -> int:
        return self._index.clear(worker)

    def remove_worker(self, worker: str) -> int:
        self._last.pop(worker, None)
        return self._index.remove_worker(worker)

    def block_count(self, worker: str) -> int:
        return self._index.block_count(worker)

    def workers(self) -> list[str]:
        return self._index.workers()

    def __len__(self) -> int:
        return len(self._index)

    def stats(self) -> dict[str, int]:
        return self._index.stats()

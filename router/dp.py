"""Data-parallel engines (SGLang `--dp-size N`): one index entry and one load count per (worker, rank).

With `--dp-aware`, each rank's KV events (its own publisher: port + rank, or 0.5.23's `kv_event_sources`)
are applied under the key `URL#dpR`, so the index knows which rank holds which prefix. Policies keep
scoring workers: `RankFoldedIndex` answers for a worker with its best rank. Once a worker is chosen,
`choose_rank` picks the rank (most cached blocks, then fewest requests in flight through this router, then
the lowest rank) and the proxy names it in the request (`routed_dp_rank`, SGLang 0.5.10's field;
`data_parallel_rank` for older engines). Invariant: a worker without ranked streams uses its plain URL key,
exactly as before (the fold is skipped while no worker has ranks).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from kvroute.cache_index.hashing import BlockHash
from kvroute.cache_index.radix import RadixIndex

_SEP = "#dp"


def rank_key(url: str, rank: int) -> str:
    """The index and stream key of one rank of `url`."""
    return f"{url}{_SEP}{rank}"


def owner(key: str) -> str:
    """The worker URL of an index/stream key (the key itself for a worker without ranks)."""
    i = key.find(_SEP)
    return key if i < 0 else key[:i]


class RankFoldedIndex:
    """The index as policies see it: a ranked worker's overlap is its best rank's, its block count the sum.

    `ranks[url]` is set for workers whose streams are subscribed per rank."""

    def __init__(self, index: RadixIndex) -> None:
        self.index = index
        self.ranks: dict[str, int] = {}

    def match(self, block_hashes: Sequence[BlockHash]) -> Mapping[str, int]:
        raw = self.index.match(block_hashes)
        if not self.ranks:
            return raw
        out: dict[str, int] = {}
        for key, n in raw.items():
            url = owner(key)
            if n > out.get(url, 0):
                out[url] = n
        return out

    def block_count(self, url: str) -> int:
        n = self.ranks.get(url)
        if n is None:
            return self.index.block_count(url)
        return sum(self.index.block_count(rank_key(url, r)) for r in range(n))

    def rank_overlaps(self, url: str, block_hashes: Sequence[BlockHash]) -> list[int]:
        """Cached leading blocks of the prompt on each rank of `url` (zeros for a worker without ranks)."""
        n = self.ranks.get(url, 0)
        if not n or not block_hashes:
            return [0] * n
        raw = self.index.match(block_hashes)
        return [raw.get(rank_key(url, r), 0) for r in range(n)]


class RankLoad:
    """Requests in flight through this router per (worker, rank); the proxy adds and releases them."""

    def __init__(self) -> None:
        self._in_flight: dict[tuple[str, int], int] = {}

    def add(self, url: str, rank: int) -> None:
        self._in_flight[(url, rank)] = self._in_flight.get((url, rank), 0) + 1

    def release(self, url: str, rank: int) -> None:
        n = self._in_flight.get((url, rank), 0) - 1
        if n > 0:
            self._in_flight[(url, rank)] = n
        else:
            self._in_flight.pop((url, rank), None)

    def get(self, url: str, rank: int) -> int:
        return self._in_flight.get((url, rank), 0)

    def forget(self, url: str) -> None:
        for k in [k for k in self._in_flight if k[0] == url]:
            del self._in_flight[k]


def choose_rank(overlaps: Sequence[int], loads: Sequence[int]) -> int:
    """Most cached blocks; ties to the fewest in flight, then the lowest rank."""
    return min(range(len(loads)), key=lambda r: (-(overlaps[r] if r < len(overlaps) else 0), loads[r], r))

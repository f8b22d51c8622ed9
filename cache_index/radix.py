"""RadixIndex: which worker holds which KV block, and how deep each worker matches a prompt.

Because block hashes are chained (equal hash = equal whole prefix), the tree needs no per-node
objects: it is a few flat dicts of ints, which is what makes the index small and fast in pure Python.

Data layout (see cache_index/README.md):
- ``_masks``: hash -> bitmask of the worker slots holding that block. A key exists iff some worker
  holds the block; ``len(index)`` is its size.
- ``_kids``: hash -> its first child hash; ``_fan``: hash -> set of its further children (only
  at branch points). ``_kids`` holds only ints so the garbage collector never scans it (a dict
  holding sets would be traversed, 700k entries, at every full collection). Children are
  unlinked lazily (a dead child is skipped and pruned later), so dying is O(1).
- ``_roots``: hashes stored with no parent, the entry points of a per-worker walk (``clear``).
- ``_emap``: engine hash -> our hash, shared by all workers (SGLang >= 0.5.9 hashes a prefix alike
  on every worker), to apply ``BlockRemoved``; a worker whose engine hash disagrees gets an
  override in its own small map. Entries of dead blocks are compacted away lazily.
- per worker (``_Worker``): its slot and bit, its block count, its engine-hash overrides and, only
  when it has a capacity or recency tracking, an ``OrderedDict`` of its blocks in LRU order
  (value: the stamp of the last touch).

Invariant (prefix closure): a worker that holds a block holds its parent. ``store`` ignores (and
counts) blocks whose parent the worker does not hold, and removal takes the worker's descendants
with the block (the removal rule below). So along a prompt's chain the masks only shrink, which
lets ``match`` bisect for the depths where they change instead of reading every block.

Removal rule: removing a block from a worker (``remove``, capacity eviction, expiry) also removes
every descendant of that block held by that worker, because the engine can no longer reach them
through the prefix. Other workers are untouched. ``remove`` returns the number of blocks removed,
descendants included; a later ``BlockRemoved`` for a descendant (SGLang removes a node's pages
parent-first) is then ignored and counted as ``stale_removes``.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from itertools import islice
from typing import NamedTuple

from kvroute.cache_index.hashing import BlockHash, EngineBlockHash

__all__ = ["OverlapScores", "RadixIndex", "StoredBlock"]


class StoredBlock(NamedTuple):
    """One block of a ``BlockStored`` event: our chained hash and the engine's opaque key."""

    hash: BlockHash
    engine_hash: EngineBlockHash


class OverlapScores(dict[str, int]):
    """worker -> number of leading prompt blocks it holds; workers holding none are absent."""


class _Worker:
    """Per-worker state. ``lru`` is None unless the worker has a capacity or recency tracking."""

    __slots__ = ("name", "slot", "bit", "count", "emap", "lru", "capacity")

    def __init__(self, name: str, slot: int, capacity: int | None, track: bool) -> None:
        self.name = name
        self.slot = slot
        self.bit = 1 << slot
        self.count = 0
        self.emap: dict[int, int] = {}  # overrides of the shared engine-hash map (usually empty)
        self.capacity = capacity
        self.lru: OrderedDict[int, float] | None = OrderedDict() if (track or capacity is not None) else None


def _check_capacity(capacity: int | None) -> None:
    if capacity is not None and capacity < 1:
        raise ValueError(f"capacity must be a positive number of blocks or None, got {capacity}")


class RadixIndex:
    """The radix tree over KV blocks of a fleet, keyed by chained block hash.

    Invariants: a worker holds a block only if it holds the block's parent (prefix closure);
    ``_masks`` has a key iff some worker holds it; a worker's ``count`` is the number of blocks whose
    mask has its bit. ``match`` is read-only: recency changes only through ``store``, ``insert``
    and ``touch``.

    ``capacity`` (blocks per worker, None = unbounded) bounds each worker with LRU eviction, for
    the approximate mode where no removal events come; ``track_recency`` keeps LRU order (and
    stamps, for expiry) without a bound.
    """

    def __init__(self, capacity: int | None = None, *, track_recency: bool = False) -> None:
        _check_capacity(capacity)
        self._capacity = capacity
        self._track = track_recency
        self._masks: dict[int, int] = {}
        self._kids: dict[int, int] = {}  # first child; ints only: never scanned by the GC
        self._fan: dict[int, set[int]] = {}  # further children, at branch points only
        # Engine hash -> our hash, shared by the workers: SGLang >= 0.5.9 hashes a prefix the same
        # on every worker, so one entry per block serves them all. A worker whose engine hash for
        # a block disagrees gets a per-worker override (`_Worker.emap`). Entries of dead blocks are
        # dropped lazily (`_compact_engine_map`).
        self._emap: dict[int, int] = {}
        self._dead = 0  # blocks that died since the last compaction of `_emap`
        self._roots: set[int] = set()
        self._workers: dict[str, _Worker] = {}
        self._names: dict[int, str] = {}  # slot -> worker name
        self._free_slots: list[int] = []  # heap: reuse the lowest slot so masks stay short ints
        self._next_slot = 0
        # Equal masks share one int object: saves ~36 bytes a node and keeps match's reads in cache.
        self._pool: dict[int, int] = {}
        self._stats = {
            "stored_blocks": 0,
            "removed_blocks": 0,
            "descendants_removed": 0,
            "evicted_blocks": 0,
            "unknown_removes": 0,
            "stale_removes": 0,
            "orphan_blocks": 0,
            "engine_hash_overrides": 0,
        }

    def _intern(self, m: int) -> int:
        pool = self._pool
        v = pool.get(m)
        if v is None:
            if len(pool) >= 1 << 16:  # bound the pool; masks already stored keep their objects
                pool.clear()
            pool[m] = v = m
        return v

    # ----------------------------------------------------------------- workers
    def _worker(self, name: str) -> _Worker:
        ws = self._workers.get(name)
        if ws is None:
            if self._free_slots:
                slot = heapq.heappop(self._free_slots)
            else:
                slot = self._next_slot
                self._next_slot += 1
            ws = _Worker(name, slot, self._capacity, self._track)
            self._workers[name] = ws
            self._names[slot] = name
        return ws

    def add_worker(self, worker: str, capacity: int | None = None) -> None:
        """Register a worker (optional: ``store`` registers too); ``capacity`` overrides the default."""
        self._worker(worker)
        if capacity is not None:
            self.set_capacity(worker, capacity)

    def set_capacity(self, worker: str, capacity: int | None) -> int:
        """Set one worker's capacity in blocks (None = unbounded); returns the blocks evicted now."""
        _check_capacity(capacity)
        ws = self._worker(worker)
        ws.capacity = capacity
        if capacity is not None and ws.lru is None:
            # Start LRU tracking with the existing blocks, descendants before their ancestors
            # (the walk lists parents first), so eviction takes leaves first.
            ws.lru = OrderedDict.fromkeys(reversed(self._walk(ws)), 0.0)
        return self._enforce_capacity(ws)

    def workers(self) -> list[str]:
        return list(self._workers)

    def block_count(self, worker: str) -> int:
        ws = self._workers.get(worker)
        return ws.count if ws is not None else 0

    def __len__(self) -> int:
        return len(self._masks)

    def __contains__(self, block: object) -> bool:
        return block in self._masks

    def stats(self) -> dict[str, int]:
        """Counters since construction plus current sizes (nodes, workers, worker-block pairs)."""
        out = dict(self._stats)
        out["nodes"] = len(self._masks)
        out["workers"] = len(self._workers)
        out["worker_blocks"] = sum(ws.count for ws in self._workers.values())
        return out

    # ------------------------------------------------------------------ store
    def store(self, worker: str, parent: BlockHash | None, blocks: Sequence[StoredBlock]) -> None:
        """Record that ``worker`` holds ``blocks``, a chain continuing from ``parent`` (None = root).

        If the worker does not hold ``parent`` the blocks are ignored and counted as
        ``orphan_blocks`` (the engine cannot hold a block without its prefix: our view is stale).
        Blocks already held are refreshed. Recency (LRU) is kept only for workers with a capacity
        or recency tracking.
        """
        ws = self._worker(worker)
        masks = self._masks
        bit = ws.bit
        if parent is not None and not masks.get(parent, 0) & bit:
            self._stats["orphan_blocks"] += len(blocks)
            return
        setdefault = self._emap.setdefault
        wemap = ws.emap
        kids = self._kids
        intern = self._intern
        p: int | None = parent
        p_new = False  # p was born in this call, so it has no child yet
        added = 0
        for h, e in blocks:
            m = masks.get(h)
            if m is None:
                masks[h] = bit
                added += 1
                if p_new:
                    kids[p] = h  # type: ignore[index]
                elif p is None:
                    self._roots.add(h)
                else:
                    self._link(kids, p, h)
                p_new = True
            else:
                if not m & bit:
                    masks[h] = intern(m | bit)
                    added += 1
                p_new = False
            g = setdefault(e, h)
            if g is not h and g != h:
                wemap[e] = h  # this worker's engine names another block than the shared map
                self._stats["engine_hash_overrides"] += 1
            elif wemap:
                wemap.pop(e, None)
            p = h
        ws.count += added
        self._stats["stored_blocks"] += added
        if ws.lru is not None and blocks:
            self._refresh(ws, [b[0] for b in blocks], 0.0)

    def insert(
        self, worker: str, parent: BlockHash | None, hashes: Sequence[BlockHash], stamp: float = 0.0
    ) -> int:
        """Like ``store`` without engine hashes (the approximate mode); returns blocks newly held.

        ``stamp`` is recorded as the blocks' last use (for ``evict_before``); keep it non-decreasing.
        """
        ws = self._worker(worker)
        masks = self._masks
        bit = ws.bit
        if parent is not None and not masks.get(parent, 0) & bit:
            self._stats["orphan_blocks"] += len(hashes)
            return 0
        kids = self._kids
        intern = self._intern
        p: int | None = parent
        p_new = False
        added = 0
        for h in hashes:
            m = masks.get(h)
            if m is None:
                masks[h] = bit
                added += 1
                if p_new:
                    kids[p] = h  # type: ignore[index]
                elif p is None:
                    self._roots.add(h)
                else:
                    self._link(kids, p, h)
                p_new = True
            else:
                if not m & bit:
                    masks[h] = intern(m | bit)
                    added += 1
                p_new = False
            p = h
        ws.count += added
        self._stats["stored_blocks"] += added
        if ws.lru is not None and hashes:
            self._refresh(ws, hashes, stamp)
        return added

    def _link(self, kids: dict[int, int], p: int, h: int) -> None:
        """Record ``h`` as a child of ``p`` (``h`` was just born)."""
        v = kids.get(p)
        if v is None or v == h or v not in self._masks:
            kids[p] = h  # first child, or a dead one replaced (lazy unlinking)
            return
        fan = self._fan.get(p)
        if fan is None:
            self._fan[p] = {h}
        elif h not in fan:
            fan.add(h)
            n = len(fan)
            if n >= 8 and n & (n - 1) == 0:  # at each power of two, prune dead children
                masks = self._masks
                fan.difference_update([c for c in fan if c not in masks])

    def _held_children(self, x: int, bit: int) -> list[int]:
        """Children of ``x`` whose mask has ``bit``."""
        masks = self._masks
        c = self._kids.get(x)
        out = [c] if c is not None and masks.get(c, 0) & bit else []
        fan = self._fan.get(x)
        if fan:
            out.extend(k for k in fan if masks.get(k, 0) & bit)
        return out

    def _refresh(self, ws: _Worker, hashes: Sequence[int], stamp: float) -> None:
        """Mark held ``hashes`` most recently used, the first one last: ancestors outlive descendants."""
        lru = ws.lru
        assert lru is not None
        masks = self._masks
        bit = ws.bit
        for h in reversed(hashes):
            if masks.get(h, 0) & bit:
                lru[h] = stamp
                lru.move_to_end(h)
        self._enforce_capacity(ws)

    def touch(self, worker: str, hashes: Sequence[BlockHash], stamp: float = 0.0) -> None:
        """Refresh the recency of the listed blocks the worker holds (no-op without LRU tracking)."""
        ws = self._workers.get(worker)
        if ws is not None and ws.lru is not None:
            self._refresh(ws, hashes, stamp)

    def _enforce_capacity(self, ws: _Worker) -> int:
        cap = ws.capacity
        lru = ws.lru
        if cap is None or lru is None or ws.count <= cap:
            return 0
        n = 0
        while ws.count > cap:
            victim = next(iter(lru))
            n += self._drop(ws, victim)
        self._stats["evicted_blocks"] += n
        return n

    # ----------------------------------------------------------------- remove
    def remove(self, worker: str, engine_hashes: Iterable[EngineBlockHash]) -> int:
        """Apply a ``BlockRemoved``: returns blocks removed from ``worker``, descendants included.

        Unknown engine hashes, and those whose block the worker no longer holds (already removed
        as a descendant), are ignored and counted (``unknown_removes``, ``stale_removes``).
        """
        ws = self._workers.get(worker)
        if ws is None:
            self._stats["unknown_removes"] += sum(1 for _ in engine_hashes)
            return 0
        wemap = ws.emap
        gemap = self._emap
        masks = self._masks
        bit = ws.bit
        removed = 0
        for e in engine_hashes:
            h = wemap.pop(e, None) if wemap else None
            if h is None:
                h = gemap.get(e)
            if h is None:
                self._stats["unknown_removes"] += 1
            elif not masks.get(h, 0) & bit:
                self._stats["stale_removes"] += 1
            else:
                removed += self._drop(ws, h)
        return removed

    def remove_blocks(self, worker: str, hashes: Iterable[BlockHash]) -> int:
        """Remove blocks by our own hash (with their descendants, for this worker)."""
        ws = self._workers.get(worker)
        if ws is None:
            return 0
        removed = 0
        for h in hashes:
            if self._masks.get(h, 0) & ws.bit:
                removed += self._drop(ws, h)
        return removed

    def _drop(self, ws: _Worker, h: int) -> int:
        """Remove ``h`` and the worker's descendants of it from ``ws``; returns how many."""
        n = self._drop_subtrees(ws, [h])
        if n > 1:
            self._stats["descendants_removed"] += n - 1
        return n

    def _drop_subtrees(self, ws: _Worker, stack: list[int]) -> int:
        """Remove the listed blocks and the worker's descendants of them; returns how many.

        The hot loop of removal, eviction and ``clear``: children read inline, no calls per block.
        """
        masks = self._masks
        get = masks.get
        kids_get = self._kids.get
        kids_pop = self._kids.pop
        roots_discard = self._roots.discard
        fan = self._fan
        intern = self._intern
        lru = ws.lru
        bit = ws.bit
        keep = ~bit
        n = 0
        dead = 0
        while stack:
            x = stack.pop()
            m = get(x, 0)
            if not m & bit:
                continue  # not held (or already dropped through another path)
            c = kids_get(x)
            if c is not None and get(c, 0) & bit:
                stack.append(c)
            if fan:
                f = fan.get(x)
                if f:
                    stack.extend(k for k in f if get(k, 0) & bit)
            m &= keep
            if m:
                masks[x] = intern(m)
            else:  # no worker holds x, so (prefix closure) none holds its children either
                del masks[x]
                kids_pop(x, None)
                if fan:
                    fan.pop(x, None)
                roots_discard(x)
                dead += 1
            if lru is not None:
                lru.pop(x, None)
            n += 1
        self._dead += dead
        ws.count -= n
        self._stats["removed_blocks"] += n
        if self._dead > 4096 and self._dead > len(masks):
            self._compact_engine_map()
        return n

    def _compact_engine_map(self) -> None:
        """Drop engine-hash entries of dead blocks: amortised O(1) per death, bounds the map."""
        masks = self._masks
        self._emap = {e: h for e, h in self._emap.items() if h in masks}
        self._dead = 0

    def _walk(self, ws: _Worker) -> list[int]:
        """All blocks the worker holds, found from the roots through held nodes (prefix closure)."""
        masks = self._masks
        bit = ws.bit
        if ws.lru is not None:
            return list(ws.lru)
        out: list[int] = []
        stack = [r for r in self._roots if masks.get(r, 0) & bit]
        seen: set[int] = set()
        while stack:
            x = stack.pop()
            if x in seen:
                continue
            seen.add(x)
            out.append(x)
            stack.extend(self._held_children(x, bit))
        return out

    def clear(self, worker: str) -> int:
        """Forget every block of ``worker`` (``AllBlocksCleared``, or a lost event); returns how many."""
        ws = self._workers.get(worker)
        if ws is None:
            return 0
        masks = self._masks
        bit = ws.bit
        if ws.lru is not None:
            start = list(ws.lru)
        else:
            start = [r for r in self._roots if masks.get(r, 0) & bit]
        n = self._drop_subtrees(ws, start)
        if ws.count:
            # Blocks not reachable through the worker's own chain (only possible if a caller
            # stored inconsistent chains): one full scan so the slot is clean before any reuse.
            n += self._drop_subtrees(ws, [x for x, m in masks.items() if m & bit])
        ws.emap = {}
        return n

    def remove_worker(self, worker: str) -> int:
        """Forget ``worker`` and free its slot for reuse; returns the blocks it held."""
        if worker not in self._workers:
            return 0
        n = self.clear(worker)
        ws = self._workers.pop(worker)
        del self._names[ws.slot]
        heapq.heappush(self._free_slots, ws.slot)
        return n

    # ------------------------------------------------------------------ reads
    def our_hash(self, worker: str, engine_hash: EngineBlockHash) -> BlockHash | None:
        """Our hash for a block the worker still holds, by its engine hash (None if unknown)."""
        ws = self._workers.get(worker)
        if ws is None:
            return None
        h = ws.emap.get(engine_hash)
        if h is None:
            h = self._emap.get(engine_hash)
        if h is None or not self._masks.get(h, 0) & ws.bit:
            return None
        return BlockHash(h)

    def holds(self, worker: str, block: BlockHash) -> bool:
        ws = self._workers.get(worker)
        return ws is not None and bool(self._masks.get(block, 0) & ws.bit)

    def match(self, block_hashes: Sequence[BlockHash]) -> OverlapScores:
        """Per worker, how many leading blocks of ``block_hashes`` it holds (read-only).

        ``block_hashes`` must be a chain (each block the child of the one before, as
        ``hash_blocks`` returns for a prompt). By prefix closure the set of workers holding block
        i then only shrinks as i grows, so instead of walking every block the search bisects for
        the depths where that set changes: O(k log n) dict reads for n blocks and k distinct
        worker sets along the prompt (a miss at the first block costs one read). The result equals
        the block-by-block walk that ANDs worker masks (``match_walk``).
        """
        scores = OverlapScores()
        n = len(block_hashes)
        if n == 0:
            return scores
        get = self._masks.get
        first = get(block_hashes[0])
        if not first:
            return scores
        names = self._names
        last = (get(block_hashes[n - 1]) or 0) & first
        # Intervals [lo, hi] with known masks at both ends; equal ends mean constant in between.
        stack = [(0, first, n - 1, last)]
        while stack:
            lo, mlo, hi, mhi = stack.pop()
            if mlo == mhi:
                continue
            if hi - lo == 1:
                gone = mlo & ~mhi  # hold blocks 0..lo, not block hi: a prefix of hi blocks
                while gone:
                    low = gone & -gone
                    scores[names[low.bit_length() - 1]] = hi
                    gone ^= low
                continue
            mid = (lo + hi) >> 1
            mm = (get(block_hashes[mid]) or 0) & mlo
            stack.append((mid, mm, hi, mhi & mm))
            stack.append((lo, mlo, mid, mm))
        while last:
            low = last & -last
            scores[names[low.bit_length() - 1]] = n
            last ^= low
        return scores

    def match_walk(self, block_hashes: Sequence[BlockHash]) -> OverlapScores:
        """``match`` by walking every block and ANDing masks: O(matched depth), any sequence.

        For sequences that are not chains (tests, diagnostics), and the reference ``match``
        is checked against.
        """
        scores = OverlapScores()
        if not block_hashes:
            return scores
        get = self._masks.get
        cur = get(block_hashes[0])
        if not cur:
            return scores
        names = self._names
        # At step d (block index d), the workers still in `cur` hold the d blocks before it.
        for d, m in enumerate(map(get, islice(block_hashes, 1, None)), 1):
            if m != cur:
                nxt = cur & m if m is not None else 0
                if nxt != cur:
                    gone = cur & ~nxt
                    while gone:
                        low = gone & -gone
                        scores[names[low.bit_length() - 1]] = d
                        gone ^= low
                    if not nxt:
                        return scores
                    cur = nxt
        d = len(block_hashes)
        while cur:
            low = cur & -cur
            scores[names[low.bit_length() - 1]] = d
            cur ^= low
        return scores

    # ------------------------------------------------------------- recency
    def evict_before(self, worker: str, stamp: float) -> int:
        """Drop the worker's blocks last touched before ``stamp`` (TTL expiry); needs LRU tracking."""
        ws = self._workers.get(worker)
        if ws is None or ws.lru is None:
            return 0
        lru = ws.lru
        n = 0
        while lru:
            h, s = next(iter(lru.items()))
            if s >= stamp:
                break
            n += self._drop(ws, h)
        return n

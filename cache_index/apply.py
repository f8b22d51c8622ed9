"""Applies one worker's decoded KV-event batches to the radix index, translating engine hashes to ours.

Why translate: an engine's hash is opaque (its algorithm changed across SGLang versions and may be
namespaced), so kvroute recomputes its own chained hash from the tokens every `BlockStored` carries
and keeps, per worker in the index, the engine-hash -> our-hash map that `BlockRemoved` and parent
links need.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from itertools import chain
from typing import Protocol, cast

from kvroute.cache_index.events import MEDIUM_GPU, AllBlocksCleared, BlockRemoved, BlockStored, KvEventBatch
from kvroute.cache_index.hashing import BlockHash, EngineBlockHash, hash_blocks
from kvroute.cache_index.radix import StoredBlock

__all__ = ["ApplyStats", "KvEventApplier", "KvIndex", "page_size_problem"]


def page_size_problem(page_size: int, block_size: int) -> str | None:
    """Why engine pages of `page_size` tokens cannot be folded into router blocks of `block_size`, or
    None: a router block is a whole run of pages, so the block size must be a multiple of the page size
    (SGLang's default --page-size 1 always fits)."""
    if page_size <= 0:
        return f"engine page_size {page_size} is not a positive number of tokens"
    if block_size % page_size:
        return (
            f"engine page_size {page_size} does not divide the router's --block-size {block_size}: a "
            f"router block must be a whole number of engine pages; run the router with a --block-size "
            f"that is a multiple of every engine's page size (e.g. {page_size * -(-block_size // page_size)})"
        )
    return None


# A page of a router block that it does not end (engine pages smaller than router blocks): the router
# block before its block (None: the root), the tokens of its block as far as known, and how many of them
# are up to and including this page. Kept so that a chain continued or split after this page (its
# engine hash as a parent) can be folded; the block's own index entry hangs on its last page.
_Partial = tuple["BlockHash | None", tuple[int, ...], int]


class KvIndex(Protocol):
    """The part of `RadixIndex` the applier writes to."""

    def store(self, worker: str, parent: BlockHash | None, blocks: Sequence[StoredBlock]) -> object: ...

    def remove(self, worker: str, engine_hashes: Sequence[EngineBlockHash]) -> int: ...

    def our_hash(self, worker: str, engine_hash: EngineBlockHash) -> BlockHash | None: ...

    def clear(self, worker: str) -> object: ...


@dataclass
class ApplyStats:
    """Counters per applier (one applier may serve many workers). Units: pages, except `events`."""

    events: int = 0
    stored: int = 0
    removed: int = 0
    clears: int = 0
    orphan: int = 0
    """Pages skipped: their parent's engine hash is unknown (typically events after a gap/reset)."""
    mismatch: int = 0
    """Pages skipped: page size does not divide the router's block size, or tokens not whole pages."""
    other_medium: int = 0
    """Pages of a tier other than GPU, ignored (no `cpu_index`)."""
    namespaced: int = 0
    """Pages skipped: under a LoRA adapter with no known seed, or a cache salt (not reusable by others)."""

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class KvEventApplier:
    """Applies decoded batches of one or more workers to `index`.

    Tiers: only GPU pages (medium "GPU" or None) go to `index`, since only they save prefill work.
    Pages of another medium (HiCache "CPU_PINNED", ...) go to `cpu_index` when one is given, else are
    counted in `other_medium` and dropped; a `BlockRemoved` goes to the index of its own medium.
    LoRA: pages with a `lora_id`/`lora_name` are hashed with `lora_seeds[lora_id or lora_name]`, and
    skipped (counted) when no seed is known, so they never match base-model prompts.
    Page sizes: an engine whose page size divides the block size (SGLang's default 1, or 16 under
    block 64) has its pages folded into router blocks: a block enters the index once its last page is
    stored, keyed in the engine-hash map by that last page (SGLang evicts leaves first, so a block's
    last page goes first, and with it the block); the other pages are kept per worker as partial
    blocks (`_Partial`) so a chain continued or split mid-block still folds. One fleet may mix sizes.
    Never raises on event content: what cannot be placed is counted and skipped.
    """

    def __init__(
        self,
        index: KvIndex,
        *,
        block_size: int,
        seed: int = 0,
        cpu_index: KvIndex | None = None,
        lora_seeds: Mapping[int | str, int] | None = None,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.index = index
        self.cpu_index = cpu_index
        self.block_size = block_size
        self.seed = seed
        self.lora_seeds: Mapping[int | str, int] = lora_seeds or {}
        self.stats = ApplyStats()
        self._partials: dict[str, dict[int, _Partial]] = {}  # worker -> engine hash -> partial block

    def _target(self, medium: str | None) -> KvIndex | None:
        return self.index if medium is None or medium == MEDIUM_GPU else self.cpu_index

    def apply(self, worker: str, batch: KvEventBatch) -> None:
        """Apply every event of `batch`, in order, for `worker`.

        Consecutive well-formed `BlockStored` events that continue one chain (each parented on the
        previous one's last hash, same page size, tier and namespace: what SGLang <= 0.5.10 sends,
        one page per event) are applied as one merged store, as 0.5.23 merges them at the source:
        same result, a fraction of the per-event cost.
        """
        st = self.stats
        evs = batch.events
        n = len(evs)
        i = 0
        while i < n:
            ev = evs[i]
            i += 1
            st.events += 1
            if type(ev) is BlockStored:
                j = _chain_end(evs, i - 1)
                if j == i:
                    self._store(worker, ev, ev.block_hashes, ev.token_ids)
                else:
                    run = evs[i - 1 : j]
                    hashes = list(chain.from_iterable([e.block_hashes for e in run]))  # type: ignore[union-attr]
                    tokens = list(chain.from_iterable([e.token_ids for e in run]))  # type: ignore[union-attr]
                    st.events += j - i
                    i = j
                    self._store(worker, ev, hashes, tokens)
            elif type(ev) is BlockRemoved:
                target = self._target(ev.medium)
                if target is None:
                    st.other_medium += len(ev.block_hashes)
                    continue
                removed = cast("tuple[EngineBlockHash, ...]", ev.block_hashes)
                partials = self._partials.get(worker)
                if partials and target is self.index:
                    # a page that ends no router block is not in the index: forget it here
                    removed = tuple(h for h in removed if partials.pop(h, None) is None)
                st.removed += target.remove(worker, removed)
            elif type(ev) is AllBlocksCleared:
                st.clears += 1
                self.forget(worker)

    def _store(self, worker: str, ev: BlockStored, hashes: Sequence[int], tokens: Sequence[int]) -> None:
        """Store the chain `hashes`/`tokens` (ev's own, or a merged run starting at ev) for worker."""
        st = self.stats
        n = len(hashes)
        target = self._target(ev.medium)
        if target is None:
            st.other_medium += n
            return
        bs = self.block_size
        ps = ev.block_size
        if ps <= 0 or bs % ps or len(tokens) != n * ps:
            st.mismatch += n
            return
        seed = self.seed
        if ev.cache_salt is not None:
            st.namespaced += n
            return
        lora = ev.lora_id if ev.lora_id is not None else ev.lora_name
        if lora is not None:
            lora_seed = self.lora_seeds.get(lora)
            if lora_seed is None:
                st.namespaced += n
                return
            seed = lora_seed
        if ps != bs:
            if target is not self.index:  # folding tracks GPU pages only
                st.other_medium += n
                return
            self._store_folded(worker, ev.parent_block_hash, hashes, tokens, ps, seed)
            return
        parent: BlockHash | None = None
        if ev.parent_block_hash is not None:
            parent = target.our_hash(worker, EngineBlockHash(ev.parent_block_hash))
            if parent is None:
                st.orphan += n
                return
        ours = hash_blocks(tokens, bs, seed, parent if parent is not None else 0)
        # Plain (hash, engine hash) pairs: StoredBlock is a NamedTuple, the index only unpacks them,
        # and building one NamedTuple per page cost 14x the zip (~65 us per 190-page store).
        pairs = cast("list[StoredBlock]", list(zip(ours, hashes, strict=True)))
        target.store(worker, parent, pairs)
        st.stored += n

    def _store_folded(
        self,
        worker: str,
        engine_parent: int | None,
        hashes: Sequence[int],
        tokens: Sequence[int],
        ps: int,
        seed: int,
    ) -> None:
        """Fold a chain of engine pages of `ps` tokens (ps divides the block size) into router blocks."""
        st = self.stats
        n = len(hashes)
        bs = self.block_size
        per = bs // ps  # pages per router block
        partials = self._partials.setdefault(worker, {})
        prev: BlockHash | None = None
        carry: tuple[int, ...] = ()
        if engine_parent is not None:
            prev = self.index.our_hash(worker, EngineBlockHash(engine_parent))
            if prev is None:
                part = partials.get(engine_parent)
                if part is None:
                    st.orphan += n
                    return
                prev, block_tokens, k = part
                carry = block_tokens[:k]
        run = (*carry, *tokens)
        ours = hash_blocks(run, bs, seed, prev if prev is not None else 0)
        skip = len(carry) // ps  # pages of the first block stored before this chain
        if ours:
            # each block is known to the engine-hash map by its last page
            ends = [hashes[(j + 1) * per - skip - 1] for j in range(len(ours))]
            self.index.store(worker, prev, cast("list[StoredBlock]", list(zip(ours, ends, strict=True))))
        block_j = -1
        block: tuple[int, ...] = ()
        block_prev = prev
        for i in range(n):
            j, k = divmod(skip + i + 1, per)  # page i ends k pages into block j (counted from `prev`)
            if k == 0:
                continue  # it ends block j - 1: in the index
            if j != block_j:  # one token tuple per block, shared by its pages
                block_j, block = j, tuple(run[j * bs : (j + 1) * bs])
                block_prev = prev if j == 0 else ours[j - 1]
            partials[hashes[i]] = (block_prev, block, k * ps)
        st.stored += n

    def forget(self, worker: str) -> None:
        """Drop everything known about `worker` (after an unrecoverable gap in its stream)."""
        self._partials.pop(worker, None)
        self.index.clear(worker)
        if self.cpu_index is not None:
            self.cpu_index.clear(worker)

    def remove_worker(self, worker: str) -> None:
        """Forget the partial blocks of a worker that left (the index forgets its own entries)."""
        self._partials.pop(worker, None)

    def partial_pages(self, worker: str | None = None) -> int:
        """Engine pages held as partial router blocks (memory: one small tuple each)."""
        if worker is not None:
            return len(self._partials.get(worker, {}))
        return sum(len(p) for p in self._partials.values())


def _whole(ev: BlockStored) -> bool:
    return len(ev.token_ids) == len(ev.block_hashes) * ev.block_size


def _chain_end(evs: Sequence[object], start: int) -> int:
    """End (exclusive) of the run of BlockStored events from `start` that continue one chain."""
    first = evs[start]
    assert type(first) is BlockStored
    if not _whole(first):
        return start + 1
    last = first.block_hashes[-1] if first.block_hashes else None
    j = start + 1
    while j < len(evs):
        nx = evs[j]
        if not (
            type(nx) is BlockStored
            and last is not None
            and nx.parent_block_hash == last
            and nx.block_hashes
            and nx.block_size == first.block_size
            and _whole(nx)
            and nx.medium == first.medium
            and nx.lora_id == first.lora_id
            and nx.lora_name == first.lora_name
            and nx.cache_salt == first.cache_salt
        ):
            break
        last = nx.block_hashes[-1]
        j += 1
    return j

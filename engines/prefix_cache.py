"""Paged prefix cache: the ground truth for `cached_tokens` and the source of KV events.

A radix tree whose edges are pages of `page_size` tokens (SGLang with `--page-size N` only caches
and matches whole pages). It also does the KV pool's accounting: `capacity_tokens` is shared by
tree pages and by tokens that requests hold privately (being prefilled or decoded, not yet in the
tree). Pages referenced by a running request are locked; unlocked leaves are evicted in LRU order,
as SGLang's `RadixCache.evict` does, so a parent goes only after its children.

No timing and no I/O here: the simulated and the GPU engine share it. Changes are queued as
`PageStored` / `PagesRemoved` / `CacheCleared` notes; the engine drains them with `take_events()`
after each scheduler step and publishes them (SGLang's `tree_cache.take_events()` pattern).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgspec

PageHasher = Callable[[Sequence[int], "str | None"], "tuple[str, int]"]
"""(page token ids, parent page's hex digest or None) -> (hex digest, signed int64 for events)."""


def default_page_hasher() -> PageHasher:
    """SGLang's chained SHA-256 page hash, from the shared publisher module."""
    from kvroute.engines.kv_publisher import sglang_page_hash

    return sglang_page_hash


@dataclass(frozen=True, slots=True)
class PageStored:
    """A page entered the cache. `parent_hash` is None for a page hanging off the root."""

    block_hash: int
    parent_hash: int | None
    token_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PagesRemoved:
    block_hashes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class CacheCleared:
    pass


CacheNote = PageStored | PagesRemoved | CacheCleared


class PageNode(msgspec.Struct, gc=False, eq=False):
    """One cached page. Invariant: `lock_ref` counts requests holding this page (and so its ancestors).

    Not tracked by Python's cycle collector (`gc=False`): a full collection over a tree of 1e5 tracked
    nodes stalls the event loop for ~0.1 s. The parent <-> children cycles are therefore broken by hand
    (an evicted page is a leaf nobody references; `reset` unlinks the whole tree).
    """

    tokens: tuple[int, ...]
    parent: PageNode | None
    hash_hex: str | None
    hash_int: int | None
    children: dict[tuple[int, ...], PageNode] | None = None
    """None for a leaf (most pages): an empty dict per page would cost 64 bytes each."""
    lock_ref: int = 0
    last_access: int = 0
    alive: bool = True


@dataclass(frozen=True, slots=True)
class MatchResult:
    """The cached prefix of a prompt: `nodes` from the root, `cached_tokens = len(nodes) * page_size`."""

    nodes: tuple[PageNode, ...]
    cached_tokens: int


class PrefixCache:
    """Radix tree over pages plus the pool's token accounting.

    Invariants: `tree_tokens + private_tokens <= capacity_tokens` after every public call except
    transiently inside `insert` (the caller then frees the private copy it replaced); a locked page
    and every ancestor of it are never evicted.
    """

    def __init__(
        self,
        page_size: int,
        capacity_tokens: int,
        *,
        hasher: PageHasher | None = None,
        record_events: bool = True,
    ) -> None:
        if page_size <= 0:
            raise ValueError(f"page_size must be positive, got {page_size}")
        if capacity_tokens < page_size:
            raise ValueError(f"capacity_tokens ({capacity_tokens}) is below one page ({page_size})")
        self.page_size = page_size
        self.capacity_tokens = capacity_tokens
        self.record_events = record_events
        self._hasher = hasher if hasher is not None else (default_page_hasher() if record_events else None)
        self.root = PageNode(tokens=(), parent=None, hash_hex=None, hash_int=None, lock_ref=1, children={})
        self._n_pages = 0
        self.tree_tokens = 0
        self.protected_tokens = 0
        self.private_tokens = 0
        self._clock = itertools.count(1)
        self._tie = itertools.count()
        self._heap: list[tuple[int, int, PageNode]] = []
        self._events: list[CacheNote] = []
        self.evicted_tokens_total = 0

    # ---- accounting -------------------------------------------------------------------------
    @property
    def evictable_tokens(self) -> int:
        return self.tree_tokens - self.protected_tokens

    @property
    def free_tokens(self) -> int:
        return self.capacity_tokens - self.tree_tokens - self.private_tokens

    @property
    def used_tokens(self) -> int:
        """Tokens that cannot be reclaimed now: private ones and locked pages."""
        return self.private_tokens + self.protected_tokens

    def can_alloc(self, n: int) -> bool:
        return self.free_tokens + self.evictable_tokens >= n

    def alloc(self, n: int) -> bool:
        """Reserve `n` private tokens, evicting unlocked pages if needed; False (no change) if impossible."""
        if n <= 0:
            return True
        if not self.can_alloc(n):
            return False
        short = n - self.free_tokens
        if short > 0:
            self.evict(short)
        self.private_tokens += n
        return True

    def free(self, n: int) -> None:
        if n < 0 or n > self.private_tokens:
            raise ValueError(f"free({n}) with {self.private_tokens} private tokens")
        self.private_tokens -= n

    # ---- matching, locking ------------------------------------------------------------------
    def page_keys(self, token_ids: Sequence[int]) -> list[tuple[int, ...]]:
        ps = self.page_size
        n = len(token_ids) // ps
        return [tuple(token_ids[i * ps : (i + 1) * ps]) for i in range(n)]

    def match_prefix(self, token_ids: Sequence[int], *, touch: bool = True) -> MatchResult:
        """Longest cached page-aligned prefix; `touch` marks it recently used (LRU)."""
        node = self.root
        path: list[PageNode] = []
        ps = self.page_size
        for i in range(len(token_ids) // ps):  # keys built lazily: a miss stops early
            if not node.children:
                break
            child = node.children.get(tuple(token_ids[i * ps : (i + 1) * ps]))
            if child is None:
                break
            path.append(child)
            node = child
        return self._matched(path, touch)

    def extend_match(
        self, keys: Sequence[tuple[int, ...]], node: PageNode | None, depth: int
    ) -> tuple[PageNode | None, int]:
        """Longest cached prefix of `keys` (from `page_keys`), resuming from an earlier result: `node`
        matched `keys[:depth]` and, while it is still cached, so are its ancestors (eviction takes
        leaves only; a node's path never changes). Returns (deepest matched page or None, pages).
        No LRU touch. For a prompt matched every step (the lpm policy's sort) this costs O(new pages)."""
        if node is None or not node.alive:
            node, depth = self.root, 0
        while depth < len(keys) and node.children:
            child = node.children.get(keys[depth])
            if child is None:
                break
            node, depth = child, depth + 1
        return (node if depth else None), depth

    def _matched(self, path: list[PageNode], touch: bool) -> MatchResult:
        if touch and path:
            now = next(self._clock)
            for n in path:
                n.last_access = now
            self._maybe_evictable(path[-1])
        return MatchResult(tuple(path), len(path) * self.page_size)

    def lock(self, nodes: Sequence[PageNode]) -> None:
        for n in nodes:
            if n.lock_ref == 0:
                self.protected_tokens += len(n.tokens)
            n.lock_ref += 1

    def unlock(self, nodes: Sequence[PageNode]) -> None:
        now = next(self._clock)
        for n in nodes:
            if n.lock_ref <= 0:
                raise ValueError("unlock of a page that is not locked")
            n.lock_ref -= 1
            if n.lock_ref == 0:
                self.protected_tokens -= len(n.tokens)
            n.last_access = now
        if nodes:
            self._maybe_evictable(nodes[-1])

    # ---- insertion --------------------------------------------------------------------------
    def insert(self, token_ids: Sequence[int]) -> tuple[tuple[PageNode, ...], int]:
        """Insert every full page of `token_ids`; returns (the path from the root, tokens newly added).

        Newly added pages come from a request's private KV: the caller frees that many private tokens.
        """
        node = self.root
        path: list[PageNode] = []
        added = 0
        now = next(self._clock)
        for key in self.page_keys(token_ids):
            child = node.children.get(key) if node.children else None
            if child is None:
                hex_, int_ = (None, None)
                if self._hasher is not None:
                    hex_, int_ = self._hasher(key, node.hash_hex)
                child = PageNode(tokens=key, parent=node, hash_hex=hex_, hash_int=int_)
                if node.children is None:
                    node.children = {}
                node.children[key] = child
                self._n_pages += 1
                self.tree_tokens += len(key)
                added += len(key)
                if self.record_events and int_ is not None:
                    self._events.append(PageStored(int_, node.hash_int, key))
            child.last_access = now
            path.append(child)
            node = child
        if path:
            self._maybe_evictable(path[-1])
        return tuple(path), added

    # ---- eviction ---------------------------------------------------------------------------
    def _maybe_evictable(self, node: PageNode) -> None:
        if node.alive and node.lock_ref == 0 and not node.children and node is not self.root:
            heapq.heappush(self._heap, (node.last_access, next(self._tie), node))
            if len(self._heap) > 2 * self._n_pages + 1024:
                self._compact_heap()

    def _compact_heap(self) -> None:
        """Drop stale entries (every touch pushes one): the heap stays O(pages), not O(requests)."""
        live: list[tuple[int, int, PageNode]] = []
        stack = [self.root]
        while stack:
            n = stack.pop()
            if n.children:
                stack.extend(n.children.values())
            elif n is not self.root and n.lock_ref == 0:
                live.append((n.last_access, next(self._tie), n))
        heapq.heapify(live)
        self._heap = live

    def evict(self, n_tokens: int) -> int:
        """Evict unlocked leaves, least recently used first, until `n_tokens` are freed; returns freed."""
        freed = 0
        removed: list[int] = []
        while freed < n_tokens and self._heap:  # not aliased: _maybe_evictable may compact the heap
            ts, _, node = heapq.heappop(self._heap)
            if not node.alive or node.lock_ref or node.children or ts != node.last_access:
                continue
            parent = node.parent
            assert parent is not None and parent.children is not None
            del parent.children[node.tokens]
            if not parent.children and parent is not self.root:
                parent.children = None
            node.alive = False
            self._n_pages -= 1
            self.tree_tokens -= len(node.tokens)
            freed += len(node.tokens)
            if node.hash_int is not None:
                removed.append(node.hash_int)
            self._maybe_evictable(parent)
        if removed and self.record_events:
            self._events.append(PagesRemoved(tuple(removed)))
        self.evicted_tokens_total += freed
        return freed

    def reset(self) -> None:
        """Drop every page (SGLang refuses a flush while requests run; the engine checks that)."""
        if self.protected_tokens:
            raise ValueError("cannot reset a cache with locked pages")
        stack = [self.root]
        while stack:  # unlink every page: the collector will not find these cycles (gc=False)
            n = stack.pop()
            if n.children:
                stack.extend(n.children.values())
            n.children = None
            n.alive = False
            n.parent = None
        self.root.alive = True
        self.root.children = {}
        self.tree_tokens = 0
        self._n_pages = 0
        self._heap.clear()
        if self.record_events:
            self._events.append(CacheCleared())

    def take_events(self) -> list[CacheNote]:
        ev, self._events = self._events, []
        return ev

    def num_pages(self) -> int:
        return self.tree_tokens // self.page_size

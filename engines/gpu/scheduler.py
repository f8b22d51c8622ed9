"""Continuous batching over the paged pool: admission by free pages, chunked prefill mixed into decodes.

Torch-free: it decides which tokens each step computes and which pool pages they use; the engine runs the
model. The prefix cache (``kvroute.engines.prefix_cache.PrefixCache``) owns page sharing, locks, LRU
eviction and
the KV-event notes; this module maps its pages to pool page ids (by the page's event hash, which is unique
per cached prefix) and returns evicted pages to the pool as the cache's removal notes come out.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvroute.engines.gpu.kv_pool import PageAllocator
from kvroute.engines.prefix_cache import CacheCleared, CacheNote, PageNode, PagesRemoved, PrefixCache


@dataclass(eq=False)
class Req:
    """One request's scheduling state.

    Invariants: ``pages[:n_tree]`` are cache pages this request has locked (``locked``); ``pages[n_tree:]``
    are private pages (counted in the cache's ``private_tokens``); ``computed`` tokens have K/V in the pool.
    Pages for the whole prompt plus ``max_new_tokens`` are reserved at admission, so decoding never waits.
    """

    rid: str
    prompt: list[int]
    max_new_tokens: int
    sink: Callable[[Req, list[int], dict[str, Any] | None], None] | None = None
    output: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    locked: tuple[PageNode, ...] = ()
    n_tree: int = 0
    computed: int = 0
    cached_tokens: int = 0
    aborted: bool = False
    finished: bool = False
    arrival: float = 0.0
    room: int | None = None  # PD: the bootstrap room

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.prompt)

    def all_tokens(self) -> list[int]:
        return self.prompt + self.output


@dataclass
class PrefillChunk:
    req: Req
    start: int  # tokens of the prompt already in the pool
    length: int

    @property
    def completes(self) -> bool:
        return self.start + self.length == len(self.req.prompt)


@dataclass
class Step:
    """What one forward computes: decodes (one token each) first, then prefill chunks."""

    decodes: list[Req]
    prefills: list[PrefillChunk]

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(c.length for c in self.prefills)

    def empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    """FIFO admission, chunked prefill (one token budget per step shared with decodes), abort, flush.

    Not thread-safe: the engine calls every method from its step thread.
    """

    def __init__(
        self,
        cache: PrefixCache,
        pool: PageAllocator,
        *,
        max_batch_tokens: int,
        max_running: int,
        context_length: int,
        lend_finished: bool = False,
    ) -> None:
        if cache.page_size != pool.page_size:
            raise ValueError("cache and pool page sizes differ")
        if cache.capacity_tokens != pool.num_pages * pool.page_size:
            raise ValueError("cache capacity must equal the pool's tokens")
        self.cache = cache
        self.pool = pool
        self.ps = pool.page_size
        self.max_batch_tokens = max_batch_tokens
        self.max_running = max_running
        self.context_length = context_length
        self.lend_finished = lend_finished  # PD prefill: a finished request keeps its pages until released
        self.lent: dict[int, Req] = {}  # id(req) -> finished request whose pages a decode side copies
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []  # admitted: prefilling or decoding
        self.page_of: dict[int, int] = {}  # cache page event hash -> pool page id
        self.events: list[CacheNote] = []  # notes not yet published
        self.prompt_tokens_total = 0
        self.cached_tokens_total = 0
        self.generation_tokens_total = 0
        self.requests_total = 0

    # ---- cache <-> pool ------------------------------------------------------------------------
    def _drain(self) -> None:
        for note in self.cache.take_events():
            if isinstance(note, PagesRemoved):
                self.pool.free(self.page_of.pop(h) for h in note.block_hashes)
            elif isinstance(note, CacheCleared):
                self.pool.free(self.page_of.values())
                self.page_of.clear()
            self.events.append(note)

    def take_events(self) -> list[CacheNote]:
        ev, self.events = self.events, []
        return ev

    def _page(self, node: PageNode) -> int:
        assert node.hash_int is not None
        return self.page_of[node.hash_int]

    def _cache_tokens(self, req: Req, tokens: Sequence[int]) -> None:
        """Insert the full pages of ``tokens`` (K/V computed) and take the request's locks onto them."""
        existing = len(self.cache.match_prefix(tokens, touch=False).nodes)
        path, added = self.cache.insert(tokens)
        for i in range(req.n_tree, len(path)):
            node = path[i]
            assert node.hash_int is not None
            if i < existing:  # someone cached this page meanwhile: drop our copy, share theirs
                self.pool.free([req.pages[i]])
                self.cache.free(self.ps)
                req.pages[i] = self._page(node)
            else:
                self.page_of[node.hash_int] = req.pages[i]
        if added:
            self.cache.free(added)
        self.cache.lock(path[req.n_tree :])
        req.locked = tuple(path)
        req.n_tree = len(path)
        self._drain()

    def _release(self, req: Req) -> None:
        if req.locked:
            self.cache.unlock(req.locked)
        private = req.pages[req.n_tree :]
        if private:
            self.pool.free(private)
            self.cache.free(len(private) * self.ps)
        req.pages = []
        req.locked = ()
        req.n_tree = 0

    # ---- requests ---------------------------------------------------------------------------
    def add(self, req: Req) -> None:
        if not req.prompt:
            raise ValueError("empty prompt")
        need = len(req.prompt) + req.max_new_tokens
        if need > self.context_length or -(-need // self.ps) > self.pool.num_pages:
            raise ValueError(f"prompt + max_new_tokens = {need} tokens exceeds the engine's capacity")
        self.waiting.append(req)
        self.requests_total += 1

    def abort(self, rid: str | None = None, abort_all: bool = False) -> list[Req]:
        """Mark matching requests aborted; they leave at the next ``schedule``. Returns them."""
        hit = [
            r
            for r in (*self.waiting, *self.running)
            if not r.finished and not r.aborted and (abort_all or r.rid == rid)
        ]
        for r in hit:
            r.aborted = True
        return hit

    def _try_admit(self, req: Req) -> bool:
        prompt = req.prompt
        match = self.cache.match_prefix(prompt[:-1])  # keep >= 1 token to compute: it yields the logits
        nodes = match.nodes
        self.cache.lock(nodes)
        total_pages = -(-(len(prompt) + req.max_new_tokens) // self.ps)
        n_priv = total_pages - len(nodes)
        if not self.cache.alloc(n_priv * self.ps):
            self.cache.unlock(nodes)
            return False
        self._drain()  # evictions return their pool pages before we take ours
        req.pages = [self._page(n) for n in nodes] + self.pool.alloc(n_priv)
        req.locked = nodes
        req.n_tree = len(nodes)
        req.computed = match.cached_tokens
        req.cached_tokens = match.cached_tokens
        self.prompt_tokens_total += len(prompt)
        self.cached_tokens_total += match.cached_tokens
        return True

    # ---- stepping ---------------------------------------------------------------------------
    def schedule(self) -> tuple[Step, list[Req]]:
        """The next step, and the requests that left because they were aborted."""
        gone = [r for r in (*self.waiting, *self.running) if r.aborted]
        if gone:
            self.waiting = deque(r for r in self.waiting if not r.aborted)
            self.running = [r for r in self.running if not r.aborted]
            for r in gone:
                self._release(r)
                r.finished = True
        decodes = [r for r in self.running if not r.prefilling]
        budget = self.max_batch_tokens - len(decodes)
        prefills: list[PrefillChunk] = []
        for r in self.running:
            if r.prefilling and budget > 0:
                n = min(len(r.prompt) - r.computed, budget)
                prefills.append(PrefillChunk(r, r.computed, n))
                budget -= n
        while budget > 0 and self.waiting and (not self.max_running or len(self.running) < self.max_running):
            r = self.waiting[0]
            if not self._try_admit(r):
                break
            self.waiting.popleft()
            self.running.append(r)
            n = min(len(r.prompt) - r.computed, budget)
            prefills.append(PrefillChunk(r, r.computed, n))
            budget -= n
        return Step(decodes, prefills), gone

    def finish_step(self, step: Step, sampled: Sequence[int]) -> list[tuple[Req, int | None, bool]]:
        """Apply a step's results. ``sampled``: one token per decode, then one per completing prefill.

        Returns (request, new token or None, finished) for every request the step touched.
        """
        out: list[tuple[Req, int | None, bool]] = []
        it = iter(sampled)
        for r in step.decodes:
            r.computed += 1
            out.append(self._emit(r, next(it)))
        for c in step.prefills:
            r = c.req
            r.computed = c.start + c.length
            if c.completes:
                self._cache_tokens(r, r.prompt)
                out.append(self._emit(r, next(it)))
            else:
                out.append((r, None, False))
        return out

    def _emit(self, r: Req, tok: int) -> tuple[Req, int | None, bool]:
        r.output.append(tok)
        self.generation_tokens_total += 1
        if len(r.output) >= r.max_new_tokens:
            self._cache_tokens(r, r.all_tokens()[:-1])  # the last token's K/V was never computed
            if self.lend_finished:
                self.lent[id(r)] = r  # pages and locks stay until `release_lent`
            else:
                self._release(r)
            r.finished = True
            self.running.remove(r)
            return r, tok, True
        return r, tok, False

    # ---- PD disaggregation ----------------------------------------------------------------------
    def prompt_pages(self, r: Req) -> list[int]:
        """Pool pages holding the prompt's K/V (the last one may be partly filled)."""
        return r.pages[: -(-len(r.prompt) // self.ps)]

    def release_lent(self, r: Req) -> bool:
        """The decode side copied a lent request's pages: unlock them (they stay cached) and free the rest."""
        if self.lent.pop(id(r), None) is None:
            return False
        self._release(r)
        return True

    def admit_transferred(self, r: Req) -> bool:
        """PD decode: reserve private pages for a request whose prompt K/V arrives by transfer.

        False when the pool (after evicting unlocked cache pages) or the running limit cannot take it now.
        """
        if self.max_running and len(self.running) >= self.max_running:
            return False
        total_pages = -(-(len(r.prompt) + r.max_new_tokens) // self.ps)
        if not self.cache.alloc(total_pages * self.ps):
            return False
        self._drain()
        r.pages = self.pool.alloc(total_pages)
        r.locked = ()
        r.n_tree = 0
        r.computed = 0
        self.prompt_tokens_total += len(r.prompt)
        self.cached_tokens_total += r.cached_tokens
        return True

    def start_decoding(self, r: Req, first_token: int) -> tuple[Req, int | None, bool]:
        """The transferred prompt K/V is in ``r.pages``: cache the prompt, emit the prefill's first token."""
        r.computed = len(r.prompt)
        self._cache_tokens(r, r.prompt)
        self.running.append(r)
        return self._emit(r, first_token)

    def drop_transferred(self, r: Req) -> None:
        """Give back the pages of an admitted transfer that failed before it started decoding."""
        self._release(r)
        r.finished = True

    def flush(self) -> bool:
        """Drop every cached page; refused (False) while requests wait or run, as SGLang does."""
        if self.waiting or self.running or self.lent:
            return False
        self.cache.reset()
        self._drain()
        return True

    # ---- introspection ----------------------------------------------------------------------
    def used_tokens(self) -> int:
        return self.cache.used_tokens

    def check_invariants(self) -> None:
        """Pool and cache agree page for page (tests call this after every step)."""
        private = sum(len(r.pages) - r.n_tree for r in (*self.running, *self.lent.values()))
        assert self.cache.private_tokens == private * self.ps, (self.cache.private_tokens, private)
        tree = len(self.page_of)
        assert self.cache.tree_tokens == tree * self.ps, (self.cache.tree_tokens, tree)
        assert self.pool.free_pages == self.pool.num_pages - private - len(self.page_of)

"""Per-worker load as the router counts it, by request tickets, plus the prompts each worker has in flight.

A request's life: `on_routed` (in flight, its uncached prompt is pending prefill) -> `on_first_token`
(the prompt is prefilled: pending prefill becomes active KV blocks) -> `on_tokens` (active blocks grow
with the output) -> `on_finished` (everything the ticket added is taken back; idempotent, so it is also
the right call for aborts, errors and client disconnects, typically from a `finally`).

Invariants
- Every `WorkerLoad` counter stays >= 0: a ticket subtracts exactly what it added, clamped at 0.
- A ticket adds to the `WorkerLoad` object of the worker it was routed to; if that worker is removed and
  re-added (a new `Worker`), releasing an old ticket never touches the new worker's counters.
- Engine polls (`update_engine_load`) never change the router's own counters (they would be released
  twice); they are stored beside them and read as a floor by the policies (`policies.scoring`).
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvroute.cache_index.hashing import BlockHash
from kvroute.router.types import Worker, WorkerLoad


class TicketState(enum.Enum):
    ROUTED = "routed"  # sent, no first token yet: its uncached prompt is pending prefill
    RUNNING = "running"  # first token seen: its KV blocks are active
    FINISHED = "finished"  # released (finished, aborted or failed)


@dataclass(eq=False)
class Ticket:
    """One routed request's contribution to its worker's load; the handle the caller reports progress on."""

    id: int
    url: str
    prompt_tokens: int
    uncached_tokens: int
    block_size: int
    block_hashes: tuple[BlockHash, ...] = ()
    cached_blocks_predicted: int = 0  # what routing believed the worker held (for accuracy metrics)
    priority: int = 0  # the request's class priority (router/admission.py), higher first
    queue_wait_s: float = 0.0  # seconds it waited in the admission queue before routing (0: not queued)
    state: TicketState = TicketState.ROUTED
    output_tokens: int = 0
    # What this ticket has added to `_load` (subtracted exactly on release).
    _load: WorkerLoad = field(default_factory=WorkerLoad, repr=False)
    _pending_added: int = field(default=0, repr=False)
    _active_added: int = field(default=0, repr=False)
    _inflight_indexed: bool = field(default=False, repr=False)
    _first_token_at: float | None = field(default=None, repr=False)
    _routed_at: float = field(default=0.0, repr=False)

    @property
    def finished(self) -> bool:
        return self.state is TicketState.FINISHED


def _take_pending_by_priority(ticket: Ticket) -> None:
    by_prio = ticket._load.pending_prefill_by_priority
    left = by_prio.get(ticket.priority, 0) - ticket._pending_added
    if left > 0:
        by_prio[ticket.priority] = left
    else:
        by_prio.pop(ticket.priority, None)


RECENT_S = 1.0
"""How far back `InflightIndex.holding_before` can tell when a prompt was added (longer than a step)."""
MIN_STREAM_STEP_S = 2e-4
"""Time per output token below which a finished request was not streamed (its tokens came at once)."""
STEP_EWMA = 0.2
PREFILL_DECAY = 0.8
"""Weight kept by the older samples of a worker's prefill speed at each new one (decayed sums)."""
"""Weight of the newest stream in a worker's step-time estimate."""


def _blocks(tokens: int, block_size: int) -> int:
    """KV pages needed for `tokens` tokens (a partial page occupies a whole page)."""
    return -(-tokens // block_size)


_Held = tuple[float, str, Sequence[BlockHash]]  # (discard at, worker, prompt blocks)


class InflightIndex:
    """Which worker has which prompt blocks in flight: the blocks the event-fed index cannot know yet.

    Why: in a burst of requests sharing a prefix, every request arrives before the first one has been
    prefilled, so no `BlockStored` event exists yet and an event-only router would scatter them.
    A prompt routed to `w` is counted as held by `w` for as long as its request is in flight: until the
    prefill it is queued there (followers will hit it once it is done), and from then on SGLang holds it
    locked in its radix cache (a running request's prefix cannot be evicted). So this prediction is never
    stale and needs no TTL; it ends with the ticket.

    Layout: per worker, a Counter of its in-flight blocks (refcounted: prompts on one worker share
    blocks). Because hashes are chained, a worker's set is prefix-closed (holding block i of a prompt
    means holding blocks 0..i-1 of it), so `match` binary-searches each worker's depth: O(workers
    holding the first block x log(prompt blocks)) lookups; `add` is one C-level Counter update.

    Other router replicas' prompts (`add_for`, router/shared/inflight.py) are held for a fixed time
    instead: this replica never sees those requests finish. They share the refcounts, and expire in
    arrival order (one TTL for all: the queue stays sorted), checked at `match` and `add_for`.

    A prompt whose request finished after its prefill is held `finished_grace_s` longer (`retain`): its
    blocks are in the engine's cache, but the `BlockStored` event may not have reached the index yet, and
    a repeat of the prompt arriving in that window would otherwise look like a miss everywhere.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        max_expiring: int = 200_000,
        finished_grace_s: float = 2.0,
    ) -> None:
        self._per_worker: dict[str, Counter[BlockHash]] = {}
        self._clock = clock
        self._expiring: deque[tuple[float, str, Sequence[BlockHash]]] = deque()
        self._max_expiring = max_expiring  # bound on remote prompts held (oldest expire early)
        self._retained: deque[tuple[float, str, Sequence[BlockHash]]] = deque()
        self._grace_s = finished_grace_s
        # Per worker, the prompts added in the last RECENT_S seconds with their time: whether a prefix in
        # flight there is held by a prompt old enough to be in a running prefill step (`holding_before`).
        self._recent: dict[str, deque[tuple[float, Sequence[BlockHash]]]] = {}

    def add_for(self, url: str, hashes: Sequence[BlockHash], ttl_s: float) -> None:
        """Count `hashes` as in flight on `url` for `ttl_s` seconds (a prompt another replica routed).
        `hashes` is kept as given (not copied): the caller must not change it."""
        if not hashes:
            return
        self._hold(self._expiring, url, hashes, ttl_s)
        self.add(url, hashes)

    def retain(self, url: str, hashes: Sequence[BlockHash]) -> None:
        """A finished request's prompt, already counted by `add`: keep it for the grace period, then
        discard it (one grace for all: the queue stays sorted). No grace: discard now."""
        if self._grace_s <= 0 or not hashes:
            self.discard(url, hashes)
        else:
            self._hold(self._retained, url, hashes, self._grace_s)

    def _hold(
        self,
        queue: deque[tuple[float, str, Sequence[BlockHash]]],
        url: str,
        hashes: Sequence[BlockHash],
        s: float,
    ) -> None:
        """Queue counted blocks for discarding `s` seconds from now; the oldest go early past the bound."""
        now = self._clock()
        self._expire(now)
        if len(queue) >= self._max_expiring:
            _, old_url, old = queue.popleft()
            self.discard(old_url, old)
        queue.append((now + s, url, hashes))

    def _expire(self, now: float) -> None:
        for exp in (self._expiring, self._retained):
            while exp and exp[0][0] <= now:
                _, url, hashes = exp.popleft()
                self.discard(url, hashes)

    def add(self, url: str, hashes: Sequence[BlockHash]) -> None:
        cnt = self._per_worker.get(url)
        if cnt is None:
            cnt = self._per_worker[url] = Counter()
        cnt.update(hashes)
        now = self._clock()
        recent = self._recent.get(url)
        if recent is None:
            recent = self._recent[url] = deque()
        while recent and recent[0][0] < now - RECENT_S:
            recent.popleft()
        recent.append((now, hashes))

    def discard(self, url: str, hashes: Iterable[BlockHash]) -> None:
        cnt = self._per_worker.get(url)
        if cnt is None:
            return
        get, pop = cnt.get, cnt.pop  # dict's own C methods (Counter's __delitem__ is Python)
        for h in hashes:
            c = get(h, 0)
            if c > 1:
                cnt[h] = c - 1
            elif c == 1:
                pop(h)
        if not cnt:
            del self._per_worker[url]

    def remove_worker(self, url: str) -> None:
        self._per_worker.pop(url, None)
        self._recent.pop(url, None)
        if any(e[1] == url for e in self._expiring):  # a re-added worker must not lose counts to these
            self._expiring = deque(e for e in self._expiring if e[1] != url)
        if any(e[1] == url for e in self._retained):
            self._retained = deque(e for e in self._retained if e[1] != url)

    def match(self, hashes: Sequence[BlockHash]) -> dict[str, int]:
        """{worker: leading blocks of `hashes` in flight there}; workers with none are absent."""
        out: dict[str, int] = {}
        if not hashes:
            return out
        if (self._expiring and self._expiring[0][0] <= self._clock()) or (
            self._retained and self._retained[0][0] <= self._clock()
        ):
            self._expire(self._clock())
        first, n = hashes[0], len(hashes)
        for url, cnt in self._per_worker.items():
            if first not in cnt:
                continue
            lo, hi = 1, n  # hashes[lo - 1] is held; find the largest such lo
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if hashes[mid - 1] in cnt:
                    lo = mid
                else:
                    hi = mid - 1
            out[url] = lo
        return out

    def holding(self, url: str, block: BlockHash) -> int:
        """Prompts in flight on `url` that contain `block` (with its whole prefix: hashes are chained)."""
        cnt = self._per_worker.get(url)
        return cnt.get(block, 0) if cnt is not None else 0

    def holding_before(self, url: str, block: BlockHash, depth: int, since: float) -> int:
        """Of `holding(url, block)`, the prompts added before `since` (`block` is their `depth`-th block):
        those an engine has admitted to a prefill step if `since` is one step ago. At most RECENT_S back."""
        total = self.holding(url, block)
        if not total:
            return 0
        late = sum(
            1
            for at, hs in self._recent.get(url, ())
            if at >= since and len(hs) >= depth and hs[depth - 1] == block
        )
        return max(0, total - late)

    def __len__(self) -> int:
        """Distinct (worker, block) pairs in flight now (expired holds dropped first)."""
        self._expire(self._clock())
        return sum(len(c) for c in self._per_worker.values())


class LoadTracker:
    """Counts in-flight requests, pending prefill tokens and active KV blocks per worker, by ticket.

    `workers` is the live registry (url -> Worker), read at `on_routed` only. Single-threaded (asyncio).
    """

    def __init__(self, workers: Mapping[str, Worker], clock: Callable[[], float] = time.monotonic) -> None:
        self._workers = workers
        self._clock = clock
        self._ids = itertools.count(1)
        self._tickets: dict[str, dict[int, Ticket]] = {}  # url -> open tickets
        # url -> its tickets waiting for a first token, in routing order; the first with pending prefill
        # is the queue's head (finished ones are dropped lazily from the left: O(1) amortised)
        self._queued: dict[str, deque[Ticket]] = {}
        self.inflight = InflightIndex(clock)

    def on_routed(
        self,
        url: str,
        prompt_tokens: int,
        uncached_tokens: int,
        block_size: int,
        *,
        block_hashes: Sequence[BlockHash] = (),
        cached_blocks_predicted: int = 0,
        priority: int = 0,
    ) -> Ticket:
        """Reserve load on `url` for one request; returns the ticket to report progress and release on."""
        worker = self._workers.get(url)
        if worker is None:
            raise KeyError(f"unknown worker {url!r}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        prompt_tokens = max(0, int(prompt_tokens))
        uncached = min(prompt_tokens, max(0, int(uncached_tokens)))
        t = Ticket(
            id=next(self._ids),
            url=url,
            prompt_tokens=prompt_tokens,
            uncached_tokens=uncached,
            block_size=block_size,
            block_hashes=tuple(block_hashes),
            cached_blocks_predicted=cached_blocks_predicted,
            priority=priority,
            _load=worker.load,
        )
        now = t._routed_at = self._clock()
        if uncached:
            queue = self._queued.setdefault(url, deque())
            if t._load.pending_prefill_tokens == 0:  # an empty queue: it starts draining now
                queue.clear()
                t._load.head_tokens, t._load.head_started_at = uncached, now
            queue.append(t)
        t._load.in_flight += 1
        t._load.pending_prefill_tokens += uncached
        t._load.last_routed_at = now
        by_prio = t._load.pending_prefill_by_priority
        by_prio[priority] = by_prio.get(priority, 0) + uncached
        t._pending_added = uncached
        if t.block_hashes:
            self.inflight.add(url, t.block_hashes)
            t._inflight_indexed = True
        self._tickets.setdefault(url, {})[t.id] = t
        return t

    def on_first_token(self, ticket: Ticket) -> None:
        """Prefill done: the pending prefill becomes the prompt's active KV blocks. No-op unless ROUTED."""
        if ticket.state is not TicketState.ROUTED:
            return
        load = ticket._load
        now = ticket._first_token_at = self._clock()
        head = self._is_head(ticket)
        if head and ticket._pending_added >= ticket.block_size:
            took = now - load.head_started_at
            if took > 0:  # the head's prefill: a speed sample, weighted by its tokens (decayed sums)
                load.prefill_sample_tokens = (
                    PREFILL_DECAY * load.prefill_sample_tokens + ticket._pending_added
                )
                load.prefill_sample_s = PREFILL_DECAY * load.prefill_sample_s + took
                load.prefill_tokens_per_s = load.prefill_sample_tokens / load.prefill_sample_s
        load.pending_prefill_tokens = max(0, load.pending_prefill_tokens - ticket._pending_added)
        _take_pending_by_priority(ticket)
        ticket._pending_added = 0
        ticket.state = TicketState.RUNNING
        if head:
            self._next_head(ticket, now)
        self._set_active(ticket, _blocks(ticket.prompt_tokens + ticket.output_tokens, ticket.block_size))

    def on_tokens(self, ticket: Ticket, n: int) -> None:
        """`n` more output tokens: active blocks grow when the context crosses a page boundary.

        Tokens reported before the first token imply it (a non-streaming response reports them at once).
        """
        if ticket.finished or n <= 0:
            return
        if ticket.state is TicketState.ROUTED:
            self.on_first_token(ticket)
        ticket.output_tokens += n
        self._set_active(ticket, _blocks(ticket.prompt_tokens + ticket.output_tokens, ticket.block_size))

    def on_finished(self, ticket: Ticket, output_tokens: int | None = None) -> None:
        """Release everything the ticket added. Idempotent; right for completions, aborts and errors.
        `output_tokens` (when the caller counted them and not `on_tokens`) times the worker's step."""
        if ticket.finished:
            return
        load = ticket._load
        prefilled = ticket.state is TicketState.RUNNING
        was_head = self._is_head(ticket)
        n = max(ticket.output_tokens, output_tokens or 0)
        if prefilled and ticket._first_token_at is not None and n > 1:
            step = (self._clock() - ticket._first_token_at) / (n - 1)
            if step >= MIN_STREAM_STEP_S:  # a non-streamed answer has all its tokens at once: no step
                load.step_s = step if load.step_s is None else load.step_s + STEP_EWMA * (step - load.step_s)
        load.in_flight = max(0, load.in_flight - 1)
        load.pending_prefill_tokens = max(0, load.pending_prefill_tokens - ticket._pending_added)
        _take_pending_by_priority(ticket)
        load.active_blocks = max(0, load.active_blocks - ticket._active_added)
        ticket._pending_added = ticket._active_added = 0
        ticket.state = TicketState.FINISHED
        if was_head:
            self._next_head(ticket, self._clock())
        if ticket._inflight_indexed:
            if prefilled:  # in the engine's cache now; its BlockStored event may still be on the way
                self.inflight.retain(ticket.url, ticket.block_hashes)
            else:
                self.inflight.discard(ticket.url, ticket.block_hashes)
            ticket._inflight_indexed = False
        open_ = self._tickets.get(ticket.url)
        if open_ is not None:
            open_.pop(ticket.id, None)
            if not open_:
                del self._tickets[ticket.url]

    def _is_head(self, ticket: Ticket) -> bool:
        """Whether `ticket` is at the head of its worker's prefill queue (oldest with pending prefill)."""
        if ticket._pending_added <= 0:
            return False
        queue = self._queued.get(ticket.url)
        while queue and queue[0]._pending_added <= 0:
            queue.popleft()
        return queue is not None and bool(queue) and queue[0] is ticket

    def _next_head(self, done: Ticket, now: float) -> None:
        """`done`, the head, left its worker's prefill queue: the next waiting ticket starts now."""
        queue = self._queued[done.url]
        queue.popleft()
        while queue and queue[0]._pending_added <= 0:
            queue.popleft()
        load = done._load
        if queue:
            load.head_tokens, load.head_started_at = queue[0]._pending_added, now
        else:
            load.head_tokens = 0
            del self._queued[done.url]

    def update_engine_load(
        self, url: str, running: int | None, queued: int | None, token_usage: float | None
    ) -> None:
        """Store the engine's own view (`/get_load`); policies read it as a floor, see module docstring."""
        worker = self._workers.get(url)
        if worker is None:
            return
        load = worker.load
        load.engine_running = None if running is None else max(0, int(running))
        load.engine_queued = None if queued is None else max(0, int(queued))
        load.engine_token_usage = None if token_usage is None else min(1.0, max(0.0, float(token_usage)))

    def remove_worker(self, url: str) -> None:
        """Forget a removed worker's in-flight prompts; its open tickets still release (into the old load)."""
        for t in self._tickets.pop(url, {}).values():
            t._inflight_indexed = False
        self._queued.pop(url, None)
        self.inflight.remove_worker(url)

    def open_tickets(self, url: str | None = None) -> int:
        if url is not None:
            return len(self._tickets.get(url, {}))
        return sum(len(v) for v in self._tickets.values())

    def _set_active(self, ticket: Ticket, blocks: int) -> None:
        delta = blocks - ticket._active_added
        if delta == 0:
            return
        load = ticket._load
        load.active_blocks = max(0, load.active_blocks + delta)
        ticket._active_added = blocks


@dataclass
class WorkerStats:
    """Counters per worker, for metrics and for spotting workers routed to blind."""

    routed: int = 0
    finished: int = 0
    prefilled: int = 0  # finished requests that reached a first token with >= 1 full prompt block
    reported_prompt_tokens: int = 0  # prompt tokens of requests whose engine reported cached_tokens
    cached_tokens: int = 0  # engine-reported (meta_info.cached_tokens): the ground truth
    predicted_cached_tokens: int = 0  # what routing expected, for the same requests
    output_tokens: int = 0
    event_batches: int = 0
    last_event_at: float | None = None  # router clock (monotonic seconds)
    resets: int = 0  # index of this worker forgotten (event gap without replay, or by hand)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["cached_token_ratio"] = self.cached_token_ratio
        return d

    @property
    def cached_token_ratio(self) -> float | None:
        if self.reported_prompt_tokens == 0:
            return None
        return self.cached_tokens / self.reported_prompt_tokens

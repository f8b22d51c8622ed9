"""`Router`: the routing brain as a library (no HTTP): workers, tokenize-once, policies, load, KV events.

The HTTP app is a thin layer over it; used in-process, it makes the same decisions:

    router = Router(block_size=16, policy="kv_aware")
    router.add_worker(Worker("http://w0:30000", state=WorkerState.HEALTHY))
    req = router.routing_request(text="...")          # tokenized and hashed once
    decision = router.select(req)                      # read-only; decision.ranked for retries
    ticket = router.on_routed(decision, req)           # reserve load (then release in `finally`)
    router.on_first_token(ticket); router.on_finished(ticket, cached_tokens=...)

Single-threaded: call it from one thread (the asyncio loop). Event batches come from
`apply_kv_events` (fed by you) or from `subscribe` (a `KvEventSubscriber` feeding it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from array import array
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from kvroute.cache_index.apply import KvEventApplier, page_size_problem
from kvroute.cache_index.events import KvEventBatch
from kvroute.cache_index.hashing import (
    BlockHash,
    ByteTokenizer,
    Tokenizer,
    hash_blocks,
    hash_text_blocks,
    namespace_seed,
    render_plain_chat,
)
from kvroute.cache_index.radix import RadixIndex
from kvroute.engines.kv_events import KvEventSubscriber
from kvroute.router.dp import RankFoldedIndex, RankLoad, choose_rank, owner, rank_key
from kvroute.router.load import LoadTracker, Ticket, TicketState, WorkerStats
from kvroute.router.policies import POLICIES, make_policy
from kvroute.router.policies.base import NoWorkerAvailable, Policy, PolicyContext
from kvroute.router.types import Decision, RoutingRequest, Worker, WorkerRole, WorkerScore

__all__ = ["NoWorkerAvailable", "Router", "WorkerStats"]


class Router:
    """Routing decisions and their bookkeeping for one fleet (one model namespace, one block size).

    Invariants: a worker's index entries, in-flight prompts and policy state go with `remove_worker`;
    `select` and `explain` never change load or indexes; load counters never go negative (tickets).
    """

    def __init__(
        self,
        block_size: int = 16,
        policy: str = "kv_aware",
        policy_params: dict[str, Any] | None = None,
        tokenizer: Tokenizer | None = None,
        model_seed: str = "",
        text_chunk_bytes: int = 64,
        text_fallback: bool = False,
        clock: Callable[[], float] = time.monotonic,
        max_prompt_blocks: int = 8192,
    ) -> None:
        """`tokenizer` None: the byte tokenizer (what the simulated engine uses). `text_fallback`: hash
        text/messages as chunks of `text_chunk_bytes` UTF-8 bytes instead of tokenizing (fleets with no
        tokenizer: approximate, self-consistent for cache_aware, never matching engine events).
        `model_seed`: namespace of the block hashes (the model name), equal to the one events are hashed
        with, so prompts and events agree. `max_prompt_blocks`: only a prompt's first blocks are hashed
        and tracked (8,192 x 16 = 128 K tokens): the prefix is what matches, and the per-request work on
        the event loop (load tracking, index lookups) must stay small for a 30 MB prompt; 0 = no cap."""
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if text_chunk_bytes <= 0:
            raise ValueError(f"text_chunk_bytes must be positive, got {text_chunk_bytes}")
        self.block_size = block_size
        self.tokenizer: Tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        self.text_fallback = text_fallback
        self.text_chunk_bytes = text_chunk_bytes
        self.max_prompt_blocks = max_prompt_blocks
        self.seed = namespace_seed(model_seed)
        self.clock = clock
        self._workers: dict[str, Worker] = {}
        self._stats: dict[str, WorkerStats] = {}
        self.index = RadixIndex()
        self.ranked = RankFoldedIndex(self.index)  # what policies read: data-parallel ranks folded in
        self.rank_load = RankLoad()
        self._applier = KvEventApplier(self.index, block_size=block_size, seed=self.seed)
        self.load = LoadTracker(self._workers, clock)
        self._context = PolicyContext(
            kv_index=self.ranked,
            inflight=self.load.inflight,
            clock=clock,
            block_counts=self.ranked.block_count,
        )
        self._policy_name = policy
        self._policy: Policy = make_policy(policy, policy_params, self._context)
        self._subscriber: KvEventSubscriber | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.dropped_batches = 0  # batches for workers not (or no longer) registered
        # Called after every send, retries included (router/shared shares cache_aware records through it).
        self.routed_hooks: list[Callable[[RoutingRequest, Worker], None]] = []
        # Called when a ticket frees capacity (first token, finish): the admission queue's wake-up.
        self.released_hooks: list[Callable[[Ticket], None]] = []
        # Called when a worker becomes routable (registered, healthy again): queued requests go to it.
        self.ready_hooks: list[Callable[[Worker], None]] = []
        self.admission: Any = None  # router.admission.Admission once `enable_admission` ran

    # --- workers -------------------------------------------------------------------------------

    def add_worker(self, worker: Worker) -> Worker:
        """Register `worker` (its state decides whether it is routable). ValueError on a duplicate url
        or a page size that does not divide the block size (a silent mismatch breaks KV routing)."""
        if worker.url in self._workers:
            raise ValueError(f"worker {worker.url} is already registered")
        err = self.page_size_error(worker)
        if err:
            raise ValueError(err)
        self._workers[worker.url] = worker
        self._stats[worker.url] = WorkerStats()
        if worker.routable:
            self.worker_ready(worker)
        return worker

    def worker_ready(self, worker: Worker) -> None:
        """`worker` can take requests now (the registry calls it when a worker turns healthy)."""
        for hook in self.ready_hooks:
            hook(worker)

    def page_size_error(self, worker: Worker) -> str | None:
        """Why `worker` cannot be routed with this block size, or None (also for an unknown page size).
        Router blocks are whole runs of engine pages: any page size dividing the block size fits."""
        if worker.page_size is None:
            return None
        problem = page_size_problem(worker.page_size, self.block_size)
        return f"worker {worker.url}: {problem}" if problem else None

    def remove_worker(self, url: str) -> Worker | None:
        """Forget `url`: its index entries, in-flight prompts, policy state and event subscription."""
        worker = self._workers.pop(url, None)
        if worker is None:
            return None
        self._stats.pop(url, None)
        keys = self._keys(url)
        for key in keys:
            self.index.remove_worker(key)
            self._applier.remove_worker(key)
        self.ranked.ranks.pop(url, None)
        self.rank_load.forget(url)
        self.load.remove_worker(url)
        self._policy.on_worker_removed(url)
        if self._subscriber is not None:
            # remove_worker is sync; the socket closes on the loop (awaited by `close`). Batches that
            # arrive before it does are dropped by `apply_kv_events` (unknown worker).
            for key in (k for k in keys if k in self._subscriber.workers):
                with contextlib.suppress(RuntimeError):  # no running loop: `close` removes it
                    task = asyncio.get_running_loop().create_task(self._subscriber.remove(key))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        return worker

    def _keys(self, url: str) -> list[str]:
        """`url`'s index/stream keys: its own and, for a data-parallel worker, one per rank."""
        return [url, *(rank_key(url, r) for r in range(self.ranked.ranks.get(url, 0)))]

    def get_worker(self, url: str) -> Worker | None:
        return self._workers.get(url)

    def workers(self, role: WorkerRole | None = None) -> list[Worker]:
        return [w for w in self._workers.values() if role is None or w.role is role]

    # --- requests ------------------------------------------------------------------------------

    def _capped(self, ids: Sequence[int]) -> Sequence[int]:
        n = self.max_prompt_blocks * self.block_size
        return ids[:n] if n and len(ids) > n else ids

    def routing_request(
        self,
        *,
        input_ids: Sequence[int] | None = None,
        text: str | None = None,
        messages: Sequence[dict[str, Any]] | None = None,
        session_key: str | None = None,
        model: str | None = None,
        max_tokens: int | None = None,
        with_blocks: bool | None = None,
    ) -> RoutingRequest:
        """Tokenize once (input_ids, else the tokenizer, else text chunks) and hash the full blocks.

        Hashing is skipped (empty `block_hashes`) when the policy says it reads no blocks (its
        `needs_blocks` attribute, default True); `with_blocks` overrides that (PD's own policies).
        ValueError, with a message fit for a 400, for an empty prompt or ill-typed fields.
        """
        if with_blocks is None:
            with_blocks = bool(getattr(self._policy, "needs_blocks", True))
        if session_key is not None and not isinstance(session_key, str):
            raise ValueError("session key must be a string")
        if model is not None and not isinstance(model, str):
            raise ValueError("model must be a string")
        if max_tokens is not None and (
            not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0
        ):
            raise ValueError("max_tokens must be a non-negative integer")
        hashes: list[BlockHash]
        if input_ids is not None:
            ids = _check_ids(input_ids)
            hashes = hash_blocks(self._capped(ids), self.block_size, self.seed) if with_blocks else []
            n_tokens = len(ids)
        else:
            if text is not None:
                if not isinstance(text, str):
                    raise ValueError("text must be a string")
            elif messages is not None:
                if not isinstance(messages, (list, tuple)) or not messages:
                    raise ValueError("messages must be a non-empty list")
            else:
                raise ValueError("the request has no prompt (input_ids, text or messages)")
            if self.text_fallback:
                text = text if text is not None else render_plain_chat(messages or ())
                capped = (
                    text[: self.max_prompt_blocks * self.text_chunk_bytes] if self.max_prompt_blocks else text
                )
                hashes = hash_text_blocks(capped, self.text_chunk_bytes, self.seed) if with_blocks else []
                # Blocks count as block_size tokens each so that loads stay in one unit.
                n_tokens = len(text.encode("utf-8")) * self.block_size // self.text_chunk_bytes
                n_tokens = max(n_tokens, 1 if text else 0)
            else:
                tok = self.tokenizer
                toks = tok.encode(text) if text is not None else tok.apply_chat_template(messages or ())
                hashes = hash_blocks(self._capped(toks), self.block_size, self.seed) if with_blocks else []
                n_tokens = len(toks)
        if n_tokens == 0:
            raise ValueError("the prompt is empty")
        return RoutingRequest(
            block_hashes=tuple(hashes),
            prompt_tokens=n_tokens,
            block_size=self.block_size,
            session_key=session_key,
            text=text,
            model=model,
            expected_output_tokens=max_tokens,
        )

    def candidates(
        self, request: RoutingRequest, role: WorkerRole | None = None, exclude: Iterable[str] = ()
    ) -> list[Worker]:
        """Routable workers of `role` (None: regular workers) minus `exclude`. If the request names a
        model that some of them serve, only those (and workers of unknown model) are kept; a model no
        worker serves filters nothing (clients often send placeholder names)."""
        role = role or WorkerRole.REGULAR
        skip = set(exclude)
        cands = [w for w in self._workers.values() if w.role is role and w.routable and w.url not in skip]
        if request.model is not None and any(w.model == request.model for w in cands):
            cands = [w for w in cands if w.model in (request.model, None)]
        return cands

    def select(
        self, request: RoutingRequest, *, role: WorkerRole | None = None, exclude: Iterable[str] = ()
    ) -> Decision:
        """The policy's decision among the candidates; NoWorkerAvailable when there are none."""
        cands = self.candidates(request, role, exclude)
        if not cands:
            r = (role or WorkerRole.REGULAR).value
            raise NoWorkerAvailable(f"no healthy {r} worker available ({len(self._workers)} registered)")
        return self._policy.select(request, cands)

    def explain(self, request: RoutingRequest, role: WorkerRole | None = None) -> list[WorkerScore]:
        """Score every worker of `role`, in any state, as the policy would; sends nothing, changes nothing."""
        role = role or WorkerRole.REGULAR
        ws = [w for w in self._workers.values() if w.role is role]
        return self._policy.explain(request, ws) if ws else []

    # --- request lifecycle -----------------------------------------------------------------------

    def on_routed(
        self,
        decision_or_url: Decision | str,
        request: RoutingRequest,
        cached_blocks: int | None = None,
        priority: int = 0,
    ) -> Ticket:
        """The request is being sent: reserve its load on the worker and let the policy learn.

        Pass the url when retrying down `decision.ranked`. The uncached part of the prompt (its pending
        prefill) comes from `cached_blocks` when given (e.g. a PD decode worker, which prefills
        nothing: pass the prompt's block count), else from the decision, else from the indexes.
        """
        if isinstance(decision_or_url, Decision):
            url, cached = decision_or_url.worker, decision_or_url.cached_blocks
        else:
            url, cached = decision_or_url, 0
        worker = self._workers.get(url)
        if worker is None:
            raise KeyError(f"unknown worker {url!r}")
        if cached_blocks is not None:
            cached = cached_blocks
        elif cached == 0 and request.block_hashes:
            cached = self.overlap(url, request.block_hashes)
        ticket = self.load.on_routed(
            url,
            request.prompt_tokens,
            request.prompt_tokens - cached * self.block_size,
            self.block_size,
            block_hashes=request.block_hashes,
            cached_blocks_predicted=cached,
            priority=priority,
        )
        self._policy.on_routed(request, worker)
        for hook in self.routed_hooks:
            hook(request, worker)
        self._stats[url].routed += 1
        return ticket

    # --- admission (router/admission.py, router/tenants) ------------------------------------------

    def enable_admission(self, tenants: Any = None, config: Any = None) -> Any:
        """Turn admission control on in-process. `tenants`: a `TenantTable` (None: built-in classes
        and the `default` tenant only); `config`: an `AdmissionConfig`. Returns the `Admission`."""
        from kvroute.router.admission import Admission
        from kvroute.router.tenants.table import TenantTable

        if self.admission is not None:
            raise RuntimeError("admission is already enabled")
        self.admission = Admission(self, tenants or TenantTable.from_config({}), config)
        return self.admission

    def admit(self, request: RoutingRequest, tenant: str = "default", sla_class: str | None = None) -> Any:
        """`async with router.admit(req, tenant="chat") as grant:` waits until some worker has room for
        the request (or raises `kvroute.router.tenants.Rejected`, a 429 in HTTP), then route it *before the
        next await*: `ticket = router.on_routed(grant.decision, req, priority=grant.priority)`, and
        release the ticket as usual; the grant's quota is released when the block exits. An unknown
        tenant is `default`; `sla_class` may lower the tenant's class, never raise it."""
        from kvroute.router.tenants.identity import Identity

        if self.admission is None:
            raise RuntimeError("admission is off: call enable_admission() first")
        table = self.admission.table
        t = table.tenants.get(tenant) or table.tenants["default"]
        return self.admission.admit(request, Identity(t, table.effective_class(t, sla_class)))

    def on_first_token(self, ticket: Ticket) -> None:
        self.load.on_first_token(ticket)
        for hook in self.released_hooks:
            hook(ticket)

    def on_tokens(self, ticket: Ticket, n: int) -> None:
        self.load.on_tokens(ticket, n)

    def on_finished(
        self, ticket: Ticket, cached_tokens: int | None = None, output_tokens: int | None = None
    ) -> None:
        """Release the ticket (idempotent: also for aborts) and record the engine's cached_tokens."""
        if ticket.finished:
            return
        reached_first_token = ticket.state is TicketState.RUNNING
        self.load.on_finished(ticket, output_tokens)
        for hook in self.released_hooks:
            hook(ticket)
        st = self._stats.get(ticket.url)
        if st is None:  # worker removed meanwhile
            return
        st.finished += 1
        if reached_first_token and ticket.prompt_tokens >= self.block_size:
            st.prefilled += 1
        if cached_tokens is not None:
            st.reported_prompt_tokens += ticket.prompt_tokens
            st.cached_tokens += min(max(0, cached_tokens), ticket.prompt_tokens)
            st.predicted_cached_tokens += min(
                ticket.cached_blocks_predicted * self.block_size, ticket.prompt_tokens
            )
        st.output_tokens += output_tokens if output_tokens is not None else ticket.output_tokens

    def update_engine_load(
        self, url: str, running: int | None, queued: int | None, token_usage: float | None
    ) -> None:
        self.load.update_engine_load(url, running, queued, token_usage)

    def overlap(self, url: str, block_hashes: Sequence[BlockHash]) -> int:
        """Leading blocks of the prompt believed held by `url` (events, or its in-flight prompts)."""
        return max(
            self.ranked.match(block_hashes).get(url, 0), self.load.inflight.match(block_hashes).get(url, 0)
        )

    def dp_rank_for(self, url: str, block_hashes: Sequence[BlockHash]) -> int | None:
        """The data-parallel rank of `url` to send a prompt to (`kvroute.router.dp.choose_rank`); None when
        the
        worker has one rank. The caller counts the request in `rank_load` while it runs."""
        w = self._workers.get(url)
        if w is None or w.dp_size <= 1:
            return None
        overlaps = self.ranked.rank_overlaps(url, block_hashes)
        return choose_rank(overlaps, [self.rank_load.get(url, r) for r in range(w.dp_size)])

    # --- KV events -------------------------------------------------------------------------------

    def apply_kv_events(self, url: str, batch: KvEventBatch) -> None:
        """Apply one decoded batch of `url`'s events to the index (dropped if `url` is unknown). `url` may
        be a rank's key (`kvroute.router.dp.rank_key`): the batch goes to that rank's entries."""
        st = self._stats.get(url) or self._stats.get(owner(url))
        if st is None:
            self.dropped_batches += 1
            return
        self._applier.apply(url, batch)
        st.event_batches += 1
        st.last_event_at = self.clock()

    def reset_worker_index(self, url: str) -> None:
        """Forget what `url` (or one rank's key) holds (after an event gap that could not be replayed)."""
        self._applier.forget(url)
        st = self._stats.get(owner(url))
        if st is not None:
            st.resets += 1

    async def subscribe(
        self,
        url: str,
        endpoint: str,
        replay_endpoint: str | None = None,
        topic: str = "",
        *,
        bind: bool = False,
        rank: int | None = None,
        ranks: int = 0,
    ) -> None:
        """Follow `url`'s KV-event stream (ZeroMQ SUB) into the index; replaces an earlier subscription.
        `bind`: the engine's publisher connects, so the SUB binds `endpoint`. `rank` (of `ranks`): one
        data-parallel rank's stream, indexed under its own key (`kvroute.router.dp`)."""
        if url not in self._workers:
            raise KeyError(f"unknown worker {url!r}")
        if self._subscriber is None:
            self._subscriber = KvEventSubscriber(self.apply_kv_events, self.reset_worker_index)
        key = url
        if rank is not None:
            key = rank_key(url, rank)
            self.ranked.ranks[url] = max(self.ranked.ranks.get(url, 0), ranks, rank + 1)
        await self._subscriber.add(key, endpoint, replay_endpoint=replay_endpoint, topic=topic, bind=bind)

    async def unsubscribe(self, url: str) -> None:
        if self._subscriber is not None:
            for key in self._keys(url):
                await self._subscriber.remove(key)

    async def close(self) -> None:
        """Close every event subscription (call on shutdown)."""
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._subscriber is not None:
            await self._subscriber.close()

    # --- policy and introspection ----------------------------------------------------------------

    def set_policy(self, name: str, params: dict[str, Any] | None = None) -> None:
        """Switch policy; on ValueError the current one stays. Learned policy state starts afresh."""
        self._policy = make_policy(name, params, self._context)
        self._policy_name = name

    @property
    def policy(self) -> Policy:
        return self._policy

    def policy_info(self) -> dict[str, Any]:
        config = getattr(self._policy, "config", None)
        ok = dataclasses.is_dataclass(config) and not isinstance(config, type)
        params = dataclasses.asdict(config) if ok else {}  # type: ignore[arg-type]
        return {"name": self._policy_name, "params": params, "available": sorted(POLICIES)}

    def worker_stats(self, url: str) -> WorkerStats | None:
        return self._stats.get(url)

    def blind_workers(self, min_requests: int = 1) -> list[str]:
        """Workers that prefilled at least `min_requests` requests but never sent one KV event."""
        return [u for u, st in self._stats.items() if st.prefilled >= min_requests and st.event_batches == 0]

    def index_stats(self) -> dict[str, Any]:
        subscribed = set(self._subscriber.workers) if self._subscriber is not None else set()
        per_worker = {}
        for url, st in self._stats.items():
            d = st.as_dict()
            d["blocks"] = self.ranked.block_count(url)
            d["subscribed"] = url in subscribed or rank_key(url, 0) in subscribed
            if url in subscribed and self._subscriber is not None:
                d["stream"] = self._subscriber.stats(url)
            elif self._subscriber is not None and url in self.ranked.ranks:
                streams = [self._subscriber.stats(k) for k in self._keys(url)[1:] if k in subscribed]
                d["stream"] = _sum_streams(streams)
            per_worker[url] = d
        return {
            "block_size": self.block_size,
            "index": self.index.stats(),
            "apply": self._applier.stats.as_dict(),
            "dropped_batches": self.dropped_batches,
            "inflight_blocks": len(self.load.inflight),
            "workers": per_worker,
            "blind_workers": self.blind_workers(),
        }


def _sum_streams(streams: list[dict[str, Any]]) -> dict[str, Any]:
    """A data-parallel worker's ranks as one stream for metrics: counts added, the worst lag."""
    out: dict[str, Any] = {}
    for st in streams:
        for k, v in st.items():
            if k == "lag_s":
                if v is not None:
                    out[k] = max(out.get(k) or 0.0, v)
            elif (
                isinstance(v, int | float)
                and not isinstance(v, bool)
                and k not in ("last_seq", "last_event_time")
            ):
                out[k] = out.get(k, 0) + v
    out["ranks"] = len(streams)
    return out


def _check_ids(input_ids: Any) -> array[int]:
    """Validate token ids in C (one array conversion, reused by hashing): no per-token Python loop."""
    if isinstance(input_ids, (str, bytes)) or not isinstance(input_ids, Sequence):
        raise ValueError("input_ids must be a list of integers")
    if not input_ids:
        raise ValueError("input_ids is empty")
    try:
        return array("I", input_ids)
    except (TypeError, OverflowError) as exc:
        raise ValueError("input_ids must be integers in [0, 2**32)") from exc

"""SimEngine: an `EngineCore` whose tokens come from a timing model of continuous batching on one GPU.

One asyncio task per engine runs SGLang's scheduler shape: admit waiting requests (prefix match,
KV reservation), build a step of prefill chunks (per-step token budget = chunked prefill size) plus
one decode token for every running request, charge the profile's cost for that step on a simulated
clock, then deliver tokens, cache prompts, and publish the step's KV events as one batch.
The clock is mapped to wall time by `time_scale` (0.01 runs 100x faster). See README.md.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sys
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import xxhash

from kvroute.engines.core import (
    BadRequest,
    BootstrapTimeout,
    DropConnection,
    EngineError,
    GenerateRequest,
    KvEventsInfo,
    LoadSnapshot,
    ServerFacts,
    TokenChunk,
)
from kvroute.engines.prefix_cache import PageNode, PrefixCache
from kvroute.engines.sim.faults import FaultConfig
from kvroute.engines.sim.kv_notes import notes_to_events
from kvroute.engines.sim.pd import BootstrapRegistry, PrefilledKv
from kvroute.engines.sim.profiles import GpuProfile, tiny
from kvroute.engines.sim.schedule_policy import SchedulePolicy, SchedulePolicyName

if TYPE_CHECKING:
    from kvroute.engines.kv_publisher import KvEventPublisher

log = logging.getLogger(__name__)

DisaggMode = Literal["null", "prefill", "decode"]


@dataclass
class SimConfig:
    """One simulated engine. Sizes default to the profile's; `None` means 'take the profile's value'."""

    model_path: str = "sim/llama3-8b"
    page_size: int = 16
    kv_capacity_tokens: int | None = None
    max_running_requests: int | None = None
    chunked_prefill_size: int | None = None
    time_scale: float = 1.0
    """Wall seconds per simulated second (0.01: 100x faster than the GPU)."""
    seed: int = 0
    dp_rank: int = 0  # this engine's data-parallel rank (engines.sim.dp: one SimEngine per rank)
    disaggregation_mode: DisaggMode = "null"
    bootstrap_port: int | None = None
    """Prefill mode: the port reported as disaggregation_bootstrap_port (nothing listens on it)."""
    bootstrap_timeout_s: float = 30.0
    """PD decode: simulated seconds to wait for the prefill's KV before failing the request."""
    kv_events: bool = True
    event_endpoint: str = "tcp://127.0.0.1:*"
    replay_endpoint: str | None = "tcp://127.0.0.1:*"
    event_bind: bool | None = None  # None: SGLang's rule (bind for `*`/`::`/ipc, else connect); True: bind
    event_topic: str = ""
    event_form: Literal["array", "map"] = "array"
    incremental_streaming_output: bool = False
    schedule_policy: SchedulePolicyName = "fcfs"
    """SGLang's `--schedule-policy` (its default: fcfs); lpm sorts the queue by cached prefix."""
    enable_priority_scheduling: bool = False
    """SGLang's `--enable-priority-scheduling`: the waiting queue is admitted by request `priority`
    (larger first; none = lowest), then arrival (`_sort_by_priority_and_fcfs`); fcfs only, as in
    SGLang. Running requests are not preempted (SGLang preempts past a priority gap of 10)."""
    faults: FaultConfig = field(default_factory=FaultConfig)


@dataclass(eq=False)
class _Req:
    """A request inside the scheduler. `private` = KV tokens reserved outside the tree for it."""

    req: GenerateRequest
    arrival: float
    rng: random.Random
    prompt_len: int
    cached: int = 0
    locked: tuple[PageNode, ...] = ()
    private: int = 0
    prefilled: int = 0
    output: list[int] = field(default_factory=list)
    sent: int = 0
    forward_entry: float | None = None  # left the waiting queue (SGLang's forward_entry_time)
    prefill_start: float | None = None  # its first prefill step began
    first_token_at: float | None = None
    finished_at: float | None = None
    finish: dict[str, object] | None = None
    transferred: PrefilledKv | None = None
    page_keys: list[tuple[int, ...]] | None = None
    """lpm only, while waiting: the prompt's page keys and its last match (resumed each step)."""
    sort_node: PageNode | None = None
    sort_pages: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """Timing of a finished request on the simulated clock (seconds), kept for tests and benches."""

    rid: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft: float | None
    e2e: float
    finish_reason: dict[str, object] | None


def _priority_key(r: _Req) -> tuple[int, float]:
    """SGLang's priority order (higher first; a request without one ranks last), then arrival."""
    p = r.req.priority
    return (-p if p is not None else sys.maxsize, r.arrival)


def _prompt_ids(r: _Req) -> list[int]:
    return r.req.input_ids


class SimEngine:
    """A simulated SGLang server's engine (scheduler + prefix cache + KV-event publisher)."""

    def __init__(
        self,
        config: SimConfig | None = None,
        profile: GpuProfile | None = None,
        *,
        registry: BootstrapRegistry | None = None,
        records: int = 10_000,
    ) -> None:
        self.config = cfg = config or SimConfig()
        self.profile = prof = profile or tiny()
        if cfg.time_scale <= 0:
            raise ValueError("time_scale must be positive")
        if cfg.disaggregation_mode not in ("null", "prefill", "decode"):
            raise ValueError(
                f"disaggregation_mode must be null, prefill or decode, not {cfg.disaggregation_mode}"
            )
        self.capacity = cfg.kv_capacity_tokens or prof.max_total_tokens
        self.max_running = cfg.max_running_requests or prof.max_running_requests
        self.chunk_size = cfg.chunked_prefill_size or prof.chunked_prefill_size
        self.faults = cfg.faults
        self.policy = SchedulePolicy(cfg.schedule_policy)
        if cfg.enable_priority_scheduling and cfg.schedule_policy != "fcfs":
            raise ValueError("priority scheduling needs schedule_policy fcfs (SGLang refuses it with lpm)")
        self.registry = registry
        if cfg.disaggregation_mode != "null" and registry is None:
            raise ValueError("a PD engine needs a BootstrapRegistry shared with its partners")
        self.cache = PrefixCache(cfg.page_size, self.capacity, record_events=cfg.kv_events)
        self.waiting: deque[_Req] = deque()
        self.prefilling: list[_Req] = []
        self.decoding: list[_Req] = []
        self.by_rid: dict[str, _Req] = {}
        self.records: deque[RequestRecord] = deque(maxlen=records)
        self.records_by_rid: dict[str, RequestRecord] = {}
        self._fault_rng = random.Random(cfg.seed ^ 0x5EED)
        self._publisher: KvEventPublisher | None = None
        self._kv_info: KvEventsInfo | None = None
        self._task: asyncio.Task[None] | None = None
        self._work = asyncio.Event()
        self._unstall = asyncio.Event()
        self._started_wall = 0.0
        self._t0_wall = 0.0
        self._t0_epoch = 0.0
        self.sim_now = 0.0
        self._busy = False
        self._wake_at: float | None = None
        self.steps = 0
        self.prompt_tokens_total = 0
        self.cached_tokens_total = 0
        self.generation_tokens_total = 0
        self.requests_total = 0
        self._thr_ema = 0.0
        self._bg: set[asyncio.Task[None]] = set()

    # ---- lifecycle ----------------------------------------------------------------------------
    @property
    def facts(self) -> ServerFacts:
        c = self.config
        return ServerFacts(
            model_path=c.model_path,
            page_size=c.page_size,
            max_total_tokens=self.capacity,
            context_length=self.profile.context_length,
            max_running_requests=self.max_running,
            chunked_prefill_size=self.chunk_size,
            disaggregation_mode=c.disaggregation_mode,
            disaggregation_bootstrap_port=c.bootstrap_port if c.disaggregation_mode == "prefill" else None,
            kv_events=self._kv_info,
            extra={
                "sim_profile": self.profile.name,
                "sim_profile_source": self.profile.source,
                "sim_time_scale": c.time_scale,
            },
        )

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # time.monotonic, not loop.time(): uvloop's loop clock moves in 1 ms steps (100 ms of simulated
        # time at time_scale 0.01); both are CLOCK_MONOTONIC, so sleeps computed from it agree.
        self._started_wall = self._t0_wall = time.monotonic()
        self._t0_epoch = time.time()
        if self.config.kv_events:
            from kvroute.engines.kv_publisher import KvEventPublisher

            pub = KvEventPublisher(
                self.config.event_endpoint,
                replay_endpoint=self.config.replay_endpoint,
                topic=self.config.event_topic,
                form=self.config.event_form,
                bind=self.config.event_bind,
                attn_dp_rank=self.config.dp_rank,
            )
            await pub.start()
            self._publisher = pub
            self._kv_info = KvEventsInfo(
                endpoint=pub.endpoint,
                replay_endpoint=pub.replay_endpoint,
                topic=self.config.event_topic,
                block_size=self.config.page_size,
                dp_rank=self.config.dp_rank,
                bind=self.config.event_bind,
                configured=self.config.event_endpoint,
            )
        if not self.faults.stall:
            self._unstall.set()
        self._task = loop.create_task(self._run_guarded(), name="sim-scheduler")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            except Exception:  # already logged by _run_guarded
                pass
            self._task = None
        for t in list(self._bg):
            t.cancel()
        if self._bg:
            await asyncio.gather(*self._bg, return_exceptions=True)
        self.abort(abort_all=True)
        if self._publisher is not None:
            await self._publisher.close()
            self._publisher = None

    def is_ready(self) -> bool:
        return time.monotonic() - self._started_wall >= self.faults.slow_start_s

    def set_faults(self, changes: dict[str, object]) -> None:
        self.faults.update(changes)
        if self.faults.stall:
            self._unstall.clear()
        else:
            self._unstall.set()
        self._work.set()

    # ---- clock --------------------------------------------------------------------------------
    def _wall_to_sim(self, wall: float) -> float:
        return (wall - self._t0_wall) / self.config.time_scale

    def now(self) -> float:
        """Simulated seconds. While busy the clock is the step boundary (host overhead never counts);
        when idle it follows the wall clock, so idle gaps pass at the configured scale."""
        if self._busy:
            return self.sim_now
        return max(self.sim_now, self._wall_to_sim(time.monotonic()))

    # ---- submission ---------------------------------------------------------------------------
    def _validate(self, req: GenerateRequest) -> None:
        n = len(req.input_ids)
        if n == 0:
            raise BadRequest("The input is empty: provide text or input_ids.")
        if req.max_new_tokens < 0:
            raise BadRequest("max_new_tokens must be at least 0")
        ctx = self.profile.context_length
        if n + req.max_new_tokens > ctx:
            raise BadRequest(
                f"Requested token count exceeds the model's maximum context length of {ctx} tokens. "
                f"You requested a total of {n + req.max_new_tokens} tokens: {n} tokens from the input "
                f"messages and {req.max_new_tokens} tokens for the completion."
            )
        if n + req.max_new_tokens > self.capacity:
            raise BadRequest(
                f"The request needs {n + req.max_new_tokens} KV tokens; the pool has {self.capacity}."
            )
        if req.rid in self.by_rid:
            raise BadRequest(f"Duplicate request id {req.rid!r}")
        mode = self.config.disaggregation_mode
        if mode != "null" and req.bootstrap_room is None:
            raise BadRequest(f"disaggregation_mode={mode} needs bootstrap_room in the request")

    def _submit(self, req: GenerateRequest) -> _Req:
        if not self.is_ready():
            raise EngineError("Server is starting", status=503)
        if self.faults.error_rate and self._fault_rng.random() < self.faults.error_rate:
            raise EngineError("injected fault: internal server error", status=500)
        self._validate(req)
        seed = xxhash.xxh3_64_intdigest(
            bytes(str(req.seed if req.seed is not None else req.rid), "utf-8"), seed=self.config.seed
        )
        r = _Req(req=req, arrival=self.now(), rng=random.Random(seed), prompt_len=len(req.input_ids))
        self.by_rid[req.rid] = r
        self.requests_total += 1
        if self.config.disaggregation_mode == "decode":
            task = asyncio.get_running_loop().create_task(self._await_transfer(r), name=f"pd-wait-{req.rid}")
            self._bg.add(task)
            task.add_done_callback(self._bg.discard)
        else:
            self._enqueue(r, r.arrival)
        return r

    def _enqueue(self, r: _Req, at: float | None = None) -> None:
        if not self._busy and self._wake_at is None:
            # The idle engine starts its next step at this arrival, not when the loop gets to run:
            # host scheduling latency must not count as simulated GPU time.
            self._wake_at = self.now() if at is None else at
        self.waiting.append(r)
        self._work.set()

    async def _await_transfer(self, r: _Req) -> None:
        """PD decode: wait for the prefill's KV (bounded), then for the transfer, then queue for decoding."""
        assert self.registry is not None and r.req.bootstrap_room is not None
        room = r.req.bootstrap_room
        scale = self.config.time_scale
        try:
            kv = await self.registry.claim(room, self.config.bootstrap_timeout_s * scale)
        except TimeoutError:
            self._finish_error(
                r,
                BootstrapTimeout(
                    f"bootstrap room {room}: KV cache never arrived from the prefill server "
                    f"within {self.config.bootstrap_timeout_s:g} s (is the prefill request running?)"
                ),
            )
            return
        except RuntimeError as exc:
            self._finish_error(r, EngineError(f"bootstrap room {room}: prefill failed: {exc}"))
            return
        if r.finish is not None:  # aborted while waiting
            return
        want = r.req.bootstrap_port
        if want is not None and kv.bootstrap_port is not None and want != kv.bootstrap_port:
            self._finish_error(
                r,
                BadRequest(f"bootstrap room {room} came from bootstrap port {kv.bootstrap_port}, not {want}"),
            )
            return
        await asyncio.sleep(self.profile.transfer_ms(kv.prompt_tokens) / 1000 * scale)
        if r.finish is not None:
            return
        r.transferred = kv
        r.cached = kv.cached_tokens
        self._enqueue(r)

    async def generate(self, req: GenerateRequest) -> AsyncIterator[TokenChunk]:
        r = self._submit(req)
        die_after = self.faults.die_after_tokens
        try:
            while True:
                await r.wake.wait()
                r.wake.clear()
                if isinstance(r.finish, dict) and r.finish.get("_error") is not None:
                    err = r.finish["_error"]
                    assert isinstance(err, EngineError)
                    raise err
                new = r.output[r.sent :]
                if die_after is not None and r.sent + len(new) >= die_after:
                    new = new[: die_after - r.sent]
                    r.sent += len(new)
                    if new:
                        yield TokenChunk(new, r.prompt_len, r.cached, r.sent)
                    raise DropConnection(f"injected fault: connection dropped after {die_after} tokens")
                r.sent = len(r.output)
                done = r.finish is not None
                yield TokenChunk(
                    token_ids=new,
                    prompt_tokens=r.prompt_len,
                    cached_tokens=r.cached,
                    completion_tokens=len(r.output),
                    finish_reason=dict(r.finish) if done else None,  # type: ignore[arg-type]
                    e2e_latency=(r.finished_at - r.arrival) if done and r.finished_at is not None else None,
                    time_stats=self._time_stats(r),
                )
                if done:
                    return
        finally:
            if r.finish is None:
                self.abort(req.rid)
            self.by_rid.pop(req.rid, None)

    def _step_start(self) -> float:
        """When the step being built starts: the current boundary while busy, else (as `_run` sets it)
        the arrival that woke the engine."""
        if self._busy:
            return self.sim_now
        wake = self._wake_at if self._wake_at is not None else self._wall_to_sim(time.monotonic())
        return max(self.sim_now, wake)

    def _time_stats(self, r: _Req) -> dict[str, float] | None:
        """SGLang 0.5.10's scheduler timings in `meta_info` (`observability/req_time_stats.py`), on the
        simulated clock: durations in simulated seconds, `*_time` stamps as wall-clock epoch seconds."""
        if r.forward_entry is None:
            return None
        out = {
            "forward_entry_time": self._epoch(r.forward_entry),
            # An idle engine's step starts at the arrival that woke it; a later arrival admitted into
            # that same step waited 0 (never negative).
            "queue_time": max(r.forward_entry - r.arrival, 0.0),
        }
        if r.prefill_start is not None:
            out["prefill_waiting_latency"] = r.prefill_start - r.forward_entry
            if r.first_token_at is not None:
                out["prefill_launch_latency"] = r.first_token_at - r.prefill_start
                out["prefill_finished_time"] = self._epoch(r.first_token_at)
        return out

    def _epoch(self, sim_t: float) -> float:
        return self._t0_epoch + sim_t * self.config.time_scale

    # ---- abort / flush ------------------------------------------------------------------------
    def abort(self, rid: str | None = None, abort_all: bool = False) -> int:
        targets = (
            list(self.by_rid.values()) if abort_all else [self.by_rid[rid]] if rid in self.by_rid else []
        )
        n = 0
        for r in targets:
            if r.finish is None:
                self._release(r)
                self._finish(r, {"type": "abort", "message": "Abort request", "status_code": 200})
                n += 1
        return n

    async def flush_cache(self) -> bool:
        if self.waiting or self.prefilling or self.decoding:
            return False
        self.cache.reset()
        self._publish()
        return True

    def _release(self, r: _Req) -> None:
        """Take a request out of the scheduler and give back its KV (pages unlocked, private freed)."""
        for q in (self.prefilling, self.decoding):
            if r in q:
                q.remove(r)
        if r in self.waiting:
            self.waiting.remove(r)
        if r.locked:
            self.cache.unlock(r.locked)
            r.locked = ()
        if r.private:
            self.cache.free(r.private)
            r.private = 0
        if (
            self.config.disaggregation_mode == "prefill"
            and self.registry is not None
            and r.first_token_at is None
        ):
            room = r.req.bootstrap_room
            if room is not None:
                self.registry.fail(room, "the prefill request was aborted", self._room_hold_s)

    def _finish(self, r: _Req, reason: dict[str, object]) -> None:
        r.finish = reason
        r.finished_at = self.now()
        r.wake.set()
        if "_error" not in reason:
            rec = RequestRecord(
                rid=r.req.rid,
                prompt_tokens=r.prompt_len,
                cached_tokens=r.cached,
                completion_tokens=len(r.output),
                ttft=None if r.first_token_at is None else r.first_token_at - r.arrival,
                e2e=r.finished_at - r.arrival,
                finish_reason=reason,
            )
            if len(self.records) == self.records.maxlen:
                self.records_by_rid.pop(self.records[0].rid, None)
            self.records.append(rec)
            self.records_by_rid[rec.rid] = rec

    def _finish_error(self, r: _Req, err: EngineError) -> None:
        if r.finish is None:
            self._release(r)
            self._finish(r, {"_error": err})

    # ---- load ---------------------------------------------------------------------------------
    def load(self) -> LoadSnapshot:
        return LoadSnapshot(
            num_running_reqs=len(self.prefilling) + len(self.decoding),
            num_waiting_reqs=len(self.waiting),
            num_used_tokens=self.cache.used_tokens,
            max_total_num_tokens=self.capacity,
            cache_hit_rate=self.cached_tokens_total / self.prompt_tokens_total
            if self.prompt_tokens_total
            else 0.0,
            gen_throughput=self._thr_ema,
            prompt_tokens_total=self.prompt_tokens_total,
            cached_tokens_total=self.cached_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            requests_total=self.requests_total,
        )

    # ---- scheduler ----------------------------------------------------------------------------
    def _admit(self) -> int:
        """Move waiting requests into the batch, in the policy's order (no skipping), while slots,
        step budget and KV allow. Like SGLang's PrefillAdder loop, each prompt is matched against the
        tree when it is admitted, so it reuses what earlier steps inserted (including chunks so far)."""
        budget = self.chunk_size - sum(
            min(r.prompt_len - r.prefilled, self.chunk_size) for r in self.prefilling
        )
        ps = self.config.page_size
        if (
            budget > 0
            and len(self.waiting) > 1
            and self.config.disaggregation_mode != "decode"
            and len(self.prefilling) + len(self.decoding) < self.max_running
        ):
            # SGLang's calc_priority runs only when a prefill batch can be formed (batch not full).
            ordered: list[_Req] | None
            if self.config.enable_priority_scheduling:
                ordered = sorted(self.waiting, key=_priority_key)
            else:
                ordered = self.policy.order(self.waiting, _prompt_ids, self._sort_match)
            if ordered is not None:
                self.waiting = deque(ordered)
        while self.waiting and len(self.prefilling) + len(self.decoding) < self.max_running:
            r = self.waiting[0]
            if r.transferred is not None:  # PD decode: the whole prompt's KV arrives, no prefill
                need = r.prompt_len + r.req.max_new_tokens
                if not self.cache.alloc(need):
                    break
                self.waiting.popleft()
                r.forward_entry = self._step_start()
                r.private = need
                r.prefilled = r.prompt_len
                if r.transferred.first_token is not None:
                    r.output.append(r.transferred.first_token)
                    r.first_token_at = self.now()
                    self.generation_tokens_total += 1
                    r.wake.set()
                self.prompt_tokens_total += r.prompt_len
                self.cached_tokens_total += r.cached
                if len(r.output) >= r.req.max_new_tokens:
                    self._complete(r)
                else:
                    self.decoding.append(r)
                continue
            if budget <= 0:
                break
            # Like SGLang, at least the last prompt token is always computed (it yields the logits).
            m = self.cache.match_prefix(r.req.input_ids[: r.prompt_len - 1])
            self.cache.lock(m.nodes)
            need = r.prompt_len - m.cached_tokens + r.req.max_new_tokens
            if not self.cache.alloc(need):
                self.cache.unlock(m.nodes)
                break
            self.waiting.popleft()
            r.forward_entry = self._step_start()
            r.page_keys, r.sort_node = None, None
            r.locked, r.cached, r.prefilled, r.private = m.nodes, m.cached_tokens, m.cached_tokens, need
            assert r.cached % ps == 0
            self.prompt_tokens_total += r.prompt_len
            self.cached_tokens_total += r.cached
            self.prefilling.append(r)
            budget -= r.prompt_len - r.prefilled
        return budget

    def _sort_match(self, r: _Req) -> int:
        """Cached tokens of the whole prompt, for the lpm sort: resumed from the last step's match, so
        a long queue costs O(new pages) per step. (SGLang's sort also refreshes the matched pages' LRU
        time; here only admission does.)"""
        if r.page_keys is None:
            r.page_keys = self.cache.page_keys(r.req.input_ids)
        r.sort_node, r.sort_pages = self.cache.extend_match(r.page_keys, r.sort_node, r.sort_pages)
        return r.sort_pages * self.config.page_size

    def _cache_tokens(self, r: _Req, tokens: list[int]) -> None:
        """Insert `tokens` (whose KV `r` computed) into the tree; their private copy is freed."""
        path, _added = self.cache.insert(tokens)
        self.cache.lock(path)
        old = len(r.locked) * self.config.page_size
        if r.locked:
            self.cache.unlock(r.locked)
        moved = max(0, len(path) * self.config.page_size - old)
        moved = min(moved, r.private)
        self.cache.free(moved)
        r.private -= moved
        r.locked = path

    def _next_token(self, r: _Req) -> int:
        return r.rng.randrange(32, 127)  # printable ASCII: decodes to text with the byte tokenizer

    def _complete(self, r: _Req) -> None:
        """Finished normally: cache prompt + output (minus the last token, whose KV was never computed)."""
        if self.config.disaggregation_mode != "decode":
            self._cache_tokens(r, r.req.input_ids + r.output[:-1])
        self._release(r)
        self._finish(r, {"type": "length", "length": len(r.output)})

    async def _run_guarded(self) -> None:
        """A scheduler bug must fail the requests loudly, not leave them hanging."""
        try:
            await self._run()
        except Exception:
            log.exception("simulated scheduler crashed")
            for r in list(self.by_rid.values()):
                self._finish_error(r, EngineError("simulated scheduler crashed (see server log)"))
            raise

    async def _run(self) -> None:
        scale = self.config.time_scale
        prof = self.profile
        while True:
            if not self._unstall.is_set():
                await self._unstall.wait()
            self._admit()
            if not self.prefilling and not self.decoding:
                self._busy = False
                self._publish()
                self._work.clear()
                if self.waiting:
                    # Blocked on KV or slots with nothing running cannot happen (validated sizes); be safe.
                    await asyncio.sleep(0.001)
                    continue
                await self._work.wait()
                continue
            if not self._busy:
                start = self._wake_at if self._wake_at is not None else self._wall_to_sim(time.monotonic())
                self.sim_now = max(self.sim_now, start)
                self._busy = True
            self._wake_at = None
            # Build the step: chunks of prefill within the token budget, one token per decoding request.
            budget = self.chunk_size
            chunks: list[tuple[_Req, int]] = []
            for r in self.prefilling:
                if budget <= 0:
                    break
                n = min(r.prompt_len - r.prefilled, budget)
                if r.prefill_start is None:
                    r.prefill_start = self.sim_now
                chunks.append((r, n))
                budget -= n
            dec = self.decoding
            ctx = 0
            for r in dec:
                ctx += r.prompt_len + len(r.output)
            cost_ms = prof.step_ms([(n, r.prefilled) for r, n in chunks], len(dec), ctx)
            end = self.sim_now + cost_ms / 1000.0
            delay = self._t0_wall + end * scale - time.monotonic()
            await asyncio.sleep(delay if delay > 0.0005 else 0)
            self.sim_now = end
            self.steps += 1
            # Apply the step's results.
            produced = 0
            for r in list(dec):
                if r.finish is not None:
                    continue
                r.output.append(self._next_token(r))
                produced += 1
                r.wake.set()
                if len(r.output) >= r.req.max_new_tokens:
                    self._complete(r)
            for r, n in chunks:
                if r.finish is not None:
                    continue
                r.prefilled += n
                if r.prefilled < r.prompt_len:
                    # SGLang's stash_chunked_request (cache_unfinished_req): the chunks computed so far
                    # go into the tree, so requests admitted next step reuse them.
                    self._cache_tokens(r, r.req.input_ids[: r.prefilled])
                    continue
                self.prefilling.remove(r)
                self._cache_tokens(r, r.req.input_ids)
                r.first_token_at = self.sim_now
                if r.req.max_new_tokens > 0:
                    r.output.append(self._next_token(r))
                    produced += 1
                r.wake.set()
                if self.config.disaggregation_mode == "prefill":
                    self._hand_over(r)
                if len(r.output) >= r.req.max_new_tokens or self.config.disaggregation_mode == "prefill":
                    self._complete(r)
                else:
                    self.decoding.append(r)
            self.generation_tokens_total += produced
            step_s = cost_ms / 1000.0
            if step_s > 0:
                self._thr_ema = 0.9 * self._thr_ema + 0.1 * (produced / step_s)
            self._publish()

    def _hand_over(self, r: _Req) -> None:
        """PD prefill: the KV for the room is ready; hold it (bounded) until the decode side claims it."""
        assert self.registry is not None and r.req.bootstrap_room is not None
        room = r.req.bootstrap_room
        self.registry.deposit(
            PrefilledKv(
                room=room,
                bootstrap_port=self.config.bootstrap_port,
                prompt_tokens=r.prompt_len,
                cached_tokens=r.cached,
                first_token=r.output[0] if r.output else None,
                kv_bytes=r.prompt_len * self.profile.kv_bytes_per_token,
            ),
            self._room_hold_s,
        )

    @property
    def _room_hold_s(self) -> float:
        """A room nobody claims is dropped after the decode side's wait timeout (the registry's timer)."""
        return self.config.bootstrap_timeout_s * self.config.time_scale

    # ---- events -------------------------------------------------------------------------------
    def _publish(self) -> None:
        notes = self.cache.take_events()
        if not notes or self._publisher is None:
            return
        self._publisher.publish(
            notes_to_events(notes, self.config.page_size, self.config.event_form == "map")
        )

"""The GPU engine: an ``EngineCore`` whose tokens come from a real model over a real paged KV pool.

One step thread per engine owns the scheduler, the pool and the model calls (the GPU work blocks); the
asyncio side only submits requests and reads results, through a thread-safe inbox one way and
``loop.call_soon_threadsafe`` the other. KV-event notes of each step are published from the loop (the
publisher's sockets belong to it). Several engines may share one ``LlamaWeights`` (one process, one GPU):
each has its own pool, scheduler, CUDA stream and thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import torch

from cache_index.events import KvEvent
from engines.core import (
    BadRequest,
    EngineError,
    GenerateRequest,
    KvEventsInfo,
    LoadSnapshot,
    ServerFacts,
    TokenChunk,
)
from engines.gpu.attention import StepMeta, TritonAttention, build_meta, make_backend
from engines.gpu.config import EngineConfig, ModelConfig
from engines.gpu.kv_pool import KVPool
from engines.gpu.model import LlamaModel, LlamaWeights, torch_dtype
from engines.gpu.scheduler import Req, Scheduler, Step
from engines.prefix_cache import CacheNote, PrefixCache
from engines.sim.kv_notes import notes_to_events

log = logging.getLogger(__name__)

DEFAULT_CPU_PAGES = 256


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One forward's shape and wall time (host clock around a synchronised step), for calibration."""

    num_decode: int
    decode_context: int  # sum of decode context lengths
    prefill_tokens: int
    prefill_context: int  # sum over chunks of (cached prefix + chunk) tokens
    ms: float


@dataclass
class _Stream:
    """Per-request channel from the step thread to the awaiting coroutine."""

    loop: asyncio.AbstractEventLoop
    q: asyncio.Queue[TokenChunk | EngineError]
    arrival: float


class GpuEngine:
    """Implements ``engines.core.EngineCore``.

    Invariant: only the step thread touches the scheduler, pool and model after ``start``.
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        cfg: EngineConfig,
        *,
        weights: LlamaWeights | None = None,
        kv_events_endpoint: str | None = None,
        kv_events_replay: str | None = None,
        kv_events_topic: str = "",
        kv_events_form: str = "array",
        num_pages: int | None = None,
        name: str = "engine",
    ) -> None:
        self.model_cfg = model_cfg
        self.cfg = cfg
        self.name = name
        dev = torch.device(cfg.device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self.device = dev
        self._weights = weights
        self._ev_endpoint = kv_events_endpoint
        self._ev_replay = kv_events_replay
        self._ev_topic = kv_events_topic
        self._ev_form = kv_events_form
        self._num_pages = num_pages if num_pages is not None else cfg.num_pages
        self._publisher: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._streams: dict[int, _Stream] = {}
        self._ready = False
        self._facts: ServerFacts | None = None
        self.sched: Scheduler | None = None
        self.pool: KVPool | None = None
        self.model: LlamaModel | None = None
        self.step_log: deque[StepRecord] = deque(maxlen=100_000)
        self._gen_window: deque[tuple[float, int]] = deque(maxlen=256)

    # ---- lifecycle -------------------------------------------------------------------------
    @property
    def facts(self) -> ServerFacts:
        if self._facts is None:
            raise RuntimeError("engine not started")
        return self._facts

    def _build(self) -> None:
        mc, ec = self.model_cfg, self.cfg
        dt = torch_dtype(mc.dtype)
        if self._weights is None:
            if ec.model_path:
                self._weights = LlamaWeights.from_safetensors(mc, ec.model_path, self.device)
            else:
                self._weights = LlamaWeights.random(mc, self.device, ec.seed)
        pages = self._num_pages
        if pages <= 0:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                pages = KVPool.pages_for_bytes(
                    mc, ec.page_size, int(free * ec.kv_memory_fraction), dt.itemsize
                )
            else:
                pages = DEFAULT_CPU_PAGES
        self.pool = KVPool(mc, pages, ec.page_size, self.device, dt)
        cache = PrefixCache(ec.page_size, pages * ec.page_size, record_events=True)
        self.sched = Scheduler(
            cache,
            self.pool,
            max_batch_tokens=ec.max_batch_tokens,
            max_running=ec.max_running,
            context_length=mc.max_position,
        )
        self.model = LlamaModel(self._weights, make_backend(ec.attention, self.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # weights drawn on the default stream; steps use their own

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._build)
        assert self.pool is not None and self.model is not None
        ev_info = None
        if self._ev_endpoint is not None:
            from engines.kv_publisher import KvEventPublisher

            self._publisher = KvEventPublisher(
                self._ev_endpoint, replay_endpoint=self._ev_replay, topic=self._ev_topic, form=self._ev_form
            )  # type: ignore[arg-type]
            await self._publisher.start()
            ev_info = KvEventsInfo(
                self._publisher.endpoint, self._publisher.replay_endpoint, self._ev_topic, self.cfg.page_size
            )
        self._facts = ServerFacts(
            model_path=self.cfg.served_model_name,
            page_size=self.cfg.page_size,
            max_total_tokens=self.pool.num_pages * self.pool.page_size,
            context_length=self.model_cfg.max_position,
            max_running_requests=self.cfg.max_running,
            chunked_prefill_size=self.cfg.max_batch_tokens,
            kv_events=ev_info,
            extra={
                "engine": "kvroute-gpu",
                "device": str(self.device),
                "attention": self.model.attn.name,
                "model_config": self.model_cfg.name,
                "dtype": self.model_cfg.dtype,
            },
        )
        self._thread = threading.Thread(target=self._run, name=f"kvroute-gpu-{self.name}", daemon=True)
        self._thread.start()
        self._ready = True

    async def close(self) -> None:
        self._ready = False
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        if self._publisher is not None:
            await self._publisher.close()
            self._publisher = None

    def is_ready(self) -> bool:
        return self._ready

    # ---- requests (asyncio side) ------------------------------------------------------------
    def _submit(self, op: str, arg: Any) -> None:
        self._inbox.put((op, arg))
        self._wake.set()

    async def generate(self, req: GenerateRequest) -> AsyncIterator[TokenChunk]:
        if not self._ready or self.sched is None:
            raise EngineError("engine not ready", status=503)
        if not req.input_ids:
            raise BadRequest("empty prompt")
        need = len(req.input_ids) + req.max_new_tokens
        cap = min(self.facts.context_length, self.facts.max_total_tokens)
        if need > cap:
            raise BadRequest(
                f"prompt ({len(req.input_ids)}) + max_new_tokens ({req.max_new_tokens}) "
                f"exceeds the engine's {cap} tokens"
            )
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue(), time.monotonic())
        r = Req(
            rid=req.rid,
            prompt=list(req.input_ids),
            max_new_tokens=max(1, req.max_new_tokens),
            arrival=stream.arrival,
        )
        self._streams[id(r)] = stream
        self._submit("add", r)
        done = False
        try:
            while True:
                item = await stream.q.get()
                if isinstance(item, EngineError):
                    done = True
                    raise item
                if item.finish_reason is not None:
                    done = True
                yield item
                if done:
                    return
        finally:
            self._streams.pop(id(r), None)
            if not done:
                self._submit("abort_req", r)

    def abort(self, rid: str | None = None, abort_all: bool = False) -> int:
        """Asynchronous like SGLang's: counts requests known now, they end at the next step."""
        if self.sched is None:
            return 0
        n = sum(
            1
            for r in (*self.sched.waiting, *self.sched.running)
            if not r.finished and (abort_all or r.rid == rid)
        )
        self._submit("abort", (rid, abort_all))
        return n

    async def flush_cache(self) -> bool:
        fut: concurrent.futures.Future[bool] = concurrent.futures.Future()
        self._submit("flush", fut)
        return await asyncio.wrap_future(fut)

    def load(self) -> LoadSnapshot:
        s = self.sched
        if s is None:
            return LoadSnapshot(0, 0, 0, 0, 0.0, 0.0, 0, 0, 0, 0)
        now = time.monotonic()
        win = [(t, n) for t, n in self._gen_window if now - t < 5.0]
        thr = sum(n for _, n in win) / 5.0 if win else 0.0
        return LoadSnapshot(
            num_running_reqs=len(s.running),
            num_waiting_reqs=len(s.waiting),
            num_used_tokens=s.used_tokens(),
            max_total_num_tokens=s.cache.capacity_tokens,
            cache_hit_rate=s.cached_tokens_total / s.prompt_tokens_total if s.prompt_tokens_total else 0.0,
            gen_throughput=thr,
            prompt_tokens_total=s.prompt_tokens_total,
            cached_tokens_total=s.cached_tokens_total,
            generation_tokens_total=s.generation_tokens_total,
            requests_total=s.requests_total,
        )

    # ---- step thread ---------------------------------------------------------------------------
    def _deliver(self, r: Req, toks: list[int], finish: dict[str, Any] | None) -> None:
        st = self._streams.get(id(r))
        if st is None:
            return
        chunk = TokenChunk(
            toks,
            len(r.prompt),
            r.cached_tokens,
            len(r.output),
            finish,
            time.monotonic() - st.arrival if finish is not None else None,
        )
        st.loop.call_soon_threadsafe(st.q.put_nowait, chunk)

    def _fail(self, r: Req, err: EngineError) -> None:
        st = self._streams.get(id(r))
        if st is not None:
            st.loop.call_soon_threadsafe(st.q.put_nowait, err)

    def _publish(self, notes: list[CacheNote]) -> None:
        if not notes or self._publisher is None or self._loop is None:
            return
        # SGLang 0.5.10 sends one BlockStored per page; 0.5.23 (map form) merges chains.
        events = notes_to_events(notes, self.cfg.page_size, merge_chains=self._ev_form == "map")
        if events:
            self._loop.call_soon_threadsafe(self._publish_now, events)

    def _publish_now(self, events: list[KvEvent]) -> None:
        if self._publisher is not None:
            self._publisher.publish(events)

    def _process_inbox(self) -> None:
        s = self.sched
        assert s is not None
        while True:
            try:
                op, arg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if op == "add":
                try:
                    s.add(arg)
                except ValueError as exc:
                    self._fail(arg, BadRequest(str(exc)))
            elif op == "abort":
                s.abort(*arg)
            elif op == "abort_req":
                if not arg.finished:
                    arg.aborted = True
            elif op == "flush":
                ok = s.flush()
                arg.set_result(ok)

    def _run(self) -> None:
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        if stream is not None:
            torch.cuda.set_device(self.device)
        ctx = torch.cuda.stream(stream) if stream is not None else None
        if ctx is not None:
            ctx.__enter__()
        try:
            self._loop_steps()
        except Exception as exc:  # the engine is dead: say so to every waiting request and to /health
            log.exception("%s: step thread died", self.name)
            self._ready = False
            for st in list(self._streams.values()):
                st.loop.call_soon_threadsafe(st.q.put_nowait, EngineError(f"engine failed: {exc}"))
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)

    def _loop_steps(self) -> None:
        s = self.sched
        assert s is not None
        while not self._stop.is_set():
            self._wake.clear()  # before reading the inbox: a submit after this line wakes the wait below
            self._process_inbox()
            step, gone = s.schedule()
            for r in gone:
                self._deliver(r, [], {"type": "abort", "message": "Abort request"})
            if step.empty():
                self._publish(s.take_events())
                self._wake.wait(0.5)
                continue
            try:
                t0 = time.perf_counter()
                tokens = self.run_step(step)
                ms = (time.perf_counter() - t0) * 1e3
            except Exception as exc:  # a failed forward fails its requests, never the thread
                log.exception("%s: step failed", self.name)
                for r in [*step.decodes, *(c.req for c in step.prefills)]:
                    r.aborted = True
                    self._fail(r, EngineError(f"step failed: {exc}"))
                continue
            self.step_log.append(
                StepRecord(
                    len(step.decodes),
                    sum(r.computed + 1 for r in step.decodes),
                    sum(c.length for c in step.prefills),
                    sum(c.start + c.length for c in step.prefills),
                    ms,
                )
            )
            results = s.finish_step(step, tokens)
            n_new = 0
            for r, tok, fin in results:
                if tok is None:
                    continue
                n_new += 1
                finish = {"type": "length", "length": r.max_new_tokens} if fin else None
                self._deliver(r, [tok], finish)
            self._gen_window.append((time.monotonic(), n_new))
            self._publish(s.take_events())

    def step_inputs(self, step: Step) -> tuple[list[int], list[int], StepMeta, list[int]]:
        """Token ids, positions, attention metadata and the rows to sample, for one step."""
        assert self.pool is not None and self.model is not None
        ids: list[int] = []
        pos: list[int] = []
        rows: list[int] = []
        for i, r in enumerate(step.decodes):
            ids.append(r.output[-1])
            pos.append(r.computed)
            rows.append(i)
        off = len(step.decodes)
        for c in step.prefills:
            ids.extend(c.req.prompt[c.start : c.start + c.length])
            pos.extend(range(c.start, c.start + c.length))
            off += c.length
            if c.completes:
                rows.append(off - 1)
        block_m = (
            self.model.attn.prefill_tuning.block_m if isinstance(self.model.attn, TritonAttention) else None
        )
        meta = build_meta(
            self.pool.page_size,
            self.device,
            [r.pages for r in step.decodes],
            [r.computed + 1 for r in step.decodes],
            [c.req.pages for c in step.prefills],
            [c.start for c in step.prefills],
            [c.length for c in step.prefills],
            prefill_block_m=block_m,
        )
        return ids, pos, meta, rows

    def run_step(self, step: Step) -> list[int]:
        """One forward; greedy tokens for the decodes and the prefills that complete their prompt."""
        assert self.pool is not None and self.model is not None
        ids, pos, meta, rows = self.step_inputs(step)
        dev = self.device
        logits = self.model.forward(
            torch.tensor(ids, dtype=torch.long).to(dev, non_blocking=True),
            torch.tensor(pos, dtype=torch.long).to(dev, non_blocking=True),
            meta,
            self.pool.k,
            self.pool.v,
            torch.tensor(rows, dtype=torch.long).to(dev, non_blocking=True),
        )
        return logits.argmax(-1).tolist() if rows else []

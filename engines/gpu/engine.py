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

from kvroute.cache_index.events import KvEvent
from kvroute.engines.core import (
    BadRequest,
    EngineError,
    GenerateRequest,
    KvEventsInfo,
    LoadSnapshot,
    ServerFacts,
    TokenChunk,
)
from kvroute.engines.gpu.attention import StepMeta, TritonAttention, build_meta, make_backend
from kvroute.engines.gpu.bootstrap import BootstrapClient, BootstrapServer, LentKv
from kvroute.engines.gpu.config import EngineConfig, ModelConfig
from kvroute.engines.gpu.kv_pool import KVPool
from kvroute.engines.gpu.model import LlamaModel, LlamaWeights, torch_dtype
from kvroute.engines.gpu.scheduler import Req, Scheduler, Step
from kvroute.engines.gpu.transfer import (
    CudaIpcTransport,
    KvTransport,
    LocalTransport,
    PoolDescriptor,
    PoolDirectory,
    describe_pool,
    pick_transport,
)
from kvroute.engines.prefix_cache import CacheNote, PrefixCache
from kvroute.engines.sim.kv_notes import notes_to_events
from kvroute.engines.sim.pd import BootstrapRegistry, PrefilledKv

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


@dataclass(frozen=True, slots=True)
class TransferRecord:
    """One KV transfer on the decode side: pages, bytes, the transport and the copy's wall time."""

    pages: int
    nbytes: int
    transport: str
    ms: float


@dataclass
class _Stream:
    """Per-request channel from the step thread to the awaiting coroutine."""

    loop: asyncio.AbstractEventLoop
    q: asyncio.Queue[TokenChunk | EngineError]
    arrival: float


@dataclass(eq=False)
class _Pull:
    """PD decode: a request waiting for its room's KV, then for pages and the copy (step thread)."""

    req: Req
    host: str
    port: int
    room: int
    task: asyncio.Task[None] | None = None
    handed: bool = False  # the step thread owns it now
    lent: LentKv | None = None
    desc: PoolDescriptor | None = None
    transport: KvTransport | None = None


@dataclass(eq=False)
class _Lent:
    """PD prefill: pages lent to a room, taken back on release or when the timer runs out."""

    req: Req
    kv: LentKv
    timer: asyncio.TimerHandle | None = None
    claimed: bool = False
    extended: bool = False


class GpuEngine:
    """Implements ``kvroute.engines.core.EngineCore``.

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
        pools: PoolDirectory | None = None,
        bootstrap_host: str = "127.0.0.1",
        bootstrap_port: int = 0,
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
        # PD disaggregation (cfg.disaggregation_mode); `pools` is shared by the engines of one process.
        self.mode = cfg.disaggregation_mode
        self.pools = pools if pools is not None else PoolDirectory()
        self._bootstrap_host = bootstrap_host
        self._bootstrap_port = bootstrap_port
        self._pool_id: str | None = None
        self._descriptor: PoolDescriptor | None = None
        self._registry: BootstrapRegistry | None = None
        self._server: BootstrapServer | None = None
        self._client: BootstrapClient | None = None
        self._transports: list[KvTransport] = []
        self._lent: dict[int, _Lent] = {}  # room -> pages lent (loop thread)
        self._pulls: dict[int, _Pull] = {}  # id(req) -> decode waiting for its KV (loop thread)
        self._transfers: deque[_Pull] = deque()  # handed to the step thread, waiting for pages
        self._bg: set[asyncio.Task[None]] = set()
        self.transfer_log: deque[TransferRecord] = deque(maxlen=100_000)

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
            lend_finished=self.mode == "prefill",
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
        self._pool_id = self.pools.register(self.pool)
        if self.mode == "prefill":
            self._descriptor = describe_pool(self.pool, self._pool_id, with_ipc=self.device.type == "cuda")
            self._registry = BootstrapRegistry(hold_s=self.cfg.bootstrap_timeout_s)
            self._server = BootstrapServer(self, self._registry, self._bootstrap_host, self._bootstrap_port)
            self._bootstrap_port = await self._server.start()
        elif self.mode == "decode":
            self._client = BootstrapClient()
            self._transports = [LocalTransport(self.pools), CudaIpcTransport()]
        ev_info = None
        if self._ev_endpoint is not None:
            from kvroute.engines.kv_publisher import KvEventPublisher

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
            disaggregation_mode=self.mode,
            disaggregation_bootstrap_port=self._bootstrap_port if self.mode == "prefill" else None,
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
        for t in list(self._bg):
            t.cancel()
        if self._bg:
            await asyncio.gather(*self._bg, return_exceptions=True)
        if self._registry is not None:
            self._registry.close()  # first: a decode still long-polling its room is answered at once
        if self._server is not None:
            await self._server.close()
            self._server = None
        for lent in self._lent.values():
            if lent.timer is not None:
                lent.timer.cancel()
        self._lent.clear()
        if self._client is not None:
            await self._client.close()
            self._client = None
        for t in self._transports:
            if isinstance(t, CudaIpcTransport):
                t.close()
        if self._pool_id is not None:
            self.pools.unregister(self._pool_id)
            self._pool_id = None

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
        if self.mode != "null" and req.bootstrap_room is None:
            raise BadRequest(f"disaggregation_mode={self.mode} needs bootstrap_room in the request")
        if self.mode == "decode" and (not req.bootstrap_host or req.bootstrap_port is None):
            raise BadRequest("disaggregation_mode=decode needs bootstrap_host and bootstrap_port too")
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue(), time.monotonic())
        r = Req(
            rid=req.rid,
            prompt=list(req.input_ids),
            # A prefill server computes the prompt and the first token only; the decode server the rest.
            max_new_tokens=1 if self.mode == "prefill" else max(1, req.max_new_tokens),
            arrival=stream.arrival,
            room=req.bootstrap_room,
        )
        self._streams[id(r)] = stream
        pull: _Pull | None = None
        if self.mode == "decode":
            assert req.bootstrap_host and req.bootstrap_port is not None and req.bootstrap_room is not None
            pull = _Pull(r, req.bootstrap_host, req.bootstrap_port, req.bootstrap_room)
            self._pulls[id(r)] = pull
            pull.task = loop.create_task(self._pull(pull), name=f"pd-pull-{req.rid}")
        else:
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
            if pull is not None:
                self._pulls.pop(id(r), None)
            if not done:
                r.aborted = True  # a transfer queued on the step thread checks this flag
                if pull is not None and not pull.handed and pull.task is not None:
                    pull.task.cancel()
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
        for pull in list(self._pulls.values()):  # PD decode: still waiting for the KV or for pages
            r = pull.req
            if r.finished or r.aborted or not (abort_all or r.rid == rid):
                continue
            n += 1
            r.aborted = True
            if not pull.handed and pull.task is not None:
                pull.task.cancel()
        self._submit("abort", (rid, abort_all))
        return n

    # ---- PD decode: wait for the room, then hand the copy to the step thread ---------------------
    async def _pull(self, p: _Pull) -> None:
        r = p.req
        assert self._client is not None and self.pool is not None
        try:
            lent, desc = await self._client.claim(p.host, p.port, p.room, self.cfg.bootstrap_timeout_s)
        except asyncio.CancelledError:
            self._deliver(r, [], {"type": "abort", "message": "Abort request"})
            raise
        except EngineError as exc:
            self._fail(r, exc)
            return
        err: EngineError | None = None
        if r.aborted:
            self._deliver(r, [], {"type": "abort", "message": "Abort request"})
        elif lent.prompt_tokens != len(r.prompt):
            err = BadRequest(
                f"bootstrap room {p.room} holds a {lent.prompt_tokens}-token prompt, this request has "
                f"{len(r.prompt)}"
            )
        else:
            try:
                desc.check_compatible(self.pool)
                p.transport = pick_transport(self._transports, desc)
            except (ValueError, LookupError) as exc:
                err = EngineError(f"bootstrap room {p.room}: {exc}")
        if err is not None or r.aborted:
            if err is not None:
                self._fail(r, err)
            self._release_remote(p)
            return
        p.lent, p.desc, p.handed = lent, desc, True
        r.cached_tokens = lent.cached_tokens
        self._submit("transfer", p)

    def _release_remote(self, p: _Pull) -> None:
        """Tell the prefill side its pages are free (on the loop; the step thread calls it threadsafe)."""
        if self._client is None:
            return
        task = asyncio.get_running_loop().create_task(self._client.release(p.host, p.port, p.room))
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    # ---- PD prefill: the bootstrap server's Lender ---------------------------------------------------
    def descriptor(self) -> PoolDescriptor:
        assert self._descriptor is not None
        return self._descriptor

    def lent(self, room: int) -> LentKv | None:
        entry = self._lent.get(room)
        return entry.kv if entry is not None else None

    def claimed(self, room: int) -> None:
        entry = self._lent.get(room)
        if entry is not None:
            entry.claimed = True

    def release(self, room: int) -> bool:
        entry = self._lent.pop(room, None)
        if entry is None:
            return False
        if entry.timer is not None:
            entry.timer.cancel()
        self._submit("release", entry.req)
        return True

    def lent_rooms(self) -> int:
        return len(self._lent)

    def _lent_timeout(self, room: int) -> None:
        """Nobody claimed the room in the decode wait (or the claimer never released): take the pages back."""
        entry = self._lent.get(room)
        if entry is None:
            return
        if entry.claimed and not entry.extended:
            entry.extended = True  # one more wait, for the copy that a claimer is doing
            entry.timer = asyncio.get_running_loop().call_later(
                self.cfg.bootstrap_timeout_s, self._lent_timeout, room
            )
            return
        log.warning("%s: bootstrap room %s: pages taken back, no decode side released them", self.name, room)
        self.release(room)

    def _hand_over(self, r: Req, kv: LentKv) -> None:
        """The prefill finished (loop thread): lend its pages to the room and wake a waiting decode."""
        assert self._registry is not None
        old = self._lent.get(kv.room)
        if old is not None:  # a room id reused while lent: the older lender loses
            self.release(kv.room)
        entry = _Lent(r, kv)
        entry.timer = asyncio.get_running_loop().call_later(
            self.cfg.bootstrap_timeout_s, self._lent_timeout, kv.room
        )
        self._lent[kv.room] = entry
        self._registry.deposit(
            PrefilledKv(
                room=kv.room,
                bootstrap_port=self._bootstrap_port,
                prompt_tokens=kv.prompt_tokens,
                cached_tokens=kv.cached_tokens,
                first_token=kv.first_token,
                kv_bytes=len(kv.pages) * self.cfg.page_size * self.model_cfg.kv_bytes_per_token(),
            )
        )

    def _room_failed(self, room: int, message: str) -> None:
        if self._registry is not None:
            self._registry.fail(room, message)

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
            num_waiting_reqs=len(s.waiting) + len(self._pulls),  # PD decode: waiting for KV or pages
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
            elif op == "transfer":
                self._transfers.append(arg)
            elif op == "release":
                s.release_lent(arg)

    def _run_transfers(self) -> None:
        """PD decode (step thread): admit queued transfers in order while pages last, copy, start decoding."""
        s, pool = self.sched, self.pool
        assert s is not None and pool is not None and self._loop is not None
        while self._transfers:
            p = self._transfers[0]
            r = p.req
            if r.aborted:
                self._transfers.popleft()
                r.finished = True
                self._deliver(r, [], {"type": "abort", "message": "Abort request"})
                self._loop.call_soon_threadsafe(self._release_remote, p)
                continue
            if not s.admit_transferred(r):
                return  # no pages (or slots) now: retried after the next step frees some
            self._transfers.popleft()
            assert p.lent is not None and p.desc is not None and p.transport is not None
            try:
                t0 = time.perf_counter()
                nbytes = p.transport.transfer(p.desc, p.lent.pages, pool, s.prompt_pages(r))
                ms = (time.perf_counter() - t0) * 1e3
            except Exception as exc:  # a failed copy fails its request, never the thread
                log.exception("%s: KV transfer for room %s failed", self.name, p.room)
                s.drop_transferred(r)
                self._fail(r, EngineError(f"bootstrap room {p.room}: KV transfer failed: {exc}"))
                self._loop.call_soon_threadsafe(self._release_remote, p)
                continue
            self._loop.call_soon_threadsafe(self._release_remote, p)
            self._loop.call_soon_threadsafe(self._pulls.pop, id(r), None)
            self.transfer_log.append(TransferRecord(len(p.lent.pages), nbytes, p.transport.name, ms))
            first = p.lent.first_token if p.lent.first_token is not None else 0
            _, tok, fin = s.start_decoding(r, first)
            assert tok is not None
            self._deliver(r, [tok], {"type": "length", "length": r.max_new_tokens} if fin else None)

    def _run(self) -> None:
        stream = None
        if self.device.type == "cuda":
            # Engines sharing a GPU: a decode engine's kernels get the high-priority stream, so the block
            # scheduler runs them as soon as blocks of a running prefill kernel retire instead of after the
            # whole kernel (a decode step is ~350 small kernels; each would wait for a multi-ms prefill GEMM).
            high = self.cfg.high_priority_stream
            if high is None:
                high = self.mode == "decode"
            stream = torch.cuda.Stream(self.device, priority=-1 if high else 0)
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
            if self._transfers:
                self._run_transfers()
            step, gone = s.schedule()
            for r in gone:
                self._deliver(r, [], {"type": "abort", "message": "Abort request"})
                self._prefill_failed(r, "the prefill request was aborted")
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
                    self._prefill_failed(r, f"the prefill step failed: {exc}")
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
                if fin and id(r) in s.lent:
                    self._lend(r)
                self._deliver(r, [tok], finish)
            self._gen_window.append((time.monotonic(), n_new))
            self._publish(s.take_events())

    def _lend(self, r: Req) -> None:
        """PD prefill (step thread): the prompt's K/V is in the pool (the step's sampling synchronised)."""
        assert self.sched is not None and self._loop is not None and r.room is not None
        kv = LentKv(
            room=r.room,
            pool_id=self._pool_id or "",
            pages=tuple(self.sched.prompt_pages(r)),
            prompt_tokens=len(r.prompt),
            cached_tokens=r.cached_tokens,
            first_token=r.output[0] if r.output else None,
        )
        self._loop.call_soon_threadsafe(self._hand_over, r, kv)

    def _prefill_failed(self, r: Req, message: str) -> None:
        """PD prefill (step thread): a request that ends before lending fails its room's decode side."""
        if (
            self.mode == "prefill"
            and r.room is not None
            and self._loop is not None
            and id(r) not in (self.sched.lent if self.sched is not None else {})
        ):
            self._loop.call_soon_threadsafe(self._room_failed, r.room, message)

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

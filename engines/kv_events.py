"""Router-side KV-event subscriber: one zmq.asyncio SUB per worker, gap detection, replay or reset.

Each worker's stream is read by its own task. Messages are `[topic, seq (8 B BE), payload]`; `seq`
must grow by one. On a gap the missing batches are fetched from the worker's ROUTER replay endpoint
when one is known (DEALER, `[b"", start]` -> replies until the end marker; abandoned when the
worker stays silent for `replay_timeout`); when that is impossible or incomplete, the consumer is told
to forget the worker (`on_reset`) and rebuilds from the batches that follow. Decode errors are
counted, never fatal. Ready messages are drained and delivered, then the task yields, so a burst
cannot starve the loop.

Joining late: `add` replays the worker's buffered history (up to SGLang's `buffer_steps` batches)
before it returns, so a router that starts, or restarts, in front of a warm fleet knows what is
cached before it routes there, and the replay's cost is paid at registration rather than in the
middle of the first requests (it used to wait for the first live message, which on an idle fleet is
the first request's own prefill).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import zmq
import zmq.asyncio

from kvroute.cache_index.events import KvEventBatch, KvEventDecodeError, decode_batch

__all__ = ["KvEventSubscriber", "WorkerStreamStats", "resolve_endpoint"]

log = logging.getLogger(__name__)

_WILDCARD_HOSTS = frozenset({"*", "0.0.0.0", "::", "[::]", ""})


def resolve_endpoint(advertised: str, worker_host: str) -> str:
    """Replace a wildcard host in an advertised endpoint (`tcp://*:5557`, `tcp://0.0.0.0:5557`,
    `tcp://[::]:5557`) by the worker's host; other endpoints (and ipc/inproc) are returned unchanged."""
    if not advertised.startswith("tcp://"):
        return advertised
    hostport = advertised[len("tcp://") :]
    host, sep, port = hostport.rpartition(":")
    if not sep or host not in _WILDCARD_HOSTS:
        return advertised
    wh = worker_host.strip("[]")
    if ":" in wh:
        wh = f"[{wh}]"
    return f"tcp://{wh}:{port}"


def _bind(sock: zmq.asyncio.Socket, endpoint: str) -> None:
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        if exc.errno != zmq.EADDRNOTAVAIL or not endpoint.startswith("tcp://"):
            raise
        port = endpoint.rpartition(":")[2]
        log.info("kv events: %s is not an address of this host; binding tcp://*:%s", endpoint, port)
        sock.bind(f"tcp://*:{port}")


@dataclass
class WorkerStreamStats:
    """Per-worker counters for metrics. Times: `last_event_time` is time.monotonic(); `lag_s` is the
    router's wall clock minus the last batch's `ts` (engine clock), so clock skew shows up in it."""

    batches: int = 0
    events: int = 0
    gaps: int = 0
    """Sequence gaps seen (including a first message that is not seq 0)."""
    replays: int = 0
    """Gaps fully recovered through the replay endpoint."""
    replay_failures: int = 0
    replay_resumes: int = 0
    """Replays cut in the middle (lost replies) and asked again from the first missing batch."""
    resets: int = 0
    """Times `on_reset` was called (gap not recoverable, or the engine restarted at seq 0)."""
    duplicates: int = 0
    """Messages with an already delivered seq (also live messages already recovered by a replay)."""
    decode_errors: int = 0
    callback_errors: int = 0
    last_seq: int = -1
    last_event_time: float | None = None
    lag_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class _Stream:
    worker: str
    endpoint: str
    replay_endpoint: str | None
    topic: bytes
    sock: zmq.asyncio.Socket
    stats: WorkerStreamStats = field(default_factory=WorkerStreamStats)
    expected: int | None = None
    task: asyncio.Task[None] | None = None
    synced: asyncio.Event = field(default_factory=asyncio.Event)  # set once the initial replay is over
    history_lost: bool = False  # the initial replay failed: follow from the live stream, do not retry it
    # The lowest seq that may legitimately arrive again: the live batch that triggered the last replay
    # (the replay may have delivered it and later ones, which then also arrive live). Earlier seqs were
    # read before that batch, so one arriving again is a restarted engine's, not a duplicate. None: no
    # replay yet, so only a repeat of the last batch is taken for a duplicate.
    dup_floor: int | None = None


class _Gap(Exception):
    pass


class _ReplayCut(_Gap):
    """The replay lost batches in the middle (SGLang's ROUTER drops replies it cannot queue)."""


class KvEventSubscriber:
    """Subscribes to the KV-event streams of many workers and hands decoded batches to `on_batch`.

    Invariants: for each worker, `on_batch` sees batches in strictly increasing seq order; whenever
    a batch may have been lost and could not be replayed, `on_reset(worker)` is called before the
    next delivered batch. Callbacks run on the event loop and must not block; their exceptions are
    logged and counted, never stop the stream.
    """

    def __init__(
        self,
        on_batch: Callable[[str, KvEventBatch], None],
        on_reset: Callable[[str], None],
        *,
        replay_timeout: float = 2.0,
        replay_attempts: int = 8,
        max_drain: int = 256,
        ctx: zmq.asyncio.Context | None = None,
    ) -> None:
        self._on_batch = on_batch
        self._on_reset = on_reset
        self._replay_timeout = replay_timeout
        self._replay_attempts = replay_attempts
        self._max_drain = max_drain
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._streams: dict[str, _Stream] = {}

    @property
    def workers(self) -> list[str]:
        return list(self._streams)

    async def add(
        self,
        worker: str,
        endpoint: str,
        *,
        replay_endpoint: str | None = None,
        topic: str = "",
        bind: bool = False,
    ) -> None:
        """Start following `worker`'s stream (replacing any previous subscription of that worker).

        `bind`: the publisher connects to `endpoint` (SGLang does for an endpoint naming a concrete
        address), so the SUB binds it; an address this host does not have is bound on every interface
        (`tcp://*:PORT`) instead. Returns once the worker's buffered history has been replayed into
        `on_batch` (or the replay failed, or there is no replay endpoint): bounded by `replay_timeout`
        of silence.
        """
        if worker in self._streams:
            await self.remove(worker)
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        monitor: zmq.asyncio.Socket | None = None
        try:
            sock.setsockopt(zmq.SUBSCRIBE, topic.encode("utf-8"))
            if bind:
                monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
                _bind(sock, endpoint)
            else:
                sock.connect(endpoint)
        except zmq.ZMQError:
            if monitor is not None:
                sock.disable_monitor()
                monitor.close(linger=0)
            sock.close(linger=0)
            raise
        if monitor is not None:
            await self._await_publisher(worker, endpoint, sock, monitor)
        st = _Stream(worker, endpoint, replay_endpoint, topic.encode("utf-8"), sock)
        st.task = asyncio.get_running_loop().create_task(self._run(st), name=f"kv-events:{worker}")
        self._streams[worker] = st
        synced = asyncio.ensure_future(st.synced.wait())
        try:
            await asyncio.wait((synced, st.task), return_when=asyncio.FIRST_COMPLETED)
        finally:
            synced.cancel()

    async def _await_publisher(
        self, worker: str, endpoint: str, sock: zmq.asyncio.Socket, monitor: zmq.asyncio.Socket
    ) -> None:
        """A bound SUB hears nothing until the engine's PUB (re)connects, up to its reconnect interval
        later, and a PUB drops what it sends before that: wait (at most `replay_timeout`) for the
        publisher's handshake, so the worker turns healthy with its stream live."""
        try:
            async with asyncio.timeout(self._replay_timeout):
                await monitor.recv_multipart()
        except TimeoutError:
            log.info("kv events of %s: no publisher connected to %s yet", worker, endpoint)
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)

    async def remove(self, worker: str) -> None:
        st = self._streams.pop(worker, None)
        if st is None:
            return
        if st.task is not None:
            st.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await st.task
        st.sock.close(linger=0)

    async def close(self) -> None:
        for w in list(self._streams):
            await self.remove(w)

    def stats(self, worker: str) -> dict[str, Any]:
        """Counters of `worker` (KeyError if not subscribed)."""
        return self._streams[worker].stats.as_dict()

    # --- receive loop -------------------------------------------------------------------------

    async def _run(self, st: _Stream) -> None:
        sock = st.sock
        # A plain (non-asyncio) view of the same socket for the drain: a NOBLOCK recv on it costs no
        # future and none of zmq.asyncio's poller bookkeeping (~5% of the router's CPU under load).
        # Not closed here: a shadow does not own the socket.
        drain: zmq.Socket[bytes] = zmq.Socket.shadow(sock.underlying)
        try:
            if st.replay_endpoint is not None:
                # the history buffered before we joined; live messages queue meanwhile
                st.history_lost = not await self._recover(st, 0, 0)
        finally:
            st.synced.set()
        while True:
            try:
                frames = await sock.recv_multipart()
            except zmq.ZMQError:
                log.warning("kv events of %s: socket closed", st.worker)
                return
            if not self._on_message_in_order(st, frames):
                await self._on_message(st, frames)
            n = 1
            while n < self._max_drain:  # drain what is already queued, without waiting
                try:
                    frames = drain.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                except zmq.ZMQError:
                    log.warning("kv events of %s: socket closed", st.worker)
                    return
                if not self._on_message_in_order(st, frames):
                    await self._on_message(st, frames)
                n += 1
            await asyncio.sleep(0)  # let other tasks run between bursts

    def _on_message_in_order(self, st: _Stream, frames: list[bytes]) -> bool:
        """Deliver the common case (the expected seq) without a coroutine; False: `_on_message` decides."""
        if len(frames) != 3 or len(frames[1]) != 8:
            return False
        seq = int.from_bytes(frames[1], "big")
        if st.expected is None or seq != st.expected:
            return False
        self._deliver(st, seq, frames[2])
        return True

    async def _on_message(self, st: _Stream, frames: list[bytes]) -> None:
        if len(frames) != 3 or len(frames[1]) != 8:
            st.stats.decode_errors += 1
            return
        seq = int.from_bytes(frames[1], "big")
        exp = st.expected
        if exp is None:
            # Missed the stream's first batches (a slow join): fetch them, unless the full replay at
            # subscription already failed; retrying it on every first message would be a replay storm.
            if seq != 0 and not st.history_lost:
                st.stats.gaps += 1
                await self._recover(st, 0, seq)
        elif seq < exp:
            dup = seq == exp - 1 or (st.dup_floor is not None and seq >= st.dup_floor)
            if seq == 0 or not dup:
                # The engine restarted behind the same URL: its cache is new. Its first batch we see may
                # not be seq 0 (a subscriber joins late, the PUB drops): forget the worker's blocks and
                # fetch the new stream's start by replay when it has one.
                self._reset(st)
                st.dup_floor = None
                if seq != 0:
                    st.stats.gaps += 1
                    await self._recover(st, 0, seq)
            else:
                st.stats.duplicates += 1
                return
        elif seq > exp:
            st.stats.gaps += 1
            await self._recover(st, exp, seq)
        if st.expected is not None and seq < st.expected:
            st.stats.duplicates += 1  # covered by the replay
            return
        self._deliver(st, seq, frames[2])

    def _deliver(self, st: _Stream, seq: int, payload: bytes) -> None:
        st.expected = seq + 1
        s = st.stats
        s.last_seq = seq
        try:
            batch = decode_batch(payload)
        except KvEventDecodeError as exc:
            s.decode_errors += 1
            log.debug("kv events of %s: seq %d undecodable: %s", st.worker, seq, exc)
            return
        s.batches += 1
        s.events += len(batch.events)
        s.last_event_time = time.monotonic()
        s.lag_s = time.time() - batch.ts
        try:
            self._on_batch(st.worker, batch)
        except Exception:
            s.callback_errors += 1
            log.exception("kv events of %s: on_batch failed", st.worker)

    def _reset(self, st: _Stream) -> None:
        st.stats.resets += 1
        st.expected = None
        try:
            self._on_reset(st.worker)
        except Exception:
            st.stats.callback_errors += 1
            log.exception("kv events of %s: on_reset failed", st.worker)

    async def _recover(self, st: _Stream, start: int, seen: int) -> bool:
        """Fill [start, seen) by replay if possible (True); else reset so the consumer forgets the
        worker (False)."""
        st.dup_floor = seen
        if st.replay_endpoint is not None:
            attempts = self._replay_attempts
            while True:
                before = st.expected
                try:
                    await self._replay(st, start, seen)
                    st.stats.replays += 1
                    return True
                except (TimeoutError, _ReplayCut) as exc:
                    # A cut after progress (or silence where the end marker should be): ask again from
                    # the first batch still missing; each attempt keeps what it delivered.
                    attempts -= 1
                    if st.expected is not None and st.expected != before and attempts > 0:
                        st.stats.replay_resumes += 1
                        start = st.expected
                        continue
                    err: Exception = exc
                except (_Gap, zmq.ZMQError) as exc:
                    err = exc
                st.stats.replay_failures += 1
                log.warning("kv events of %s: replay from %d failed (%r); resetting", st.worker, start, err)
                break
        # Nothing was replayed (no replay endpoint, or it failed): the stream is followed live from `seen`,
        # so no earlier seq can legitimately arrive again; one that does is a restarted engine's.
        st.dup_floor = None
        self._reset(st)
        return False

    async def _replay(self, st: _Stream, start: int, seen: int) -> None:
        """Ask for every batch >= start and deliver them; raise _Gap if [start, seen) is incomplete.

        TimeoutError when the worker is silent for `replay_timeout` (an idle timeout: a long replay
        that keeps flowing is not cut). A fresh DEALER per replay: a late answer to an abandoned
        request cannot be mistaken for the next one.
        """
        assert st.replay_endpoint is not None
        initial = st.expected is None
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        # SGLang answers a replay from its publisher thread in one tight loop on a ROUTER socket, which
        # drops what exceeds the pipe's high-water marks (1,000 + 1,000 messages by default) instead of
        # blocking: with a bounded receive queue, a 10,000-batch replay loses batches (and its end
        # marker) whenever we decode slower than it sends. Unbounded here; a replay is at most
        # `buffer_steps` batches.
        dealer.setsockopt(zmq.RCVHWM, 0)
        try:
            dealer.connect(st.replay_endpoint)
            await dealer.send_multipart((b"", start.to_bytes(8, "big")))
            first = True
            n = 0
            while True:
                async with asyncio.timeout(self._replay_timeout):
                    frames = await dealer.recv_multipart()
                # 0.5.10: [b"", seq, payload]; 0.5.23: [b"", topic, seq, payload]
                if len(frames) == 3:
                    seq_b, payload = frames[1], frames[2]
                elif len(frames) == 4:
                    seq_b, payload = frames[2], frames[3]
                else:
                    raise _Gap(f"bad replay reply of {len(frames)} frames")
                if len(seq_b) != 8:
                    raise _Gap("bad replay seq frame")
                seq = int.from_bytes(seq_b, "big", signed=True)
                if seq < 0:
                    break
                exp = st.expected
                if first:
                    first = False
                    # The buffer no longer holds what we missed. On a first subscription nothing
                    # was known before, so whatever history is buffered is still worth applying.
                    if seq > start and not initial:
                        raise _Gap(f"replay starts at {seq}, wanted {start}")
                if exp is not None and seq < exp:
                    continue
                if exp is not None and seq > exp:
                    raise _ReplayCut(f"replay skipped from {exp} to {seq}")
                self._deliver(st, seq, payload)
                n += 1
                if n % self._max_drain == 0:
                    await asyncio.sleep(0)
            if (st.expected is None or st.expected < seen) and not initial:
                raise _Gap(f"replay ended before {seen}")
        finally:
            dealer.close(linger=0)

"""Engine-side KV-event publisher that puts exactly SGLang's bytes on the wire (used by the simulated engine).

Mirrors `sglang/srt/disaggregation/kv_events.py` `ZmqEventPublisher` of 0.5.10.post1 (`form="array"`) and
0.5.23 (`form="map"`): PUB frames `[topic, seq (8 B big-endian, from 0), msgpack batch]`, an optional ROUTER
replay socket, a buffer of the last `buffer_steps` batches, and SGLang's SHA-256 page hashes. Unlike
SGLang's thread, everything runs on the caller's asyncio loop: PUB sends are non-blocking (a PUB socket
drops at its high-water mark instead of blocking) and replay is served by an asyncio task, so many
publishers share one loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import sys
import time
from array import array
from collections import deque
from collections.abc import Sequence
from typing import Any, Final, Literal

import msgspec
import zmq
import zmq.asyncio

from kvroute.cache_index.events import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent

__all__ = ["KvEventPublisher", "PublisherForm", "ReplayForm", "sglang_page_hash", "should_bind"]

log = logging.getLogger(__name__)

PublisherForm = Literal["array", "map"]
ReplayForm = Literal["0.5.10", "0.5.23"]
END_SEQ: Final = (-1).to_bytes(8, "big", signed=True)


def sglang_page_hash(token_ids: Sequence[int], prior_hex: str | None = None) -> tuple[str, int]:
    """SGLang's page hash: (hex digest, event value).

    SHA-256 over the parent page's digest bytes (when there is a parent) then every token as u32
    little-endian (`hicache_storage.get_hash_str`); the event carries the first 16 hex chars as a
    signed int64 (`hash_str_to_int64`). Chain pages by passing the previous page's hex digest.
    """
    h = hashlib.sha256()
    if prior_hex:
        h.update(bytes.fromhex(prior_hex))
    words = array("I", token_ids)  # 4-byte unsigned on every platform CPython supports here
    if sys.byteorder == "big":
        words.byteswap()
    h.update(words.tobytes())
    hex_digest = h.hexdigest()
    value = int(hex_digest[:16], 16)
    return hex_digest, value - 2**64 if value >= 2**63 else value


def should_bind(endpoint: str) -> bool:
    """SGLang's rule (0.5.23, a superset of 0.5.10's): bind wildcard, IPC and inproc addresses, else
    connect; kvroute also binds port 0 (an ephemeral port can only be bound)."""
    return (
        "*" in endpoint
        or "::" in endpoint
        or "0.0.0.0" in endpoint
        or endpoint.startswith(("ipc://", "inproc://"))
        or endpoint.endswith(":0")
    )


# --- wire mirrors: same field order and struct options as SGLang's classes ----------------------


class _ArrBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):  # 0.5.10 EventBatch
    ts: float
    events: list[Any]
    attn_dp_rank: int | None = None


class _ArrEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class _ArrStored(_ArrEvent, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None = None


class _ArrRemoved(_ArrEvent, tag="BlockRemoved"):
    block_hashes: list[int]
    medium: str | None = None


class _ArrCleared(_ArrEvent, tag="AllBlocksCleared"):
    pass


class _MapBatch(msgspec.Struct, array_like=True, gc=False):  # 0.5.23 EventBatch
    ts: float
    events: list[Any]
    attn_dp_rank: int | None = None


class _MapEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class _MapStored(_MapEvent, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None = None
    cache_salt: str | None = None
    session_id: str | None = None
    lora_name: str | None = None


class _MapRemoved(_MapEvent, tag="BlockRemoved"):
    block_hashes: list[int]
    medium: str | None = None


class _MapCleared(_MapEvent, tag="AllBlocksCleared"):
    pass


def _to_wire(ev: KvEvent, form: PublisherForm) -> msgspec.Struct:
    if isinstance(ev, BlockStored):
        if form == "array":
            return _ArrStored(list(ev.block_hashes), ev.parent_block_hash, list(ev.token_ids),
                              ev.block_size, ev.lora_id, ev.medium)  # fmt: skip
        return _MapStored(list(ev.block_hashes), ev.parent_block_hash, list(ev.token_ids), ev.block_size,
                          ev.lora_id, ev.medium, ev.cache_salt, None, ev.lora_name)  # fmt: skip
    if isinstance(ev, BlockRemoved):
        return (_ArrRemoved if form == "array" else _MapRemoved)(list(ev.block_hashes), ev.medium)
    if isinstance(ev, AllBlocksCleared):
        return _ArrCleared() if form == "array" else _MapCleared()
    raise TypeError(f"not a KV event: {ev!r}")


class KvEventPublisher:
    """One engine's (one DP rank's) KV-event stream.

    Invariants: seq starts at 0 and grows by 1 per `publish`, whether or not anyone received it; the
    replay buffer holds the last `buffer_steps` (seq, payload) pairs exactly as sent; a replay answers
    every buffered seq >= the requested start, in order, then the end marker.
    `replay_form` picks the replay reply shape (defaults to the form's SGLang version: array -> 0.5.10
    `[b"", seq, payload]`, map -> 0.5.23 `[b"", topic, seq, payload]`). `attn_dp_rank` is stamped in
    every batch as SGLang's publisher does (0 for a single rank; None omits it in the array form).
    """

    def __init__(
        self,
        endpoint: str,
        *,
        replay_endpoint: str | None = None,
        topic: str = "",
        form: PublisherForm = "array",
        replay_form: ReplayForm | None = None,
        buffer_steps: int = 10_000,
        hwm: int = 100_000,
        attn_dp_rank: int | None = 0,
        bind: bool | None = None,
        ctx: zmq.asyncio.Context | None = None,
    ) -> None:
        if form not in ("array", "map"):
            raise ValueError(f"form must be 'array' or 'map', got {form!r}")
        self._endpoint_cfg = endpoint
        self._replay_cfg = replay_endpoint
        self._topic = topic.encode("utf-8")
        self._form: PublisherForm = form
        self._replay_form: ReplayForm = replay_form or ("0.5.10" if form == "array" else "0.5.23")
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._hwm = hwm
        self._dp_rank = attn_dp_rank
        self._bind = should_bind(endpoint) if bind is None else bind
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._encoder = msgspec.msgpack.Encoder()
        self._batch_type = _ArrBatch if form == "array" else _MapBatch
        self._seq = 0
        self._pub: zmq.Socket[bytes] | None = None
        self._replay: zmq.asyncio.Socket | None = None
        self._replay_task: asyncio.Task[None] | None = None
        self._endpoint = endpoint
        self._replay_endpoint = replay_endpoint

    @property
    def endpoint(self) -> str:
        """The PUB address: the bound one (real port) when bound, else the one connected to."""
        return self._endpoint

    @property
    def replay_endpoint(self) -> str | None:
        return self._replay_endpoint

    @property
    def next_seq(self) -> int:
        return self._seq

    async def start(self) -> None:
        """Open the sockets and start serving replays."""
        if self._pub is not None:
            return
        # A plain (synchronous) PUB socket sharing the asyncio context: a PUB send never blocks.
        pub: zmq.Socket[bytes] = zmq.Socket(self._ctx, zmq.PUB)
        pub.setsockopt(zmq.SNDHWM, self._hwm)
        pub.setsockopt(zmq.LINGER, 0)
        try:
            if self._bind:
                pub.bind(self._endpoint_cfg)
                self._endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
            else:
                pub.connect(self._endpoint_cfg)
        except zmq.ZMQError:
            pub.close(linger=0)
            raise
        self._pub = pub
        if self._replay_cfg is not None:
            rep = self._ctx.socket(zmq.ROUTER)
            rep.setsockopt(zmq.LINGER, 0)
            try:
                rep.bind(self._replay_cfg)
            except zmq.ZMQError:
                rep.close(linger=0)
                await self.close()
                raise
            self._replay_endpoint = rep.getsockopt_string(zmq.LAST_ENDPOINT)
            self._replay = rep
            self._replay_task = asyncio.get_running_loop().create_task(self._serve_replay())

    def encode(self, events: Sequence[KvEvent], ts: float | None = None) -> bytes:
        """The msgpack payload SGLang would send for `events` (one batch)."""
        wire = [_to_wire(ev, self._form) for ev in events]
        batch = self._batch_type(time.time() if ts is None else ts, wire, self._dp_rank)
        return self._encoder.encode(batch)

    def publish(self, events: Sequence[KvEvent]) -> int:
        """Send one batch now (never blocks the loop); returns its seq."""
        if self._pub is None:
            raise RuntimeError("publisher not started (or closed)")
        payload = self.encode(events)
        seq = self._seq
        self._seq += 1
        self._send((self._topic, seq.to_bytes(8, "big"), payload))
        self._buffer.append((seq, payload))
        return seq

    def _send(self, frames: tuple[bytes, bytes, bytes]) -> None:
        """One PUB send; a seam where tests simulate messages lost at the high-water mark."""
        assert self._pub is not None
        try:
            self._pub.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:  # only for a connect-style PUB with no peer yet: lost, as in SGLang
            pass

    async def _serve_replay(self) -> None:
        assert self._replay is not None
        sock = self._replay
        while True:
            try:
                frames = await sock.recv_multipart()
            except zmq.ZMQError:
                return  # socket closed
            if len(frames) != 3 or len(frames[2]) != 8:
                log.warning("invalid replay request: %d frames", len(frames))
                continue
            client, _, start_b = frames
            start = int.from_bytes(start_b, "big")
            # Snapshot first: publish() may append while we await sends.
            items = [(s, p) for s, p in self._buffer if s >= start]
            for n, (s, p) in enumerate(items, 1):
                if self._replay_form == "0.5.10":
                    await sock.send_multipart((client, b"", s.to_bytes(8, "big"), p))
                else:
                    await sock.send_multipart((client, b"", self._topic, s.to_bytes(8, "big"), p))
                if n % 256 == 0:
                    await asyncio.sleep(0)  # a 10,000-batch replay must not stall the other engines
            if self._replay_form == "0.5.10":
                await sock.send_multipart((client, b"", END_SEQ, b""))
            else:
                await sock.send_multipart((client, b"", b"", END_SEQ, b""))

    async def close(self) -> None:
        """Stop replay and close the sockets (the shared context stays open)."""
        if self._replay_task is not None:
            self._replay_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replay_task
            self._replay_task = None
        if self._replay is not None:
            self._replay.close(linger=0)
            self._replay = None
        if self._pub is not None:
            self._pub.close(linger=0)
            self._pub = None

    async def __aenter__(self) -> KvEventPublisher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

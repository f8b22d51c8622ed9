"""Prompts in flight, shared between replicas as they are routed (kv_aware's burst prediction).

Why: in a burst of requests sharing a new prefix, no engine has published the prefix yet; a replica
predicts it from the prompts it has routed itself (`kvroute.router.load.InflightIndex`). With several replicas
(or `serve --processes N`) each sees only its share of the burst and sends followers of one prefix to
several workers: measured on 16 shared 8k contexts at 64 req/s, owner affinity fell from 93-96% with one
process to 82-87% with two, and TTFT p99 rose from 0.33 s to 0.50-0.70 s.

Each routing decision's (worker, block hashes, prompt tokens) is batched for `flush_s` (20 ms) and
published on the pub/sub channel `{prefix}:inflight`. The other replicas hold those blocks as in flight on
that worker for `ttl_s`, by which time the engine's own KV events have normally taken over, and count the
request and its uncached prompt in that worker's load until their next load sync brings the sender's own
figures. Pub/sub is lossy on a reconnect, which is acceptable here: a lost record only means a prediction
the router would not have had anyway. Not used for cache_aware (its records are learned, not predicted:
router/shared/records.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis

from kvroute.cache_index.hashing import BlockHash
from kvroute.router.shared.common import (
    REDIS_ERRORS,
    Backoff,
    Keys,
    Outage,
    ReplicaConfig,
    cancel_and_wait,
    listen_forever,
)
from kvroute.router.shared.load_sync import LoadVector, RemoteLoadFolder
from kvroute.router.types import RoutingRequest, Worker

log = logging.getLogger("kvroute.replicas")

InflightSink = Callable[[str, Sequence[BlockHash], int], None]  # (worker url, block hashes, prompt tokens)


class InflightShare:
    """Publishes this replica's routed prompts in small batches and applies the other replicas'."""

    def __init__(
        self,
        client: aioredis.Redis,
        sink: InflightSink,
        config: ReplicaConfig,
        replica_id: str,
        *,
        flush_s: float = 0.02,
        max_buffer: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.sink = sink
        self.replica_id = replica_id
        self.channel = Keys(config.key_prefix).inflight_channel
        self.flush_s = flush_s
        self._buffer: deque[tuple[str, Sequence[BlockHash], int]] = deque(maxlen=max_buffer)
        self._clock = clock
        self._refresh_s = config.inflight_ttl_s / 2
        self._recent: dict[tuple[str, BlockHash], float] = {}  # (worker, last block) -> last published
        self._max_recent = 50_000
        self._wake = asyncio.Event()
        self._backoff = Backoff(config.sync_interval_s, config.reconnect_max_s)
        self._tasks: list[asyncio.Task[None]] = []
        self.ready = asyncio.Event()  # subscribed (records published from now on reach us)
        self._outage = Outage(replica_id, "in-flight channel")
        self.published = 0  # records sent
        self.applied = 0  # records from other replicas held as in flight here

    def on_routed(self, request: RoutingRequest, worker: Worker) -> None:
        """`Router.routed_hooks` entry: queue the prompt's blocks (sync, no I/O). A prompt published to
        the same worker within the last `ttl_s / 2` is not sent again: the others still hold it."""
        hashes = request.block_hashes
        if not hashes:
            return
        now = self._clock()
        key = (worker.url, hashes[-1])  # chained hashes: the last block names the whole prompt
        last = self._recent.get(key)
        if last is not None and now - last < self._refresh_s:
            return
        if len(self._recent) >= self._max_recent:
            self._recent = {k: t for k, t in self._recent.items() if now - t < self._refresh_s}
        self._recent[key] = now
        self._buffer.append((worker.url, hashes, request.prompt_tokens))
        self._wake.set()

    def start(self) -> None:
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._publish_loop(), name=f"kvroute-inflight-pub {self.replica_id}"),
                asyncio.create_task(self._receive_loop(), name=f"kvroute-inflight-sub {self.replica_id}"),
            ]

    async def close(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks = []

    async def _publish_loop(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(self.flush_s)  # gather what this burst routes in the next few ms
            self._wake.clear()
            batch = list(self._buffer)
            if not batch:
                continue
            msg = orjson.dumps({"o": self.replica_id, "r": batch})
            try:
                await self.client.publish(self.channel, msg)
            except REDIS_ERRORS as exc:
                self._outage.lost(exc)
                self._wake.set()  # keep the records (bounded buffer) and try again after a pause
                await asyncio.sleep(self._backoff.next())
                continue
            for _ in batch:  # sent: drop exactly those (records queued meanwhile stay)
                self._buffer.popleft()
            self.published += len(batch)

    async def _receive_loop(self) -> None:
        await listen_forever(
            self.client, self.channel, self._on_message, self._subscribed, self._outage, self._backoff
        )

    @property
    def degraded(self) -> bool:
        return self._outage.degraded

    async def _subscribed(self) -> None:
        self.ready.set()

    async def _on_message(self, raw: str) -> None:
        self._apply(raw)

    def _apply(self, raw: str | bytes) -> None:
        try:
            msg: Any = orjson.loads(raw)
            if msg["o"] == self.replica_id:
                return
            sink = self.sink
            for url, hashes, prompt_tokens in msg["r"]:
                if not isinstance(hashes, list) or not isinstance(prompt_tokens, int):
                    raise TypeError("expected [url, [block hashes], prompt tokens]")
                sink(url, hashes, prompt_tokens)  # orjson's ints as they are (BlockHash is an int)
                self.applied += 1
        except (orjson.JSONDecodeError, KeyError, ValueError, TypeError):
            log.warning("replica %s: ignoring malformed in-flight message", self.replica_id)


def inflight_sink(router: Any, ttl_s: float, folder: RemoteLoadFolder | None = None) -> InflightSink:
    """Holds another replica's prompt as in flight on a worker this replica knows, for `ttl_s`; with
    `folder`, also counts the request and its uncached prompt in the worker's load until the next load
    sync (a burst's cold prefills would otherwise look free for up to `sync_interval_s`)."""

    def sink(url: str, block_hashes: Sequence[BlockHash], prompt_tokens: int) -> None:
        worker = router.get_worker(url)
        if worker is None:
            return
        if folder is not None and prompt_tokens > 0:
            cached = router.overlap(url, block_hashes) * router.block_size  # as the sender computed it
            folder.add_transient(worker, LoadVector(1, max(0, prompt_tokens - cached), 0))
        router.load.inflight.add_for(url, block_hashes, ttl_s)

    return sink

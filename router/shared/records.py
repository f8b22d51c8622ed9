"""Sharing the approximate (`cache_aware`) index between replicas through one capped Redis stream.

Why: `cache_aware` learns which worker holds a prefix only from its own routing decisions, so replicas
behind a balancer would each learn a different map and send one prefix to several workers. Each
replica appends its routing records (worker, prompt block hashes) to a stream and records the others'
into its own index, so all converge on one placement. Replicas fed by KV events do not need this.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis

from kvroute.cache_index.hashing import BlockHash
from kvroute.router.shared.common import REDIS_ERRORS, Backoff, ReplicaConfig, cancel_and_wait, sync_forever

log = logging.getLogger("kvroute.replicas")

RecordSink = Callable[[str, Sequence[BlockHash]], None]


class RoutingRecordShare:
    """Appends this replica's routing records to `{prefix}:records` and applies the other replicas'.

    Invariants: one round trip per interval (XADD of the batch plus XREAD of what is new); the stream is
    capped at about `max_entries` batches (XADD MAXLEN ~); records wait in a buffer of at most
    `max_buffer` (oldest dropped) while Redis is away; own entries are skipped on read (origin field).
    A replica starting (or reconnecting) replays what the capped stream still holds, so it warms up.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        sink: RecordSink,
        config: ReplicaConfig,
        replica_id: str,
        *,
        max_entries: int = 10_000,
        max_buffer: int = 10_000,
        read_count: int = 500,
    ) -> None:
        self.client = client
        self.sink = sink
        self.config = config
        self.replica_id = replica_id
        self.key = f"{config.key_prefix}:records"
        self.max_entries = max_entries
        self.read_count = read_count
        self._buffer: deque[tuple[str, list[int]]] = deque(maxlen=max_buffer)
        self._last_id = "0-0"  # replay the capped stream on start
        self._backoff = Backoff(config.sync_interval_s, config.reconnect_max_s)
        self._task: asyncio.Task[None] | None = None
        self.degraded = False
        self.applied = 0  # records from other replicas recorded into our index

    def record(self, url: str, block_hashes: Sequence[BlockHash]) -> None:
        """Hook for `Router.on_routed`: queue one record (sync, O(prompt blocks), no I/O)."""
        if block_hashes:
            self._buffer.append((url, list(block_hashes)))

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"kvroute-records {self.replica_id}")

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None

    async def sync_once(self) -> bool:
        batch = list(self._buffer)
        try:
            async with self.client.pipeline(transaction=False) as p:
                if batch:
                    p.xadd(
                        self.key,
                        {"o": self.replica_id, "r": json.dumps(batch, separators=(",", ":"))},
                        maxlen=self.max_entries,
                        approximate=True,
                    )
                p.xread({self.key: self._last_id}, count=self.read_count)
                replies = await p.execute()
        except REDIS_ERRORS as exc:
            if not self.degraded:
                self.degraded = True
                log.warning("replica %s: record stream unavailable (%s)", self.replica_id, exc)
            return False
        for _ in batch:  # sent: drop exactly those (records queued meanwhile stay)
            self._buffer.popleft()
        self._apply(replies[-1])
        self._backoff.reset()
        self.degraded = False
        return True

    def _apply(self, reply: Any) -> None:
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                self._last_id = entry_id
                if fields.get("o") == self.replica_id:
                    continue
                try:
                    records = json.loads(fields["r"])
                    for url, hashes in records:
                        self.sink(str(url), [BlockHash(int(h)) for h in hashes])
                        self.applied += 1
                except (KeyError, ValueError, TypeError):
                    log.warning("replica %s: ignoring malformed record entry %s", self.replica_id, entry_id)

    async def _run(self) -> None:
        interval = self.config.sync_interval_s
        await sync_forever(self.sync_once, interval, self._backoff, self.replica_id, "record sync")


def cache_aware_sink(router: Any) -> RecordSink:
    """Records into the router's current policy's approximate index when it has one (cache_aware),
    for workers this replica knows; a no-op otherwise (kv_aware learns from events instead)."""

    def sink(url: str, block_hashes: Sequence[BlockHash]) -> None:
        index = getattr(router.policy, "index", None)
        if index is not None and hasattr(index, "record") and router.get_worker(url) is not None:
            index.record(url, block_hashes)

    return sink

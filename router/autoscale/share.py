"""Replicas' observations summed: behind an L4 balancer each replica serves a share of the traffic, so the
replica that acts (the lease holder) must plan for every replica's window, not its own.

Each replica writes its window's summary (rate, the fast-up rate, request count and the mean lengths,
hit ratio, TTFT and ITL) into one Redis hash (`{prefix}:autoscale:observations`, field = replica id)
every interval; the acting replica reads the hash and combines the fresh entries: rates add up, means
are weighted by each replica's finished requests. An entry older than `max_age_s` (a replica gone) is
ignored. One round trip each way per interval.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from kvroute.router.planner import ObservedLoad


@dataclass(frozen=True)
class Observation:
    """One replica's window: its load (means over its `requests` finished requests) at wall time `at`."""

    load: ObservedLoad
    requests: int
    at: float

    def encode(self) -> str:
        load = dataclasses.asdict(self.load)
        del load["prompt_samples"]  # the leader models the queue with its own samples: keep Redis small
        return json.dumps({"load": load, "requests": self.requests, "at": self.at})

    @staticmethod
    def decode(raw: str) -> Observation | None:
        try:
            d = json.loads(raw)
            return Observation(ObservedLoad(**d["load"]), int(d["requests"]), float(d["at"]))
        except (ValueError, KeyError, TypeError):
            return None


def _weighted(pairs: Sequence[tuple[float | None, float]]) -> float | None:
    num = sum(v * w for v, w in pairs if v is not None)
    den = sum(w for v, w in pairs if v is not None)
    return num / den if den > 0 else None


def combine(
    parts: Sequence[Observation], current_prefill: int | None, current_decode: int | None
) -> ObservedLoad:
    """The fleet's load from every replica's: rates summed, means weighted by finished requests."""
    n = [max(1, p.requests) if p.load.prompt_tokens or p.load.output_tokens else 0 for p in parts]
    prompt = _weighted([(p.load.prompt_tokens, w) for p, w in zip(parts, n, strict=True)]) or 0.0
    output = _weighted([(p.load.output_tokens, w) for p, w in zip(parts, n, strict=True)]) or 0.0
    hit = _weighted(
        [(p.load.cache_hit_ratio, w * p.load.prompt_tokens) for p, w in zip(parts, n, strict=True)]
    )
    return ObservedLoad(
        request_rate=sum(p.load.request_rate for p in parts),
        prompt_tokens=prompt,
        output_tokens=output,
        cache_hit_ratio=min(1.0, max(0.0, hit or 0.0)),
        measured_ttft_s=_weighted([(p.load.measured_ttft_s, w) for p, w in zip(parts, n, strict=True)]),
        measured_itl_s=_weighted([(p.load.measured_itl_s, w) for p, w in zip(parts, n, strict=True)]),
        arrival_burstiness=_weighted([(p.load.arrival_burstiness, p.load.request_rate) for p in parts])
        or 1.0,
        current_prefill=current_prefill,
        current_decode=current_decode,
        prompt_samples=parts[0].load.prompt_samples if parts else (),
        # paired with those samples (the same requests): this replica's own measurement
        measured_prefill_s=parts[0].load.measured_prefill_s if parts else None,
    )


class ObservationShare:
    def __init__(
        self,
        client: aioredis.Redis,
        key: str,
        replica_id: str,
        max_age_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.key = key
        self.replica_id = replica_id
        self.max_age_s = max_age_s
        self.clock = clock
        self.replicas_seen = 1

    async def publish(self, load: ObservedLoad, requests: int) -> None:
        """Write this replica's window (errors propagate: the caller logs and carries on)."""
        obs = Observation(load, requests, self.clock())
        pipe: Any = self.client.pipeline(transaction=False)
        pipe.hset(self.key, self.replica_id, obs.encode())
        pipe.pexpire(self.key, int(self.max_age_s * 3000))
        await pipe.execute()

    async def fleet_load(self, own: ObservedLoad, requests: int) -> ObservedLoad:
        """Every fresh replica's window combined with `own` (this replica's, read just now)."""
        raw: Any = await self.client.hgetall(self.key)
        now = self.clock()
        parts = [Observation(own, requests, now)]
        for rid, value in raw.items():
            if str(rid) == self.replica_id:
                continue
            obs = Observation.decode(str(value))
            if obs is not None and now - obs.at <= self.max_age_s:
                parts.append(obs)
        self.replicas_seen = len(parts)
        return combine(parts, own.current_prefill, own.current_decode)

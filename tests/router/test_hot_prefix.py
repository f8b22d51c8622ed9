"""Hot-prefix replication: under load the hot prefix spreads to more workers because the queue on its
holders costs more than copying it (kv_aware's own cost, no threshold); when traffic falls it stops.

A small engine model drives the library: each worker prefills its queue first-come first-served at
`RATE` blocks per tick, reports the prompt's pages by KV events once prefilled (with the first token),
and finishes the request after `DECODE_TICKS` ticks.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from kvroute import Router
from kvroute.cache_index.events import BlockStored, KvEventBatch
from kvroute.router.load import Ticket
from kvroute.router.types import Worker, WorkerState

BS = 16
RATE = 6.0  # blocks of prefill per worker per tick
DECODE_TICKS = 4
SYSTEM = [((i * 7919) % 251) + 1 for i in range(32 * BS)]  # the hot prefix: 32 blocks


@dataclass
class Engine:
    queue: deque[tuple[Ticket, list[int], float]] = field(default_factory=deque)  # (ticket, ids, work left)
    running: list[tuple[Ticket, int]] = field(default_factory=list)  # (ticket, tick it finishes)
    cached: set[tuple[int, ...]] = field(default_factory=set)


class Fleet:
    def __init__(self, n: int, **params: object) -> None:
        self.router = Router(block_size=BS, policy="kv_aware", policy_params=dict(params))
        self.urls = [f"http://w{i}" for i in range(n)]
        for u in self.urls:
            self.router.add_worker(Worker(u, state=WorkerState.HEALTHY))
        self.engines = {u: Engine() for u in self.urls}
        self.tick_no = 0
        self.next_hash = 1 << 32
        self.sent = 0

    def send(self, question: int) -> str:
        ids = SYSTEM + [1000 + question * 64 + k for k in range(4 * BS)]  # + 4 unique blocks
        req = self.router.routing_request(input_ids=ids)
        d = self.router.select(req)
        ticket = self.router.on_routed(d, req)
        eng = self.engines[d.worker]
        held = 32 if tuple(SYSTEM) in eng.cached else 0
        eng.queue.append((ticket, ids, float(len(ids) // BS - held)))
        self.sent += 1
        return d.worker

    def tick(self) -> None:
        self.tick_no += 1
        for url, eng in self.engines.items():
            budget = RATE
            while eng.queue and budget > 0:
                ticket, ids, left = eng.queue[0]
                done = min(left, budget)
                budget -= done
                if done < left:
                    eng.queue[0] = (ticket, ids, left - done)
                    break
                eng.queue.popleft()
                self._stored(url, ids)
                eng.cached.add(tuple(SYSTEM))
                self.router.on_first_token(ticket)
                eng.running.append((ticket, self.tick_no + DECODE_TICKS))
            for ticket, end in [r for r in eng.running if r[1] <= self.tick_no]:
                self.router.on_finished(ticket)
                eng.running.remove((ticket, end))

    def _stored(self, url: str, ids: list[int]) -> None:
        events, parent = [], None
        for off in range(0, len(ids) - BS + 1, BS):
            h = self.next_hash if off >= len(SYSTEM) else hash((url, off)) & 0xFFFFFFFF  # prefix: stable
            self.next_hash += 1
            events.append(BlockStored((h,), parent, tuple(ids[off : off + BS]), BS))
            parent = h
        self.router.apply_kv_events(url, KvEventBatch(time.time(), tuple(events)))

    def holders(self) -> set[str]:
        req = self.router.routing_request(input_ids=SYSTEM)
        return {u for u, n in self.router.index.match(req.block_hashes).items() if n == 32}

    def longest_queue(self) -> float:
        return max(sum(q[2] for q in e.queue) for e in self.engines.values())


def run(fleet: Fleet, ticks: int, every: int, per_tick: int) -> tuple[list[str], float]:
    """Send `per_tick` requests every `every` ticks; returns the picks and the longest queue seen."""
    picks, longest = [], 0.0
    for t in range(ticks):
        if t % every == 0:
            picks += [fleet.send(fleet.sent) for _ in range(per_tick)]
        fleet.tick()
        longest = max(longest, fleet.longest_queue())
    return picks, longest


def warm(fleet: Fleet) -> None:
    fleet.send(0)
    for _ in range(12):
        fleet.tick()
    assert len(fleet.holders()) == 1  # one worker took the new prefix


# The hot-spot guard (requests in flight) also moves traffic off a piled-up worker: off here, so that
# what spreads the prefix is the replication rule alone.
NO_GUARD = {"guard_factor": 0.0}


def test_a_hot_prefix_spreads_under_load_and_stops_when_load_falls() -> None:
    fleet = Fleet(6, **NO_GUARD)
    warm(fleet)
    # Busy: 2 requests a tick, 8 blocks of prefill a tick; one worker prefills 6.
    _, longest = run(fleet, 60, 1, 2)
    busy_holders = fleet.holders()
    assert 2 <= len(busy_holders) < 6  # copied where its holders' queue cost more than a copy
    assert longest < 40  # ...so the queue stopped growing with the traffic (a copy: 36 blocks)
    for _ in range(20):  # drain
        fleet.tick()
    # Quiet: one request every 2 ticks: the holders keep up, the prefix is copied nowhere else.
    picks, _ = run(fleet, 60, 2, 1)
    assert set(picks) <= busy_holders and fleet.holders() == busy_holders


def test_without_replication_the_queue_grows_with_the_traffic() -> None:
    """The same busy traffic with replication off: the reuse credit keeps the prefix on one worker
    until its queue passes a copy plus the reuse penalty (36 + 2.5 x 32 blocks)."""
    fleet = Fleet(6, replicate=False, **NO_GUARD)
    warm(fleet)
    _, longest = run(fleet, 60, 1, 2)
    assert longest >= 80


def test_explain_names_the_replication() -> None:
    fleet = Fleet(2, **NO_GUARD)
    warm(fleet)
    holder = next(iter(fleet.holders()))
    for q in range(16):  # a queue builds on the holder: 16 x 4 blocks
        ids = SYSTEM + [1000 + q * 64 + k for k in range(4 * BS)]
        fleet.router.on_routed(holder, fleet.router.routing_request(input_ids=ids))
    d = fleet.router.select(fleet.router.routing_request(input_ids=SYSTEM + [1] * BS))
    terms = {s.url: s.terms for s in d.scores}[d.worker]
    assert terms["replicate"] == 1.0 and terms["holders_queue_blocks"] > terms["copy_cost_blocks"] > 32
    assert "hot prefix" in d.reason and d.worker != holder and d.cached_blocks == 0  # sent to copy it

"""The virtual-clock replay of `bench/routing_quality.py` runs end to end (it broke once unnoticed when the
simulator started reading `time.time`): every request answered, and the cache reused where it can be."""

from __future__ import annotations

from kvroute.bench.routing_quality import FleetSpec, run_virtual
from kvroute.bench.workloads import Request


def test_virtual_clock_replay_serves_every_request_and_reuses_a_shared_prefix() -> None:
    prefix = "".join(chr(65 + i % 26) for i in range(512))  # one byte = one token
    reqs = [
        Request(f"r{i}", 0.05 * i, prefix + "".join(chr(97 + (i * 7 + k) % 26) for k in range(32)), 4)
        for i in range(12)
    ]
    fleet = FleetSpec(workers=2, page_size=16, kv_tokens=20_000, schedule_policy="fcfs", event_delay_s=0.005,
                      poll_s=1.0)  # fmt: skip
    stats = run_virtual(reqs, "kv_aware", {}, fleet)
    assert len(stats.ttft) == len(reqs) and all(t > 0 for t in stats.ttft)
    assert sum(stats.per_worker) == len(reqs)
    assert stats.hit > 0.5  # 512 of 544 tokens shared: only the first prompt (per worker) misses

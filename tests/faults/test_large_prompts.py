"""Fault matrix, part 4: 30 MB prompts (under the 32 MiB default limit) must not stall the router's event
loop: `/health` stays under 100 ms while four of them are parsed and hashed (issue #18: 1.2 s each on the
loop, 5.7 s of /health stall for four). The engines run in a subprocess, so only the router shares this
test's loop."""

from __future__ import annotations

import asyncio
import json
import sys
import time

import aiohttp
import pytest

from tests.faults.conftest import test_config

pytestmark = pytest.mark.slow

PROMPT_BYTES = 30 * 1024 * 1024
# POSTs N prompts of SIZE bytes at once to URL/generate (threads, stdlib only); prints their statuses.
SENDER = """
import http.client, json, sys, threading, urllib.parse
url, size, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
u = urllib.parse.urlsplit(url)
out = [0] * n
def one(i):
    body = b'{"text": "' + bytes([97 + i]) * size + b'", "sampling_params": {"max_new_tokens": 1}}'
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=90)
    c.request("POST", "/generate", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    r.read()
    out[i] = r.status
ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
[t.start() for t in ts]
[t.join() for t in ts]
print(json.dumps(out))
"""


@pytest.fixture
async def subprocess_fleet():
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvroute.engines.sim.fleet", "--workers", "2", "--base-port", "0",
        "--profile", "tiny",
        "--time-scale", "0.001", "--no-kv-events", "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines = [json.loads(await asyncio.wait_for(proc.stdout.readline(), 60)) for _ in range(2)]
        yield [w["url"] for w in lines]
    finally:
        proc.kill()
        await proc.wait()


async def test_health_stays_responsive_while_30mb_prompts_are_hashed(subprocess_fleet, start_router) -> None:
    cfg = test_config(worker_urls=tuple(subprocess_fleet), request_timeout_s=120.0, policy="kv_aware")
    r = await start_router(cfg)
    await r.wait_healthy(2, timeout=30)
    latencies: list[float] = []
    done = asyncio.Event()

    async def probe() -> None:
        async with aiohttp.ClientSession() as s:
            while not done.is_set():
                t0 = time.perf_counter()
                async with s.get(r.url + "/health") as resp:
                    assert resp.status == 200
                    await resp.read()
                latencies.append(time.perf_counter() - t0)
                await asyncio.sleep(0.02)

    # The senders run in another process: building and writing 30 MB bodies here would block this loop,
    # which is the router's, and the probe would measure the client instead.
    sender = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SENDER, r.url, str(PROMPT_BYTES), "4", stdout=asyncio.subprocess.PIPE
    )
    prober = asyncio.create_task(probe())
    try:
        out, _ = await asyncio.wait_for(sender.communicate(), 100)
    finally:
        done.set()
        await prober
        if sender.returncode is None:
            sender.kill()
    statuses = json.loads(out)
    assert all(s < 500 for s in statuses), statuses  # answered (the engine may refuse a prompt that long)
    assert len(latencies) >= 10
    lat = sorted(latencies)
    worst, p99 = lat[-1], lat[int(len(lat) * 0.99)]
    print(f"/health over {len(lat)} probes: p99 {p99 * 1000:.1f} ms, worst {worst * 1000:.1f} ms")
    # Parsing and hashing on the loop stalled /health >= 1.2 s per prompt (issue #18). The 100 ms target
    # holds for the worst probe on an idle 2-core machine; on a shared one the process itself is
    # descheduled now and then (a few hundred ms at load 10), so the worst probe is bounded looser here.
    assert p99 < 0.1, f"/health p99 {p99 * 1000:.0f} ms"
    assert worst < 1.0, f"/health took {worst * 1000:.0f} ms at worst"

"""Fault matrix, part 3: engines that stall (accept, then never answer, `/health` still 200) at the start
or in the middle of a stream, and a router restarted before its workers register."""

from __future__ import annotations

import asyncio
import time

import pytest

from kvroute.router.config import RouterConfig
from tests.faults.conftest import gen, test_config, wait_until
from tests.router.conftest import sse_data

pytestmark = pytest.mark.slow

STALL = dict(stall_timeout_s=0.6, control_timeout_s=0.5, stream_idle_timeout_s=30.0, request_timeout_s=60.0)


def test_defaults_end_a_hung_request_in_tens_of_seconds() -> None:
    c = RouterConfig()
    assert 0 < c.stall_timeout_s + c.control_timeout_s <= 30  # a wedged engine: found and failed over
    # One silent stream on an engine that still produces for others (queueing under overload is not a
    # hang): ended after at most two minutes.
    assert 0 < c.stream_idle_timeout_s <= 120
    assert 0 < c.header_timeout_s <= 30 and 0 < c.body_timeout_s <= 60


async def test_stall_at_start_is_detected_and_requests_are_retried(fleet, start_router) -> None:
    """Engine 0 accepts requests and never answers (its /health stays 200). Its requests are failed over
    to engine 1 once stall detection confirms the wedge with /health_generate; every client gets 200."""
    f = await fleet(2)
    r = await start_router(test_config(worker_urls=tuple(f.urls), **STALL))
    await r.wait_healthy(2)
    await f.set_faults(0, stall=True)
    t0 = time.monotonic()
    statuses = await asyncio.gather(*(gen(r.session, r.url, f"stall {i} " * 8) for i in range(6)))
    assert [s for s, _ in statuses] == [200] * 6
    assert time.monotonic() - t0 < 10.0
    listing = await (await r.session.get(r.url + "/admin/workers")).json()
    workers = {w["url"]: w for w in listing["workers"]}
    stalled = workers[f.urls[0]]
    assert stalled["state"] == "unhealthy" and stalled["stalled"] and "stalled" in stalled["reason"]
    text = await (await r.session.get(r.url + "/metrics")).text()
    assert f'kvroute_worker_stalls_total{{worker="{f.urls[0]}"}} 1.0' in text
    # New requests avoid it; once it generates again it comes back.
    for i in range(3):
        assert (await gen(r.session, r.url, f"after {i}"))[0] == 200
    await f.set_faults(0, stall=False)
    w = r.core.get_worker(f.urls[0])
    await wait_until(lambda: w.state.value == "healthy", timeout=10, what="stalled worker back")


async def test_stall_mid_stream_ends_the_stream_with_an_error(fleet, start_router) -> None:
    """The engine stops after the first tokens: the stream ends with an SSE error and [DONE] once the
    wedge is confirmed (well before the 30 s idle timeout), not after minutes."""
    f = await fleet(1)
    r = await start_router(test_config(worker_urls=tuple(f.urls), **STALL))
    await r.wait_healthy(1)
    body = {"text": "mid " * 20, "stream": True, "sampling_params": {"max_new_tokens": 400}}
    t0 = time.monotonic()
    async with r.session.post(r.url + "/generate", json=body) as resp:
        assert resp.status == 200
        first = await resp.content.readuntil(b"\n\n")
        await f.set_faults(0, stall=True)
        rest = await asyncio.wait_for(resp.content.read(), 15)
    events = sse_data(first + rest)
    assert events[-1] == b"[DONE]" and b'"error"' in events[-2]
    assert time.monotonic() - t0 < 15.0
    await f.set_faults(0, stall=False)


async def test_restarted_router_holds_requests_until_workers_register(fleet, start_router) -> None:
    """A router that just started (its workers still registering: /health answers 503 for a while) holds
    a request for up to no_worker_wait_s instead of answering 503 at once."""
    f = await fleet(1)
    f.engines[0].faults.slow_start_s = 1.0
    f.engines[0]._started_wall = time.monotonic()  # noqa: SLF001  (the fault counts from "start")
    r = await start_router(test_config(worker_urls=tuple(f.urls), no_worker_wait_s=10.0))
    assert r.registry.healthy_urls() == []
    t0 = time.monotonic()
    status, _ = await gen(r.session, r.url, "held " * 8)
    assert status == 200
    assert time.monotonic() - t0 >= 0.5  # it waited for the registration
    # With the hold off, the same moment answers 503 (what the restart looked like before).
    f2 = await fleet(1)
    f2.engines[0].faults.slow_start_s = 2.0
    f2.engines[0]._started_wall = time.monotonic()  # noqa: SLF001
    r2 = await start_router(test_config(worker_urls=tuple(f2.urls), no_worker_wait_s=0))
    status, body = await gen(r2.session, r2.url, "held " * 8)
    assert status == 503 and b"no_worker" in body

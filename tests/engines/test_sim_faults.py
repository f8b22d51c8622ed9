"""Fault knobs of the simulated engine, set at run time through POST /sim/faults or at construction."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from kvroute.engines.sim.faults import FaultConfig
from kvroute.engines.sim.fleet import SimFleet
from tests.engines.conftest import FAST, generate, wait_for


async def set_faults(session: aiohttp.ClientSession, url: str, **knobs: object) -> dict[str, object]:
    async with session.post(url + "/sim/faults", json=knobs) as r:
        assert r.status == 200
        return await r.json()


async def test_error_rate_and_bad_knobs(fleet: SimFleet, session: aiohttp.ClientSession) -> None:
    url = fleet.urls[0]
    assert (await set_faults(session, url, error_rate=1.0))["error_rate"] == 1.0
    status, body = await generate(session, url, "x")
    assert status == 500 and "injected fault" in body["error"]["message"]
    async with session.post(url + "/v1/completions", json={"prompt": "x"}) as r:
        assert r.status == 500 and (await r.json())["code"] == 500
    await set_faults(session, url, error_rate=0.0)
    assert (await generate(session, url, "x"))[0] == 200
    for bad in ({"error_rate": 2}, {"no_such_knob": 1}):
        async with session.post(url + "/sim/faults", json=bad) as r:
            assert r.status == 400
    async with session.get(url + "/sim/faults") as r:
        assert (await r.json())["error_rate"] == 0.0  # the rejected updates changed nothing


async def test_die_after_tokens_drops_the_stream(fleet: SimFleet, session: aiohttp.ClientSession) -> None:
    url = fleet.urls[0]
    await set_faults(session, url, die_after_tokens=3)
    body = {"text": "x", "stream": True, "sampling_params": {"max_new_tokens": 50}}
    got = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async with session.post(url + "/generate", json=body) as r:
            assert r.status == 200
            async for line in r.content:
                got += line
    assert b'"completion_tokens":3' in got and b"[DONE]" not in got and b'"completion_tokens":4' not in got
    eng = fleet.engines[0]
    await wait_for(lambda: eng.load().num_running_reqs == 0, what="dropped request aborted")


async def test_stall_hangs_generation_until_cleared(fleet: SimFleet, session: aiohttp.ClientSession) -> None:
    url = fleet.urls[0]
    await set_faults(session, url, stall=True)
    async with session.get(url + "/health_generate", params={"timeout": "0.2"}) as r:
        assert r.status == 503
    async with session.get(url + "/health") as r:
        assert r.status == 200  # the process is up; only generation hangs
    pending = asyncio.create_task(generate(session, url, "stalled", max_new_tokens=2))
    eng = fleet.engines[0]
    await wait_for(
        lambda: eng.load().num_running_reqs + eng.load().num_waiting_reqs >= 1, what="request queued"
    )
    assert not pending.done()
    await set_faults(session, url, stall=False)
    status, body = await asyncio.wait_for(pending, 5)
    assert status == 200 and body["meta_info"]["completion_tokens"] == 2


async def test_slow_start_fails_health_then_recovers(session: aiohttp.ClientSession) -> None:
    async with SimFleet(1, time_scale=FAST, faults=FaultConfig(slow_start_s=0.3)) as f:
        async with session.get(f.urls[0] + "/health") as r:
            assert r.status == 503
        assert (await generate(session, f.urls[0], "x"))[0] == 503
        ok: list[int] = []

        async def probe() -> None:
            async with session.get(f.urls[0] + "/health") as r:
                ok.append(r.status)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while not ok or ok[-1] != 200:
            assert loop.time() < deadline, "health never became 200"
            await probe()
            await asyncio.sleep(0.02)


async def test_refuse_connections_closes_and_reopens_the_port(fleet: SimFleet) -> None:
    url = fleet.urls[0]
    async with aiohttp.ClientSession() as s:
        await set_faults(s, url, refuse_connections=True)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh:
        with pytest.raises(aiohttp.ClientConnectorError):
            async with fresh.get(url + "/health"):
                pass
        await fleet.set_faults(0, refuse_connections=False)
        async with fresh.get(url + "/health") as r:
            assert r.status == 200


async def test_refusing_from_the_start_still_has_a_fixed_port() -> None:
    async with SimFleet(1, time_scale=FAST, faults=FaultConfig(refuse_connections=True)) as f:
        assert not f.urls[0].endswith(":0")
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.ClientConnectorError):
                async with s.get(f.urls[0] + "/health"):
                    pass
            await f.set_faults(0, refuse_connections=False)
            async with s.get(f.urls[0] + "/health") as r:
                assert r.status == 200

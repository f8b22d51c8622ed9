"""Quotas across replicas through a real Redis, and what happens when Redis goes away mid-run."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from kvroute.router.shared.common import connect
from kvroute.router.tenants.errors import Rejected
from kvroute.router.tenants.quotas import RedisQuotas
from kvroute.router.tenants.table import Tenant
from tests.router.conftest import FakeEngine, RedisServer, test_config, wait_until

KEY = {"Authorization": "Bearer k-team"}


def _cfg(redis_url: str, prefix: str, engine: FakeEngine, **tenant: Any) -> Any:
    return test_config(
        worker_urls=(engine.url,),
        redis_url=redis_url,
        redis_key_prefix=prefix,
        tenants={"team": {"class": "standard", "api_keys": ["k-team"], **tenant}},
        request_timeout_s=20.0,
    )


async def _post(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, str], dict[str, Any]]:
    body = {"text": "a prompt", "sampling_params": {"max_new_tokens": 4}, "stream": True}
    async with session.post(url + "/generate", json=body, headers=KEY) as r:
        raw = await r.read()
        return r.status, dict(r.headers), (orjson.loads(raw) if r.status != 200 else {})


async def test_concurrency_quota_is_shared_by_two_replicas(
    redis_url: str, engines: Any, start_router: Any
) -> None:
    eng: FakeEngine = await engines(mode="hang")
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    a = await start_router(_cfg(redis_url, prefix, eng, max_concurrent=1))
    b = await start_router(_cfg(redis_url, prefix, eng, max_concurrent=1))
    await a.wait_healthy(1)
    await b.wait_healthy(1)
    held = asyncio.create_task(_post(a.session, a.url))  # replica a: 1 in flight (never finishes)
    await wait_until(lambda: len(eng.seen) == 1, what="the first request at the engine")
    status, headers, err = await _post(b.session, b.url)  # replica b: same tenant, over its quota
    assert status == 429 and err["error"]["code"] == "quota_concurrency"
    assert int(headers["Retry-After"]) >= 1
    assert len(eng.seen) == 1
    eng.mode = "ok"
    held.cancel()  # the first request ends: its lease is released in Redis
    with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
        await held

    async def b_gets_through() -> bool:
        return (await _post(b.session, b.url))[0] == 200

    for _ in range(100):
        if await b_gets_through():
            break
        await asyncio.sleep(0.02)
    else:
        pytest.fail("replica b never got the released slot")


async def test_token_quota_is_one_bucket_for_both_replicas(redis_url: str) -> None:
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    ca, cb = connect(redis_url, 1.0), connect(redis_url, 1.0)
    qa, qb = RedisQuotas(ca, prefix, timeout_s=1.0), RedisQuotas(cb, prefix, timeout_s=1.0)
    team = Tenant("team", tokens_per_s=100.0, burst_tokens=1000)
    try:
        await qa.acquire(team, 600, "r1")  # the bucket: 1000 -> 400
        with pytest.raises(Rejected) as info:
            await qb.acquire(team, 600, "r2")  # the other replica sees 400 left, not its own 1000
        assert info.value.reason == "quota_tokens"
        assert info.value.retry_after_s == 2  # 200 tokens short at 100 tokens/s
        await qb.acquire(team, 300, "r3")
        assert not qa.degraded and not qb.degraded and qa.fallbacks == qb.fallbacks == 0
    finally:
        await ca.aclose()
        await cb.aclose()


async def test_redis_stopped_mid_run_falls_back_per_process(
    tmp_path: Path, engines: Any, start_router: Any, caplog: pytest.LogCaptureFixture
) -> None:
    srv = RedisServer(tmp_path)
    srv.start()
    try:
        eng: FakeEngine = await engines()
        rt = await start_router(_cfg(srv.url, "t-stop", eng, max_concurrent=4, tokens_per_s=1e6))
        await rt.wait_healthy(1)
        assert (await _post(rt.session, rt.url))[0] == 200
        srv.stop()
        caplog.set_level(logging.WARNING, logger="kvroute.quotas")
        for _ in range(5):  # served, never blocked, never a 5xx
            status, _, _ = await asyncio.wait_for(_post(rt.session, rt.url), 5.0)
            assert status == 200
        warnings = [r for r in caplog.records if r.name == "kvroute.quotas" and r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "per process" in warnings[0].getMessage()
        async with rt.session.get(rt.url + "/metrics") as r:
            text = await r.text()
        assert "kvroute_quota_degraded 1.0" in text
        async with rt.session.get(rt.url + "/admin/tenants") as r:
            q = (await r.json())["quotas"]
        assert q["degraded"] and q["local_fallbacks"] >= 5
        srv.start()  # back: the quotas are shared again after the retry delay

        async def shared_again() -> bool:
            await _post(rt.session, rt.url)
            async with rt.session.get(rt.url + "/admin/tenants") as r:
                return not (await r.json())["quotas"]["degraded"]

        for _ in range(200):
            if await shared_again():
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("quotas never went back to Redis")
    finally:
        srv.stop()


async def test_a_tenant_put_on_one_replica_reaches_the_other(
    redis_url: str, engines: Any, start_router: Any
) -> None:
    eng: FakeEngine = await engines()
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    a = await start_router(_cfg(redis_url, prefix, eng))
    b = await start_router(_cfg(redis_url, prefix, eng))

    async def tenants(rt: Any) -> dict[str, Any]:
        async with rt.session.get(rt.url + "/admin/tenants") as r:
            return (await r.json())["tenants"]  # type: ignore[no-any-return]

    async with a.session.put(a.url + "/admin/tenants/new", json={"class": "batch", "weight": 3}) as r:
        assert r.status == 201
    for _ in range(200):
        if (await tenants(b)).get("new", {}).get("weight") == 3:
            break
        await asyncio.sleep(0.02)
    else:
        pytest.fail("replica b never saw the tenant")
    async with b.session.delete(b.url + "/admin/tenants/team") as r:
        assert r.status == 200
    for _ in range(200):
        if "team" not in await tenants(a):
            break
        await asyncio.sleep(0.02)
    else:
        pytest.fail("replica a never saw the deletion")

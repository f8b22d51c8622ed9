"""A replica set acts through one autoscaler at a time: a lease in (real) Redis, taken over when its
holder goes away, and given up when its holder loses Redis."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from kvroute.router.autoscale.decide import DecisionRules, PoolLimits
from kvroute.router.autoscale.lease import RedisLease
from kvroute.router.autoscale.loop import Autoscaler, AutoscaleSettings
from kvroute.router.planner import ObservedLoad
from kvroute.router.shared.common import connect
from kvroute.router.types import WorkerRole
from tests.router.conftest import refused_url
from tests.router.test_autoscale import MOONCAKE, PROFILE, FakeRegistry, FakeWindow, RecordingScaler

P, D = WorkerRole.PREFILL, WorkerRole.DECODE


CLIENTS: list[Any] = []


def _replica(redis_url: str, key: str, name: str, shared: RecordingScaler, ttl: float) -> Autoscaler:
    reg = FakeRegistry()
    reg.add(f"http://{name}-p:1", P)
    reg.add(f"http://{name}-d:1", D)
    client = connect(redis_url, 1.0)
    CLIENTS.append(client)
    lease = RedisLease(client, key, name, ttl_s=ttl)
    settings = AutoscaleSettings(
        interval_s=0.05,
        limits={P: PoolLimits(1, 64), D: PoolLimits(1, 64)},
        rules=DecisionRules(up_cooldown_s=0, down_cooldown_s=0),
    )
    return Autoscaler(settings, shared, reg, lambda: reg.workers, FakeWindow(ObservedLoad(6.0, **MOONCAKE)),
                      PROFILE, leadership=lease)  # fmt: skip


async def test_exactly_one_replica_acts_and_another_takes_over(redis_url: str) -> None:
    try:
        await _one_acts(redis_url)
    finally:
        for c in CLIENTS:
            await c.aclose()
        CLIENTS.clear()


async def _one_acts(redis_url: str) -> None:
    key = f"test-{uuid.uuid4().hex}:autoscale:leader"
    calls: list[str] = []

    class Tagged(RecordingScaler):
        async def scale(self, request: Any) -> Any:
            calls.append(self.name)
            return await super().scale(request)

    a_scaler, b_scaler = Tagged(name="a"), Tagged(name="b")
    a = _replica(redis_url, key, "a", a_scaler, ttl=1.0)
    b = _replica(redis_url, key, "b", b_scaler, ttl=1.0)
    leaders = []
    for _ in range(10):  # both loops decide at once, ten times
        await asyncio.gather(a.step(), b.step())
        leaders.append((a.leader, b.leader))
        a.pools[P].last_change_at = b.pools[P].last_change_at = None  # no cooldown: act each time if leader
    assert all(x != y for x, y in leaders), leaders  # exactly one leader at every interval
    first = "a" if leaders[0][0] else "b"
    assert set(calls) == {first}  # only the leader's scaler was ever called
    assert await (a if first == "a" else b).leadership.holder_now() == first  # type: ignore[union-attr]
    # the leader goes away (closes, releasing the lease): the other takes over at its next interval
    gone, other = (a, b) if first == "a" else (b, a)
    await gone.close()
    await other.step()
    assert other.leader and not gone.leader
    # the lease of a replica that dies without releasing expires: simulated by a third one waiting out the TTL
    c = _replica(redis_url, key, "c", Tagged(name="c"), ttl=1.0)
    await c.step()
    assert not c.leader  # `other` holds it
    other.leadership = None  # "other" is gone without a word (its lease is left to expire)
    await asyncio.sleep(1.1)
    await c.step()
    assert c.leader
    await c.close()


async def test_a_leader_that_loses_redis_stops_acting() -> None:
    lease = RedisLease(connect(refused_url().replace("http", "redis"), 0.2), "k", "a", ttl_s=1.0)
    scaler = RecordingScaler()
    reg = FakeRegistry()
    reg.add("http://p:1", P)
    reg.add("http://d:1", D)
    settings = AutoscaleSettings(limits={P: PoolLimits(2, 4), D: PoolLimits(2, 4)})
    loop = Autoscaler(settings, scaler, reg, lambda: reg.workers, FakeWindow(ObservedLoad(6.0, **MOONCAKE)),
                      PROFILE, leadership=lease)  # fmt: skip
    try:
        assert await loop.step() == [] and not loop.leader
        assert scaler.calls == []  # below min, but not the leader: nothing done
        assert not lease.held
    finally:
        await lease.client.aclose()


async def test_the_leader_plans_for_every_replicas_window(redis_url: str) -> None:
    """Behind a balancer each replica sees part of the demand: the acting one plans for the sum."""
    from kvroute.router.autoscale.share import ObservationShare

    key = f"test-{uuid.uuid4().hex}:autoscale:observations"
    lease_key = f"test-{uuid.uuid4().hex}:autoscale:leader"
    clients = [connect(redis_url, 1.0) for _ in range(4)]
    try:
        loads = {
            "a": ObservedLoad(2.0, 10000.0, 100.0, 0.5, measured_ttft_s=1.0),
            "b": ObservedLoad(4.0, 4000.0, 400.0, 0.0, measured_ttft_s=2.0),
        }
        loops = {}
        for i, name in enumerate(("a", "b")):
            reg = FakeRegistry()
            reg.add(f"http://{name}-p:1", P)
            reg.add(f"http://{name}-d:1", D)
            loops[name] = Autoscaler(
                AutoscaleSettings(up_window_s=0),
                RecordingScaler(name=name),
                reg,
                lambda reg=reg: reg.workers,  # type: ignore[misc]
                FakeWindow(loads[name]),  # 100 finished requests each
                PROFILE,
                leadership=RedisLease(clients[i], lease_key, name, ttl_s=5.0),
                share=ObservationShare(clients[2 + i], key, name, max_age_s=5.0),
            )
        await loops["b"].step()  # b publishes (and may lead)
        await loops["a"].step()
        await loops["b"].step()  # whoever leads now has both windows
        leader = next(x for x in loops.values() if x.leader)
        seen = leader.decisions[-1]["inputs"]
        assert seen["request_rate"] == pytest.approx(6.0)  # 2 + 4 req/s
        assert seen["prompt_tokens"] == pytest.approx(7000.0)  # equal weights: 100 requests each
        assert seen["output_tokens"] == pytest.approx(250.0)
        assert seen["cache_hit_ratio"] == pytest.approx(5000 / 14000, abs=1e-4)  # weighted by prompt tokens
        assert seen["measured_ttft_s"] == pytest.approx(1.5)
        assert leader.share.replicas_seen == 2  # type: ignore[union-attr]
    finally:
        for c in clients:
            await c.aclose()


async def test_two_router_replicas_one_autoscaler(redis_url: str) -> None:
    """Two routers (`--redis-url`, same key prefix) with `--autoscale`: exactly one acts; when it stops,
    the other takes over."""
    from aiohttp import web

    from kvroute.router.app import ADMIN, create_app
    from kvroute.router.autoscale.runtime import SCALER
    from tests.router.conftest import test_config, wait_until

    class Quiet(RecordingScaler):
        async def scale(self, request: Any) -> Any:
            await super().scale(request)
            return []  # the platform's discovery would register them

    prefix = f"test-{uuid.uuid4().hex[:8]}"
    runners, scalers, apps = [], [], []
    for _ in range(2):
        cfg = test_config(
            pd_disaggregation=True, redis_url=redis_url, redis_key_prefix=prefix, sync_interval_s=0.1,
            replica_ttl_s=0.5, autoscale=True, autoscale_interval_s=0.1, autoscale_min_decode=2,
            autoscale_up_cooldown_s=0,
        )  # fmt: skip
        app = create_app(cfg)
        app[SCALER] = scaler = Quiet()
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        scalers.append(scaler)
        apps.append(app)
    try:
        autos = [a[ADMIN].autoscale.autoscaler for a in apps]
        await wait_until(lambda: all(x.steps >= 10 for x in autos), 20, "ten intervals on both")
        assert [x.leader for x in autos].count(True) == 1
        lead = next(i for i, x in enumerate(autos) if x.leader)
        assert scalers[lead].calls and not scalers[1 - lead].calls  # only the leader acted
        assert scalers[lead].size[D] == 2
        await runners[lead].cleanup()  # the leader stops (and releases the lease)
        runners[lead] = None  # type: ignore[call-overload]
        other = autos[1 - lead]
        await wait_until(lambda: other.leader, 10, "the other replica takes over")
    finally:
        for r in runners:
            if r is not None:
                await r.cleanup()

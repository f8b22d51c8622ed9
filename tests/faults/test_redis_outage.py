"""Fault matrix, part 5: Redis stops while an admin change is made on one of two router replicas."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kvroute.router.app import ADMIN
from tests.faults.conftest import test_config, wait_until
from tests.router.conftest import RedisServer

pytestmark = pytest.mark.slow


async def test_admin_change_during_redis_outage_is_replayed_and_degraded_clears(
    tmp_path: Path, fleet, start_router
) -> None:
    """Issue #18 point 7: a drain made on replica A while Redis is down used to answer 200 and never reach
    replica B, and `degraded` stayed true after Redis came back. Now the change is queued on A and
    replayed when Redis returns (B drains the worker), and both replicas clear `degraded` and the
    `kvroute_replica_degraded` gauge."""
    if not shutil.which("redis-server"):
        pytest.skip("needs a redis-server binary to stop and restart")
    srv = RedisServer(tmp_path)
    srv.start()
    f = await fleet(2)
    try:
        kw = dict(
            worker_urls=tuple(f.urls),
            redis_url=srv.url,
            redis_key_prefix="kvroute-faults",
            sync_interval_s=0.05,
            replica_ttl_s=0.5,
        )
        a = await start_router(test_config(replica_id="a", **kw))
        b = await start_router(test_config(replica_id="b", **kw))
        await a.wait_healthy(2, timeout=10)
        await b.wait_healthy(2, timeout=10)

        async def status(r) -> dict:  # type: ignore[no-untyped-def]
            async with r.session.get(r.url + "/admin/replicas") as resp:
                return await resp.json()

        srv.stop()
        await wait_until(lambda: a.app[ADMIN].replicas.status()["degraded"], 10, "a to notice the outage")
        async with a.session.post(a.url + "/admin/workers/drain", json={"url": f.urls[0]}) as resp:
            assert resp.status == 200
        assert (await status(a))["unsent_changes"] == 1
        assert b.core.get_worker(f.urls[0]).state.value == "healthy"  # B cannot know yet
        srv.start()  # same port, empty data
        w_b = b.core.get_worker(f.urls[0])
        await wait_until(lambda: w_b.state.value == "draining", 15, "the queued drain to reach b")
        for r in (a, b):
            await wait_until(
                lambda r=r: not r.app[ADMIN].replicas.status()["degraded"], 15, "degraded cleared"
            )
            st = await status(r)
            assert st["degraded"] is False and st["unsent_changes"] == 0
            text = await (await r.session.get(r.url + "/metrics")).text()
            assert "kvroute_replica_degraded 0.0" in text
    finally:
        srv.stop()

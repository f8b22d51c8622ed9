"""Router replicas sharing load and membership through a real Redis server (router/shared)."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from kvroute.cache_index.hashing import BlockHash
from kvroute.router.config import RouterConfig
from kvroute.router.core import Router
from kvroute.router.load import LoadTracker
from kvroute.router.metrics import Metrics
from kvroute.router.shared import (
    LoadVector,
    MembershipChange,
    Op,
    RegistryMembership,
    RemoteLoadFolder,
    ReplicaConfig,
    ReplicaStateSync,
    RoutingRecordShare,
    SharedMembership,
    SharedPolicy,
    SharedStateError,
    WorkerSpec,
    connect,
    replica_context,
)
from kvroute.router.shared.inflight import inflight_sink
from kvroute.router.shared.load_sync import add_blob, encode_blob
from kvroute.router.types import RoutingRequest, Worker, WorkerState
from kvroute.router.workers import WorkerRegistry
from tests.router.conftest import RedisServer, free_port, refused_url, wait_until

W1, W2 = "http://127.0.0.1:9001", "http://127.0.0.1:9002"
REQ = RoutingRequest(block_hashes=(), prompt_tokens=64, block_size=16)


def _cleanup(url: str, prefix: str) -> None:
    """Delete this test's keys only (the server may be shared)."""
    with redis.Redis.from_url(url, socket_timeout=2) as c:
        keys = list(c.scan_iter(match=f"{prefix}:*"))
        if keys:
            c.delete(*keys)


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    p = f"kvroute-test-{uuid.uuid4().hex[:10]}"
    yield p
    try:
        _cleanup(redis_url, p)
    except redis.RedisError:
        pass  # the outage test's own server is gone; nothing of ours is left on the shared one


def rcfg(url: str | None, prefix: str, rid: str, **kw: Any) -> ReplicaConfig:
    kw.setdefault("sync_interval_s", 0.05)
    kw.setdefault("replica_ttl_s", 0.5)
    kw.setdefault("reconnect_max_s", 0.2)
    kw.setdefault("redis_timeout_s", 0.5)
    return ReplicaConfig(redis_url=url, replica_id=rid, key_prefix=prefix, **kw)


class Replica:
    """One router replica in miniature: a Router with two healthy workers and its load sync."""

    def __init__(self, config: ReplicaConfig) -> None:
        assert config.redis_url is not None
        self.router = Router(block_size=16, policy="least_load", policy_params={"metric": "requests"})
        for url in (W1, W2):
            self.router.add_worker(Worker(url=url, state=WorkerState.HEALTHY))
        self.client = connect(config.redis_url, config.redis_timeout_s)
        self.sync = ReplicaStateSync(
            self.client, RemoteLoadFolder(self.router.workers), config, config.replica_id
        )

    def load(self, url: str) -> int:
        w = self.router.get_worker(url)
        assert w is not None
        return w.load.in_flight

    async def close(self, forget: bool = True) -> None:
        await self.sync.close(forget=forget)
        await self.client.aclose()


@pytest.fixture
async def pair(redis_url: str, prefix: str) -> AsyncIterator[tuple[Replica, Replica]]:
    a, b = Replica(rcfg(redis_url, prefix, "a")), Replica(rcfg(redis_url, prefix, "b"))
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


# --- pure parts ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("3 100 7", LoadVector(3, 100, 7)),  # the wire form
        ("-1 5 0", LoadVector(0, 5, 0)),  # negative clamped: counters are never < 0
        ("3 100", None),  # a field missing: ignored, never fatal
        ("x 1 2", None),  # not an int
    ],
)
def test_load_vector_decode(raw: str, expected: LoadVector | None) -> None:
    assert LoadVector.decode(raw) == expected
    if expected is not None:
        assert LoadVector.decode(expected.encode()) == expected


def test_blob_round_trip_and_sum() -> None:
    sums: dict[str, list[int]] = {}
    add_blob(sums, encode_blob({W1: LoadVector(1, 2, 3), W2: LoadVector(0, 0, 1)}))
    add_blob(sums, f"{W1} 4 5 6\ngarbage\n{W2} x 1 1\n{W2} -3 0 0\n")  # bad lines skipped, negatives -> 0
    assert sums == {W1: [5, 7, 9], W2: [0, 0, 1]}


def test_config_rejects_ttl_not_above_interval() -> None:
    with pytest.raises(SharedStateError, match="replica_ttl_s"):
        ReplicaConfig(sync_interval_s=1.0, replica_ttl_s=1.0)


def test_folder_keeps_local_share_exact_through_tickets() -> None:
    """Folding remote load in and out never disturbs the tickets' own accounting."""
    workers = {W1: Worker(url=W1, state=WorkerState.HEALTHY)}
    tracker = LoadTracker(workers)
    folder = RemoteLoadFolder(workers.values)
    t1 = tracker.on_routed(W1, 64, 32, 16)
    folder.apply({W1: LoadVector(5, 1000, 9)})
    ld = workers[W1].load
    assert (ld.in_flight, ld.pending_prefill_tokens, ld.active_blocks) == (6, 1032, 9)  # local + remote
    assert folder.local() == {W1: LoadVector(1, 32, 0)}  # what we publish: our share only
    tracker.on_first_token(t1)
    folder.apply({W1: LoadVector(2, 0, 1)})
    assert (ld.in_flight, ld.pending_prefill_tokens, ld.active_blocks) == (3, 0, 5)  # 4 blocks ours
    tracker.on_finished(t1)
    assert folder.local() == {}  # our ticket is gone; only the remote share is left
    folder.apply({})
    assert (ld.in_flight, ld.pending_prefill_tokens, ld.active_blocks) == (0, 0, 0)
    # A re-added worker (new Worker object) starts without the old remote share.
    folder.apply({W1: LoadVector(4, 0, 0)})
    workers[W1] = Worker(url=W1, state=WorkerState.HEALTHY)
    assert folder.local() == {}
    folder.apply({W1: LoadVector(1, 0, 0)})
    assert workers[W1].load.in_flight == 1


def test_peer_request_seen_in_flight_counts_as_load_until_the_next_sync() -> None:
    """An in-flight record from another replica adds its request and uncached prompt to the worker's
    load at once (as remote load: our published share is unchanged); the next sync's figures replace it."""
    router = Router(block_size=16, policy="kv_aware")
    router.add_worker(Worker(url=W1, state=WorkerState.HEALTHY))
    folder = RemoteLoadFolder(router.workers)
    sink = inflight_sink(router, ttl_s=10.0, folder=folder)
    mine = router.on_routed(W1, RoutingRequest(block_hashes=(), prompt_tokens=64, block_size=16))
    hashes = [BlockHash(900 + i) for i in range(8)]
    sink(W1, hashes, 128)  # the peer's 128-token prompt, nothing of it cached here
    ld = router.get_worker(W1).load  # type: ignore[union-attr]
    assert (ld.in_flight, ld.pending_prefill_tokens) == (2, 64 + 128)
    assert folder.local() == {W1: LoadVector(1, 64, 0)}  # what we publish: still only ours
    assert router.load.inflight.match(hashes) == {W1: 8}
    sink(W1, hashes, 128)  # a follower of the same prompt: its blocks are on the way, nothing to prefill
    assert (ld.in_flight, ld.pending_prefill_tokens) == (3, 64 + 128)
    sink("http://127.0.0.1:1", hashes, 128)  # a worker we do not know: ignored
    folder.apply({W1: LoadVector(1, 128, 0)})  # the sync: the peer's own count replaces the guess
    assert (ld.in_flight, ld.pending_prefill_tokens) == (2, 64 + 128)
    router.on_finished(mine)
    folder.apply({})
    assert (ld.in_flight, ld.pending_prefill_tokens) == (0, 0)


async def test_disabled_without_redis_url() -> None:
    async with replica_context(RouterConfig(), Router(), None) as rt:
        assert rt is None  # RouterConfig has no redis_url yet: sharing off


# --- load sharing ----------------------------------------------------------------------------------


async def test_replicas_see_each_others_load(pair: tuple[Replica, Replica]) -> None:
    a, b = pair
    tickets = [a.router.on_routed(W1, REQ) for _ in range(3)]
    a.sync.start()
    b.sync.start()
    await wait_until(lambda: b.load(W1) == 3, 5.0, "b to see a's 3 requests on W1")
    assert b.sync.peers == ("a",)
    assert b.sync.folder.local() == {}  # b publishes nothing of a's back
    assert b.router.select(REQ).worker == W2  # b now routes around the worker a keeps busy
    b_ticket = b.router.on_routed(W2, REQ)
    await wait_until(lambda: a.load(W2) == 1, 5.0, "a to see b's request on W2")
    assert a.load(W1) == 3  # a's own count is untouched by the fold
    for t in tickets:
        a.router.on_finished(t)
    await wait_until(lambda: b.load(W1) == 0, 5.0, "a's finished requests to leave b's view")
    b.router.on_finished(b_ticket)
    await wait_until(lambda: a.load(W2) == 0, 5.0, "b's finished request to leave a's view")


async def test_crashed_replica_load_expires(pair: tuple[Replica, Replica]) -> None:
    a, b = pair
    a.router.on_routed(W1, REQ)
    a.sync.start()
    b.sync.start()
    await wait_until(lambda: b.load(W1) == 1, 5.0, "b to see a's request")
    await a.sync.close(forget=False)  # a crash: nothing removed from Redis, the TTL must do it
    t0 = time.monotonic()
    await wait_until(lambda: b.load(W1) == 0, 5.0, "a's load to expire")
    assert time.monotonic() - t0 < 0.5 + 1.5  # by the 0.5 s TTL (slack for a loaded 2-core box)
    assert b.sync.peers == ()


async def test_graceful_close_forgets_at_once(redis_url: str, prefix: str) -> None:
    a = Replica(rcfg(redis_url, prefix, "a", replica_ttl_s=30.0))  # TTL far beyond the wait below
    b = Replica(rcfg(redis_url, prefix, "b", replica_ttl_s=30.0))
    try:
        a.router.on_routed(W1, REQ)
        assert await a.sync.sync_once()
        assert await b.sync.sync_once()
        assert b.load(W1) == 1
        await a.close(forget=True)
        assert await b.sync.sync_once()
        assert b.load(W1) == 0  # gone with a's close, not with its 30 s TTL
    finally:
        await b.close()


async def test_redis_outage_degrades_then_recovers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    if not shutil.which("redis-server"):
        pytest.skip("needs a redis-server binary to stop and restart")
    srv = RedisServer(tmp_path)
    srv.start()
    a = Replica(rcfg(srv.url, "kvroute-outage", "a"))
    b = Replica(rcfg(srv.url, "kvroute-outage", "b"))
    try:
        a.router.on_routed(W1, REQ)
        a.sync.start()
        b.sync.start()
        await wait_until(lambda: b.load(W1) == 1, 5.0, "b to see a's request")
        srv.stop()
        await wait_until(lambda: a.sync.degraded and b.sync.degraded, 5.0, "both to notice the outage")
        await wait_until(lambda: b.load(W1) == 0, 5.0, "a's stale load to be dropped after the TTL")
        # Still routing, on local state: b's own reservations count, the loop is alive.
        assert b.router.select(REQ).worker in (W1, W2)
        b.router.on_routed(W2, REQ)
        assert b.load(W2) == 1
        fails = b.sync.failures
        await wait_until(lambda: b.sync.failures >= fails + 2, 5.0, "b to keep retrying")
        outage_logs = [r for r in caplog.records if "Redis unavailable" in r.getMessage()]
        assert len(outage_logs) == 2  # once per replica, not once per retry
        srv.start()  # same port, empty data
        await wait_until(lambda: not a.sync.degraded and not b.sync.degraded, 10.0, "reconnection")
        await wait_until(lambda: b.load(W1) == 1 and a.load(W2) == 1, 5.0, "loads shared again")
    finally:
        await a.close()
        await b.close()
        srv.stop()


# --- membership ------------------------------------------------------------------------------------


class Recorder:
    """A listener that records what it was asked to apply."""

    def __init__(self) -> None:
        self.changes: list[tuple[str, str]] = []

    async def apply_membership(self, change: MembershipChange) -> None:
        self.changes.append((change.op.value, change.spec.url))


async def _registry(session: aiohttp.ClientSession, router: Router) -> WorkerRegistry:
    cfg = RouterConfig(health_check_interval_s=0, load_poll_interval_s=0, blind_check_interval_s=0)
    reg = WorkerRegistry(router, cfg, Metrics())
    await reg.start(session)
    return reg


async def test_membership_changes_reach_other_replicas(redis_url: str, prefix: str) -> None:
    """a's admin add/drain/remove reach b's real WorkerRegistry; a replica started later loads the set."""
    url = refused_url()  # never healthy: the test is about membership, not registration
    async with aiohttp.ClientSession() as session:
        reg_b = await _registry(session, Router())
        ca, cb, cc = (connect(redis_url, 0.5) for _ in range(3))
        rec_a, rec_c = Recorder(), Recorder()
        ma = SharedMembership(ca, rec_a, rcfg(redis_url, prefix, "a"), "a")
        mb = SharedMembership(cb, RegistryMembership(reg_b), rcfg(redis_url, prefix, "b"), "b")
        mc = SharedMembership(cc, rec_c, rcfg(redis_url, prefix, "c"), "c")
        try:
            ma.start()
            mb.start()
            await asyncio.wait_for(asyncio.gather(ma.ready.wait(), mb.ready.wait()), 5)
            assert await ma.publish(Op.ADD, WorkerSpec(url=url, role="regular"))
            await wait_until(lambda: url in reg_b, 5.0, "b to register a's worker")
            assert await ma.publish(Op.DRAIN, WorkerSpec(url=url, drained=True))
            await wait_until(
                lambda: reg_b.router.get_worker(url).state is WorkerState.DRAINING, 5.0, "b to drain it"
            )
            mc.start()  # late joiner: learns the set from the hash, drained state included
            await asyncio.wait_for(mc.ready.wait(), 5)
            assert rec_c.changes == [("add", url), ("drain", url)]
            assert mc.known[url].drained
            assert await ma.publish(Op.REMOVE, WorkerSpec(url=url))
            await wait_until(lambda: url not in reg_b, 5.0, "b to remove it")
            await wait_until(lambda: ("remove", url) in rec_c.changes, 5.0, "c to hear the removal")
            assert rec_a.changes == []  # a never re-applies its own changes
        finally:
            for m in (ma, mb, mc):
                await m.close()
            for c in (ca, cb, cc):
                await c.aclose()
            await reg_b.close()


def _policy_of(router: Router) -> tuple[str, dict[str, Any]]:
    info = router.policy_info()
    return info["name"], info["params"]


async def test_policy_set_on_one_replica_reaches_the_others(
    redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """a's admin policy change reaches b at once and c when it starts later (stored, not only published);
    a replica that cannot build a shared policy keeps its own and says why; own changes are not re-applied."""
    ra, rb, rc = (Router(policy="round_robin") for _ in range(3))
    clients = [connect(redis_url, 0.5) for _ in range(3)]
    applied: dict[str, list[str]] = {"a": [], "b": [], "c": []}

    def applier(rid: str, router: Router) -> Any:
        def apply(name: str, params: dict[str, Any]) -> None:
            router.set_policy(name, params)
            applied[rid].append(name)

        return apply

    sa, sb, sc = (
        SharedPolicy(c, applier(rid, r), rcfg(redis_url, prefix, rid), rid, _policy_of(r))
        for c, rid, r in zip(clients, "abc", (ra, rb, rc), strict=True)
    )
    try:
        sa.start()
        sb.start()
        await asyncio.wait_for(asyncio.gather(sa.ready.wait(), sb.ready.wait()), 5)
        assert applied == {"a": [], "b": [], "c": []}  # nothing stored yet: both keep --policy
        ra.set_policy("least_load", {"metric": "requests"})
        assert await sa.publish(*_policy_of(ra))
        await wait_until(lambda: _policy_of(rb) == _policy_of(ra), 5.0, "b to take a's policy")
        assert rb.policy_info()["params"]["metric"] == "requests"
        sc.start()  # late joiner: reads the stored change
        await asyncio.wait_for(sc.ready.wait(), 5)
        assert _policy_of(rc) == _policy_of(ra)
        with caplog.at_level("ERROR", logger="kvroute.replicas"):
            assert await sb.publish("no_such_policy", {})  # as from a newer version of kvroute
            await wait_until(lambda: "cannot apply shared policy no_such_policy" in caplog.text, 5.0, "error")
        assert _policy_of(ra)[0] == "least_load"  # kept its policy
        assert applied["a"] == [] and applied["b"] == ["least_load"]  # a never re-applied its own change
    finally:
        for s in (sa, sb, sc):
            await s.close()
        for c in clients:
            await c.aclose()


async def test_membership_publish_without_redis_keeps_local(prefix: str) -> None:
    """Redis down at publish time: False, logged, no exception into the admin call."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    c = connect(url, 0.3)
    m = SharedMembership(c, Recorder(), rcfg(url, prefix, "a"), "a")
    try:
        assert not await m.publish(Op.ADD, WorkerSpec(url=W1))
        assert m.known == {}
        m.start()
        await wait_until(lambda: m.degraded, 5.0, "the channel to report degraded")
        assert not m.ready.is_set()
    finally:
        await m.close()
        await c.aclose()


async def test_membership_survives_redis_losing_its_data(tmp_path: Path) -> None:
    """Redis restarts empty: replicas reconnect, keep their workers (no mass removal) and re-seed the set."""
    if not shutil.which("redis-server"):
        pytest.skip("needs a redis-server binary to stop and restart")
    srv = RedisServer(tmp_path)
    srv.start()
    ca, cb = connect(srv.url, 0.5), connect(srv.url, 0.5)
    rec_b = Recorder()
    ma = SharedMembership(ca, Recorder(), rcfg(srv.url, "kvroute-loss", "a"), "a")
    mb = SharedMembership(cb, rec_b, rcfg(srv.url, "kvroute-loss", "b"), "b")
    try:
        ma.start()
        mb.start()
        await asyncio.wait_for(asyncio.gather(ma.ready.wait(), mb.ready.wait()), 5)
        assert await ma.publish(Op.ADD, WorkerSpec(url=W1))
        await wait_until(lambda: W1 in mb.known, 5.0, "b to learn W1")
        srv.stop()
        await wait_until(lambda: ma.degraded and mb.degraded, 5.0, "both channels to notice the outage")
        srv.start()  # same port, no data
        await wait_until(lambda: not ma.degraded and not mb.degraded, 10.0, "both to reconnect")
        assert rec_b.changes == [("add", W1)]  # no removal applied on the empty snapshot
        assert W1 in ma.known and W1 in mb.known
        with redis.Redis.from_url(srv.url, decode_responses=True) as c:
            assert W1 in c.hgetall("kvroute-loss:workers")  # re-seeded for replicas that start later
    finally:
        for m in (ma, mb):
            await m.close()
        for c in (ca, cb):
            await c.aclose()
        srv.stop()


# --- the runtime as the app would run it (records, load and membership together) --------------------

PROMPT = RoutingRequest(
    block_hashes=tuple(BlockHash(1000 + i) for i in range(8)), prompt_tokens=128, block_size=16
)


def _fleet(policy: str) -> Router:
    r = Router(block_size=16, policy=policy)
    for url in (W1, W2):
        r.add_worker(Worker(url=url, state=WorkerState.HEALTHY))
    return r


async def test_runtime_shares_records_load_and_membership(redis_url: str, prefix: str) -> None:
    ra, rb = _fleet("cache_aware"), _fleet("cache_aware")
    ra.routed_hooks = []  # type: ignore[attr-defined]  # the proposed Router hook (see docs/replicas.md)
    async with aiohttp.ClientSession() as session:
        reg_a, reg_b = await _registry(session, ra), await _registry(session, rb)
        try:
            async with (
                # prompts in flight not shared: b must see a's load through the load sync itself
                replica_context(
                    rcfg(redis_url, prefix, "a", share_records=True, share_inflight=False), ra, reg_a
                ) as rt_a,
                replica_context(
                    rcfg(redis_url, prefix, "b", share_records=True, share_inflight=False), rb, reg_b
                ) as rt_b,
            ):
                assert rt_a is not None and rt_b is not None
                assert rt_a.on_routed in ra.routed_hooks  # type: ignore[attr-defined]
                assert rb.select(PROMPT).worker == W1  # b knows nothing yet: least loaded, first on ties
                w2 = ra.get_worker(W2)
                assert w2 is not None
                ticket = ra.on_routed(W2, PROMPT)  # a sends the prompt to W2 ...
                for hook in ra.routed_hooks:  # type: ignore[attr-defined]
                    hook(PROMPT, w2)  # ... and, with the hook applied, Router.on_routed calls this
                await wait_until(lambda: rb.select(PROMPT).worker == W2, 5.0, "b to learn a's placement")
                assert rb.select(PROMPT).reason.startswith("cache hit 8/8")
                b_w2 = rb.get_worker(W2)
                assert b_w2 is not None
                await wait_until(lambda: b_w2.load.in_flight == 1, 5.0, "b to see a's load")
                url = refused_url()
                reg_a.add(url)  # an admin add on a, shared through the hook
                rt_a.notify_add(url)
                await wait_until(lambda: url in reg_b, 5.0, "b to register the worker")
                rt_a.notify_drain(url)
                await wait_until(
                    lambda: rt_b.membership is not None and rt_b.membership.known[url].drained, 5.0, "drain"
                )
                st = rt_b.status()
                assert st["peers"] == ["a"] and not st["degraded"] and st["shared_workers"] == [url]
                ra.on_finished(ticket)
            assert ra.routed_hooks == []  # type: ignore[attr-defined]  # detached on close
        finally:
            await reg_a.close()
            await reg_b.close()


async def test_runtime_shares_prompts_in_flight_for_kv_aware(redis_url: str, prefix: str) -> None:
    """An 8k-token prompt a routes to W2 is held in flight on W2 by b within milliseconds, so b sends a
    follower there as a would (no KV event exists yet); c, sharing load but not prompts, sees only a busy
    W2 and sends the follower elsewhere to prefill it again. A repeat of the prompt is not re-sent."""
    ra, rb, rc = _fleet("kv_aware"), _fleet("kv_aware"), _fleet("kv_aware")
    long_prompt = RoutingRequest(
        block_hashes=tuple(BlockHash(7000 + i) for i in range(512)), prompt_tokens=8192, block_size=16
    )
    async with (
        replica_context(rcfg(redis_url, prefix, "a"), ra, None) as rt_a,
        replica_context(rcfg(redis_url, prefix, "b"), rb, None) as rt_b,
        replica_context(rcfg(redis_url, prefix, "c", share_inflight=False), rc, None) as rt_c,
    ):
        assert rt_a is not None and rt_b is not None and rt_c is not None
        assert rt_a.inflight is not None and rt_b.inflight is not None and rt_c.inflight is None
        await asyncio.wait_for(rt_b.inflight.ready.wait(), 5)
        ticket = ra.on_routed(W2, long_prompt)  # a sends the prompt to W2: the hook publishes it
        assert ra.select(long_prompt).worker == W2  # a's own follower: wait for that prefill, reuse it

        def pending_on_w2(r: Router) -> bool:
            w = r.get_worker(W2)
            return w is not None and w.load.pending_prefill_tokens == 8192

        await wait_until(lambda: pending_on_w2(rb) and pending_on_w2(rc), 5.0, "b and c to see a's load")
        await wait_until(lambda: rb.load.inflight.match(long_prompt.block_hashes) == {W2: 512}, 5.0, "b")
        assert rb.select(long_prompt).worker == W2  # b follows the prompt as a would
        assert rc.select(long_prompt).worker == W1  # c: W2 merely looks busy
        assert rc.load.inflight.match(long_prompt.block_hashes) == {}
        ra.on_finished(ticket)
        ra.on_finished(ra.on_routed(W2, long_prompt))  # the same prompt again, at once: not re-published
        await wait_until(lambda: rt_a.inflight is not None and not rt_a.inflight._buffer, 5.0, "a's flush")
        assert rt_a.inflight.published == 1 and rt_b.inflight.applied == 1
        assert rt_a.status()["inflight_published"] == 1
    assert rb.load.inflight.match(long_prompt.block_hashes) == {W2: 512}  # held for its TTL after a's end


async def test_record_stream_is_capped(redis_url: str, prefix: str) -> None:
    got: list[tuple[str, list[BlockHash]]] = []
    c = connect(redis_url, 0.5)
    share = RoutingRecordShare(
        c, lambda u, h: got.append((u, list(h))), rcfg(redis_url, prefix, "a"), "a", max_entries=5
    )
    try:
        for i in range(300):
            share.record(W1, [BlockHash(i)])
            assert await share.sync_once()
        assert got == []  # own records are never applied back
        assert await c.xlen(f"{prefix}:records") < 300  # MAXLEN ~ trims (approximately, by whole nodes)
        other = RoutingRecordShare(
            c, lambda u, h: got.append((u, list(h))), rcfg(redis_url, prefix, "b"), "b"
        )
        assert await other.sync_once()
        assert got and got[-1] == (W1, [BlockHash(299)])  # a late replica replays what the stream kept
    finally:
        await c.aclose()


# --- two router apps on loopback, one simulated fleet, one Redis -----------------------------------


async def _router_loads(r: Any) -> dict[str, int]:
    """A replica's view through its own HTTP API: worker url -> router-counted requests in flight."""
    async with r.session.get(r.url + "/get_loads") as resp:
        assert resp.status == 200
        return {w["url"]: w["router"]["in_flight"] for w in (await resp.json())["workers"]}


async def _poll(check: Any, timeout: float, what: str) -> None:
    """Await `check()` (an async predicate) until true; bounded."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.mark.slow
async def test_two_router_apps_share_load_and_admin_changes(
    redis_url: str, prefix: str, start_router: Any
) -> None:
    """Load routed through replica a shows in b's /get_loads (and steers b's policy) while it runs and
    leaves when it ends; an admin add/remove and a policy change on a reach b; /admin/replicas shows the
    peer."""
    from kvroute.engines.sim.fleet import SimFleet
    from tests.router.conftest import test_config

    async with SimFleet(3, time_scale=0.02) as fleet:
        w1, w2, w3 = fleet.urls
        common = dict(
            worker_urls=(w1, w2),
            policy="least_load",
            redis_url=redis_url,
            redis_key_prefix=prefix,
            sync_interval_s=0.05,
            replica_ttl_s=0.5,
        )
        a = await start_router(test_config(replica_id="a", **common))
        b = await start_router(test_config(replica_id="b", **common))
        await a.wait_healthy(2, timeout=10)
        await b.wait_healthy(2, timeout=10)
        for i in (0, 1):
            await fleet.set_faults(i, stall=True)  # requests are accepted and held: load stays in flight
        body = {"text": "hello " * 40, "sampling_params": {"max_new_tokens": 4}}
        req = asyncio.create_task(a.session.post(a.url + "/generate", json=body))
        try:
            await wait_until(lambda: sum(w.load.in_flight for w in a.core.workers()) == 1, 5.0, "a to route")
            (busy,) = [w.url for w in a.core.workers() if w.load.in_flight == 1]
            idle = w2 if busy == w1 else w1

            async def b_sees_it() -> bool:
                return await _router_loads(b) == {busy: 1, idle: 0}

            await _poll(b_sees_it, 5.0, "b's /get_loads to show a's request")
            async with b.session.post(b.url + "/admin/route/explain", json={"text": "other prompt"}) as resp:
                assert (await resp.json())["decision"]["worker"] == idle  # b steers around a's load
            assert await _router_loads(a) == {busy: 1, idle: 0}  # a's own view: not counted twice
        finally:
            for i in (0, 1):
                await fleet.set_faults(i, stall=False)
            resp = await asyncio.wait_for(req, 10)
            async with resp:
                assert resp.status == 200, await resp.text()

        async def b_sees_it_end() -> bool:
            return await _router_loads(b) == {w1: 0, w2: 0}

        await _poll(b_sees_it_end, 5.0, "a's finished request to leave b's view")

        async with a.session.post(a.url + "/admin/workers", json={"url": w3}) as resp:
            assert resp.status == 202
        await b.wait_healthy(3, timeout=10)  # b registered w3 itself (its own checks)
        async with b.session.get(b.url + "/admin/workers") as resp:
            assert w3 in {w["url"] for w in (await resp.json())["workers"]}
        async with a.session.get(a.url + "/admin/replicas") as resp:
            st = await resp.json()
        assert st["enabled"] and st["replica_id"] == "a" and st["peers"] == ["b"] and not st["degraded"]
        assert st["shared_workers"] == [w3]
        async with b.session.get(b.url + "/metrics") as resp:
            text = await resp.text()
        assert "kvroute_replica_peers 1.0" in text and "kvroute_replica_degraded 0.0" in text
        async with a.session.delete(a.url + "/admin/workers", params={"url": w3}) as resp:
            assert resp.status == 200
        await wait_until(lambda: w3 not in b.registry, 5.0, "b to remove w3")
        async with a.session.put(a.url + "/admin/policy", json={"name": "power_of_two"}) as resp:
            assert resp.status == 200
        await wait_until(lambda: b.core.policy_info()["name"] == "power_of_two", 5.0, "b to take a's policy")


async def test_membership_carries_pd_role_and_bootstrap_port() -> None:
    """A prefill worker added on one replica registers on the others in the prefill pool with its port."""
    r = Router()
    async with aiohttp.ClientSession() as session:
        reg = await _registry(session, r)
        try:
            url = refused_url()
            spec = WorkerSpec(url=url, role="prefill", bootstrap_port=9123)
            decoded = MembershipChange.decode(MembershipChange(Op.ADD, spec, "a").encode())
            assert decoded is not None and decoded.spec == spec
            await RegistryMembership(reg).apply_membership(decoded)
            w = r.get_worker(url)
            assert w is not None and w.role.value == "prefill" and w.bootstrap_port == 9123
        finally:
            await reg.close()


async def test_add_then_drain_at_once_keeps_order_and_spec(redis_url: str, prefix: str) -> None:
    """Two admin calls within one round trip: published in order, the drain keeps the add's spec."""
    ra, rb = _fleet("least_load"), _fleet("least_load")
    async with aiohttp.ClientSession() as session:
        reg_a, reg_b = await _registry(session, ra), await _registry(session, rb)
        try:
            async with (
                replica_context(rcfg(redis_url, prefix, "a"), ra, reg_a) as rt_a,
                replica_context(rcfg(redis_url, prefix, "b"), rb, reg_b) as rt_b,
            ):
                assert rt_a is not None and rt_b is not None and rt_b.membership is not None
                url = refused_url()
                rt_a.notify_add(url, "prefill", "tcp://127.0.0.1:1", 9100)
                rt_a.notify_drain(url, True)  # before the add has reached Redis
                m = rt_b.membership
                await wait_until(lambda: url in m.known and m.known[url].drained, 5.0, "b to see the drain")
                assert m.known[url] == WorkerSpec(url, "prefill", "tcp://127.0.0.1:1", True, 9100)
                await wait_until(
                    lambda: url in reg_b and rb.get_worker(url).state is WorkerState.DRAINING,
                    5.0,
                    "b drained",
                )
                with redis.Redis.from_url(redis_url, decode_responses=True) as c:
                    stored = WorkerSpec(**json.loads(c.hget(f"{prefix}:workers", url)))
                assert stored == m.known[url]  # a replica starting later learns the full spec
        finally:
            await reg_a.close()
            await reg_b.close()


async def test_replica_app_stopped_right_after_start_ends(redis_url: str, prefix: str) -> None:
    """Stopping at once (the port was taken, so serve gives up after the app started) must end: a cancel
    redis-py swallows while connecting used to leave the load sync running and shutdown hung."""
    from aiohttp import web

    from kvroute.router.app import create_app

    for _ in range(3):
        app = create_app(RouterConfig(redis_url=redis_url, redis_key_prefix=prefix, worker_urls=()))
        runner = web.AppRunner(app)
        await runner.setup()
        await asyncio.wait_for(runner.cleanup(), 10)

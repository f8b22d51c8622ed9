"""KV-event sockets in both directions, end to end: engines whose publisher connects (a concrete endpoint
address in --kv-events-config, SGLang's rule) are followed by the router binding that address."""

from __future__ import annotations

import random
import socket
from pathlib import Path
from typing import Any

from kvroute.engines.sim.fleet import SimFleet
from kvroute.router.discovery.server_info import event_sources
from kvroute.router.types import EventSource
from tests.router.conftest import wait_until


def _port_block(n: int) -> int:
    """`n` consecutive free ports below the ephemeral range: a publisher that connects takes an ephemeral
    source port on every retry, which must not land on a port the fleet binds next (its replay socket)."""
    lo = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        base = random.randrange(10000, max(10001, lo - n))
        try:
            socks = []
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port block")


async def test_connecting_publishers_are_bound_and_feed_the_index(start_router: Any) -> None:
    base = _port_block(4)
    async with SimFleet(workers=2, time_scale=0.01, event_base_port=base, event_bind=False) as fleet:
        r = await start_router(worker_urls=tuple(fleet.urls), policy="kv_aware")
        await r.wait_healthy(2)
        for url in fleet.urls:
            d = r.registry.describe(url)
            assert d["kv_events_socket"] == "bind" and d["kv_events_subscribed"], d
        prompt = "bound events " * 40
        async with r.session.post(r.url + "/generate", json={"text": prompt}) as resp:
            assert resp.status == 200
            worker = resp.headers["X-Kvroute-Worker"]
        await wait_until(lambda: r.core.index_stats()["workers"][worker]["blocks"] > 0, 5.0, "events")
        # the next request with that prefix goes back to that worker, predicted from events
        async with r.session.post(r.url + "/generate", json={"text": prompt + "more"}) as resp:
            assert resp.headers["X-Kvroute-Worker"] == worker
            assert int(resp.headers["X-Kvroute-Cached-Blocks"]) > 0
        assert r.core.blind_workers() == []


async def test_socket_mode_can_be_overridden(start_router: Any) -> None:
    """`--kv-events-socket connect` against connecting publishers: nothing arrives, and the worker is
    reported blind once it served traffic (the signal an operator gets for a wrong direction)."""
    base = _port_block(2)
    async with SimFleet(workers=1, time_scale=0.01, event_base_port=base, event_bind=False) as fleet:
        r = await start_router(worker_urls=tuple(fleet.urls), policy="kv_aware", kv_events_socket="connect")
        await r.wait_healthy(1)
        assert r.registry.describe(fleet.urls[0])["kv_events_socket"] == "connect"
        async with r.session.post(r.url + "/generate", json={"text": "x " * 64}) as resp:
            assert resp.status == 200
        assert r.core.blind_workers() == [fleet.urls[0]]


def test_event_sources_follow_sglangs_rule() -> None:
    url = "http://10.0.0.7:30000"
    wildcard = {"kv_events_config": '{"endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558"}'}
    assert event_sources(url, wildcard) == [
        EventSource(0, "tcp://10.0.0.7:5557", "tcp://10.0.0.7:5558", "", False)
    ]
    concrete = {"kv_events_config": '{"endpoint": "tcp://10.0.0.2:5557", "replay_endpoint": "tcp://*:5558"}'}
    assert event_sources(url, concrete) == [
        EventSource(0, "tcp://10.0.0.2:5557", "tcp://10.0.0.7:5558", "", True)
    ]
    # DP attention: one publisher per rank, ports offset by the rank (SGLang's offset_endpoint_port)
    dp = {**concrete, "dp_size": 2, "enable_dp_attention": True}
    assert [(s.rank, s.endpoint, s.replay_endpoint, s.bind) for s in event_sources(url, dp)] == [
        (0, "tcp://10.0.0.2:5557", "tcp://10.0.0.7:5558", True),
        (1, "tcp://10.0.0.2:5558", "tcp://10.0.0.7:5559", True),
    ]
    # an explicit bind setting (SGLang 0.5.23's config key) wins over the endpoint's form
    pinned = {"kv_events_config": '{"endpoint": "tcp://10.0.0.2:5557", "bind": true}'}
    assert event_sources(url, pinned) == [EventSource(0, "tcp://10.0.0.2:5557", None, "", False)]
    # plain DP without DP attention: every scheduler uses rank 0's publisher settings
    assert len(event_sources(url, {**wildcard, "dp_size": 2})) == 1

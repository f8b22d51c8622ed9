"""Worker registry: circuit breaker, event endpoint discovery, health checks, load polls."""

from __future__ import annotations

import pytest

from kvroute.router.breaker import CircuitBreaker
from kvroute.router.discovery import discover_kv_events
from kvroute.router.types import WorkerState
from tests.router.conftest import wait_until


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_circuit_breaker_cycle() -> None:
    clock = Clock()
    b = CircuitBreaker(failure_threshold=3, cooldown_s=10, success_threshold=2, clock=clock)
    assert not b.record_failure() and not b.record_failure()  # 2 < 3: still closed
    b.record_success()  # a success resets the count
    assert not b.record_failure() and not b.record_failure()
    assert b.record_failure() and b.poll() == "open"  # third in a row opens it
    clock.t = 9.9
    assert b.poll() == "open"  # cooldown not over
    clock.t = 10.0
    assert b.poll() == "half_open"
    assert b.record_failure() and b.poll() == "open"  # a half-open failure reopens at once
    clock.t = 20.0
    assert not b.record_success() and b.poll() == "half_open"  # 1 of 2 successes
    assert b.record_success() and b.poll() == "closed"


def test_circuit_breaker_disabled() -> None:
    b = CircuitBreaker(failure_threshold=0, cooldown_s=1, success_threshold=1)
    assert not any(b.record_failure() for _ in range(100)) and b.poll() == "closed"


@pytest.mark.parametrize(
    ("info", "expected"),
    [
        ({}, (None, None, "")),  # no publisher
        # SGLang 0.5.23: structured entry; wildcard host -> the worker's host.
        (
            {
                "kv_events": {
                    "endpoint_host": "*",
                    "endpoint_port_base": 5557,
                    "replay_endpoint_port_base": 5558,
                    "topic": "kv",
                    "block_size": 16,
                    "dp_size": 1,
                }
            },
            ("tcp://10.0.0.7:5557", "tcp://10.0.0.7:5558", "kv"),
        ),
        (
            {"kv_events": {"endpoint_host": "10.1.1.1", "endpoint_port_base": 6000}},
            ("tcp://10.1.1.1:6000", None, ""),
        ),
        # Older: the --kv-events-config JSON string among the server args.
        (
            {"kv_events_config": '{"publisher": "zmq", "endpoint": "tcp://*:5557", "topic": "t"}'},
            ("tcp://10.0.0.7:5557", None, "t"),
        ),
        (
            {"kv_events_config": '{"endpoint": "tcp://0.0.0.0:7000", "replay_endpoint": "tcp://*:7001"}'},
            ("tcp://10.0.0.7:7000", "tcp://10.0.0.7:7001", ""),
        ),
        # SGLang 0.5.10 connects to 0.0.0.0 (no wildcard by its rule): the router binds it as given
        (
            {"version": "0.5.10.post1", "kv_events_config": '{"endpoint": "tcp://0.0.0.0:7000"}'},
            ("tcp://0.0.0.0:7000", None, ""),
        ),
        ({"kv_events_config": "not json"}, (None, None, "")),
        # 0.5.23's per-rank sources (loopback for a wildcard bind): the worker's host is dialled.
        (
            {
                "kv_event_sources": [
                    {"dp_rank": 1, "endpoint": "tcp://127.0.0.1:5558"},
                    {
                        "dp_rank": 0,
                        "endpoint": "tcp://127.0.0.1:5557",
                        "topic": "",
                        "replay_endpoint": "tcp://127.0.0.1:6000",
                    },
                ]
            },
            ("tcp://10.0.0.7:5557", "tcp://10.0.0.7:6000", ""),
        ),
    ],
)
def test_discover_kv_events(info, expected) -> None:
    assert discover_kv_events("http://10.0.0.7:30000", info) == expected


async def test_health_checks_mark_unhealthy_then_healthy(engines, start_router) -> None:
    eng = await engines()
    r = await start_router(worker_urls=(eng.url,), health_check_interval_s=0.02, health_failure_threshold=2)
    await r.wait_healthy(1)
    w = r.core.get_worker(eng.url)
    eng.healthy = False
    await wait_until(lambda: w.state is WorkerState.UNHEALTHY, what="unhealthy after failed checks")
    assert "health check failed" in w.reason
    async with r.session.get(r.url + "/readiness") as resp:
        assert resp.status == 503
    eng.healthy = True
    await wait_until(lambda: w.state is WorkerState.HEALTHY, what="healthy again")


async def test_load_poll_corrects_engine_load(engines, start_router) -> None:
    eng = await engines()
    r = await start_router(worker_urls=(eng.url,), load_poll_interval_s=0.02)
    await r.wait_healthy(1)
    w = r.core.get_worker(eng.url)
    await wait_until(lambda: w.load.engine_running == 0 and w.load.engine_queued == 0, what="load polled")


async def test_circuit_opens_after_request_failures(engines, start_router) -> None:
    eng = await engines(mode="error500")
    r = await start_router(
        worker_urls=(eng.url,),
        circuit_failure_threshold=2,
        circuit_cooldown_s=60,
        max_retries=0,
        circuit_min_in_rotation=0,  # the default keeps the last worker in rotation (next test)
    )
    await r.wait_healthy(1)
    for _ in range(2):
        async with r.session.post(r.url + "/generate", json={"text": "abc"}) as resp:
            assert resp.status == 502
    w = r.core.get_worker(eng.url)
    assert w.state is WorkerState.UNHEALTHY and w.reason.startswith("circuit open")
    async with r.session.post(r.url + "/generate", json={"text": "abc"}) as resp:
        assert resp.status == 503  # no attempt while open
    assert len(eng.seen) == 2
    text = await (await r.session.get(r.url + "/metrics")).text()
    assert f'kvroute_circuit_opened_total{{worker="{eng.url}"}} 1.0' in text


async def test_circuit_never_takes_the_last_worker_out(engines, start_router) -> None:
    """Default `circuit_min_in_rotation=1`: a lone failing worker keeps getting attempts (502s, the
    engine's own answer) instead of every client getting 503 no_worker; the veto is visible."""
    eng = await engines(mode="error500")
    r = await start_router(worker_urls=(eng.url,), circuit_failure_threshold=2, max_retries=0)
    await r.wait_healthy(1)
    for _ in range(4):
        async with r.session.post(r.url + "/generate", json={"text": "abc"}) as resp:
            assert resp.status == 502
    assert len(eng.seen) == 4
    async with r.session.get(r.url + "/admin/workers") as resp:
        (desc,) = (await resp.json())["workers"]
    assert desc["circuit"] == "closed" and desc["circuit_openings_vetoed"] == 3 and desc["state"] == "healthy"


async def test_worker_serving_without_events_is_reported_blind(engines, start_router, caplog) -> None:
    eng = await engines()  # publishes no KV events
    r = await start_router(worker_urls=(eng.url,))
    await r.wait_healthy(1)
    async with r.session.post(r.url + "/generate", json={"text": "z" * 64}) as resp:  # 4 full blocks
        assert resp.status == 200
    text = await (await r.session.get(r.url + "/metrics")).text()
    assert "kvroute_blind_workers 1.0" in text
    assert f'kvroute_worker_blind{{worker="{eng.url}"}} 1.0' in text
    assert any("no KV events arrived" in rec.getMessage() for rec in caplog.records)

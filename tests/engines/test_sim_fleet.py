"""The fleet launcher: in-process context manager and the `python -m kvroute.engines.sim.fleet` command."""

from __future__ import annotations

import asyncio
import json
import signal
import sys

import aiohttp
import pytest

from kvroute.engines.sim.fleet import SimFleet, build_parser, fleet_from_args


async def test_fleet_of_three_has_distinct_ports_and_event_endpoints(session: aiohttp.ClientSession) -> None:
    async with SimFleet(3, time_scale=0.01) as f:
        assert len(set(f.urls)) == 3 and len(set(f.event_endpoints)) == 3
        for url, ev in zip(f.urls, f.event_endpoints, strict=True):
            async with session.get(url + "/server_info") as r:
                assert (await r.json())["kv_events"]["endpoint"] == ev
        assert [w.role for w in f.workers()] == ["null"] * 3


def test_cli_arguments_build_the_requested_fleet() -> None:
    args = build_parser().parse_args(
        ["--prefill", "1", "--decode", "2", "--base-port", "0", "--profile", "tiny", "--page-size", "32",
         "--kv-capacity-tokens", "4096", "--event-form", "map", "--error-rate", "0.5"]
    )  # fmt: skip
    f = fleet_from_args(args)
    assert f.roles == ["prefill", "decode", "decode"]
    e = f.engines[0]
    assert (e.config.page_size, e.capacity, e.config.event_form, e.faults.error_rate) == (
        32,
        4096,
        "map",
        0.5,
    )
    with pytest.raises(ValueError):
        SimFleet(0, prefill=1)  # a prefill engine without a decode partner


@pytest.mark.slow
async def test_module_entry_point_prints_workers_and_stops_on_sigint() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvroute.engines.sim.fleet", "--workers", "2", "--base-port", "0",
        "--profile", "tiny",
        "--time-scale", "0.01", "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines = [json.loads(await asyncio.wait_for(proc.stdout.readline(), 30)) for _ in range(2)]
        assert [w["index"] for w in lines] == [0, 1] and all(w["event_endpoint"] for w in lines)
        async with aiohttp.ClientSession() as s, s.get(lines[1]["url"] + "/health") as r:
            assert r.status == 200
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_event_base_port_binds_so_a_subscriber_receives_events() -> None:
    """Issue #18: with --event-base-port the engines connected instead of binding, so no event arrived."""
    import zmq
    import zmq.asyncio

    from kvroute.engines.sim.fleet import free_port

    base = free_port()
    async with SimFleet(1, event_base_port=base, time_scale=0.01) as fleet:
        assert fleet.event_endpoints == [f"tcp://127.0.0.1:{base}"]
        sub = zmq.asyncio.Context.instance().socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(f"tcp://127.0.0.1:{base}")
        try:
            async with aiohttp.ClientSession() as s:
                for i in range(50):  # until the subscription is live (a slow joiner misses the first ones)
                    # a new prompt each time: a repeat is a cache hit and stores no block, so no event
                    body = {"text": f"{i:04d}" + "x" * 64, "sampling_params": {"max_new_tokens": 1}}
                    async with s.post(fleet.urls[0] + "/generate", json=body) as r:
                        assert r.status == 200
                    if await sub.poll(100):
                        frames = await sub.recv_multipart()
                        assert len(frames) == 3
                        break
                else:
                    raise AssertionError("no KV event arrived on the fixed event port")
        finally:
            sub.close(linger=0)

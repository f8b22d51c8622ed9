"""Phases end to end over loopback: the simulated engine's SGLang timings, the recent-requests ring,
the phase metrics and the access log of a router in front of it."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest

from kvroute.engines.sim.fleet import SimFleet
from kvroute.router.observability.phases import TTFT_PHASES
from tests.router.conftest import wait_until

SGLANG_TIMING_FIELDS = ("queue_time", "prefill_waiting_latency", "prefill_launch_latency",
                        "forward_entry_time", "prefill_finished_time", "e2e_latency")  # fmt: skip


def _body(i: int, stream: bool = False, n: int = 4) -> dict[str, object]:
    return {
        "text": f"request {i} " + "lorem ipsum " * 40,
        "sampling_params": {"max_new_tokens": n, "ignore_eos": True},
        "stream": stream,
    }


async def test_sim_engine_reports_sglang_timing_fields_on_its_own_clock() -> None:
    async with SimFleet(workers=1, time_scale=0.05) as fleet, aiohttp.ClientSession() as s:
        fleet.engines[0].max_running = 1  # one running request: the next one waits in the queue
        url = fleet.urls[0] + "/generate"
        async with s.post(url, json=_body(0, stream=True, n=256)) as first:
            assert first.status == 200
            await first.content.readline()  # its first token: it is running (256 decode steps to go)
            async with s.post(url, json=_body(1, n=4)) as resp:
                assert resp.status == 200
                second = (await resp.json())["meta_info"]
            raw = await first.read()
        assert set(SGLANG_TIMING_FIELDS) <= set(second), second
        assert second["prefill_launch_latency"] > 0 and second["prefill_waiting_latency"] >= 0
        assert second["prefill_finished_time"] >= second["forward_entry_time"]
        # It waited for the first one's ~255 decode steps (~0.2 simulated seconds on the tiny profile).
        assert second["queue_time"] > 0.05
        # Streamed: the last chunk carries them too; the first request never queued.
        events = [ln[5:].strip() for ln in raw.split(b"\n") if ln.startswith(b"data:")]
        last = orjson.loads(events[-2])["meta_info"]
        assert set(SGLANG_TIMING_FIELDS) <= set(last) and last["queue_time"] < second["queue_time"]


async def test_phases_reach_ring_metrics_and_access_log(start_router, tmp_path) -> None:  # type: ignore[no-untyped-def]
    log_path = tmp_path / "access.jsonl"
    async with SimFleet(workers=2, time_scale=0.02) as fleet:
        r = await start_router(worker_urls=tuple(fleet.urls), access_log=str(log_path))
        await r.wait_healthy(2, timeout=10)
        for i in range(6):
            async with r.session.post(r.url + "/generate", json=_body(i, stream=i % 2 == 1)) as resp:
                assert resp.status == 200
                await resp.read()
        async with r.session.post(r.url + "/generate", data=b"{not json") as resp:
            assert resp.status == 400

        async with r.session.get(r.url + "/admin/requests/recent", params={"limit": "50"}) as resp:
            assert resp.status == 200
            recent = await resp.json()
        assert recent["count"] == 7 and recent["held"] == 7
        bad, *good = recent["requests"]  # newest first
        assert bad["status"] == 400 and bad["error"] == "invalid_json" and bad["phases"] is None
        assert {g["worker"] for g in good} == set(fleet.urls)
        for g in good:
            assert g["status"] == 200 and g["policy"] == "round_robin"
            assert set(g["phases"]) == set(TTFT_PHASES)
            assert sum(g["phases"].values()) == pytest.approx(g["ttft_s"], abs=1e-5)
            assert g["engine_queue_s"] is not None and g["engine_prefill_s"] > 0  # from the sim's meta_info
            assert g["prompt_tokens"] > 0 and g["output_tokens"] == 4
            assert g["first_byte_s"] <= g["ttft_s"]
        assert {g["stream"] for g in good} == {True, False}

        w0 = fleet.urls[0]
        async with r.session.get(r.url + "/admin/requests/recent", params={"worker": w0}) as resp:
            only = (await resp.json())["requests"]
        assert only and {g["worker"] for g in only} == {w0}
        slowest = max(g["ttft_s"] for g in good) - 1e-5  # below the rounding of the JSON
        async with r.session.get(
            r.url + "/admin/requests/recent", params={"min_ttft_s": str(slowest)}
        ) as resp:
            slow = (await resp.json())["requests"]
        assert [g["rid"] for g in slow] == [g["rid"] for g in good if g["ttft_s"] >= slowest]
        async with r.session.get(r.url + "/admin/requests/recent", params={"limit": "zero"}) as resp:
            assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_limit"

        async with r.session.get(r.url + "/metrics") as resp:
            text = await resp.text()
        for phase in TTFT_PHASES:
            assert f'kvroute_ttft_phase_seconds_count{{phase="{phase}",worker="{w0}"}} 3.0' in text
        assert 'kvroute_route_decisions_total{policy="round_robin",reason="load"} 6.0' in text
        assert f'kvroute_new_prompt_tokens_count{{worker="{w0}"}} 3.0' in text
        assert f'kvroute_worker_circuit_state{{state="closed",worker="{w0}"}} 1.0' in text

    # Lines are flushed within 0.5 s of being written.
    await wait_until(lambda: len(log_path.read_bytes().splitlines()) == 7, what="access log flushed")
    lines = [orjson.loads(x) for x in log_path.read_bytes().splitlines()]
    assert [x["rid"] for x in lines] == [x["rid"] for x in reversed(recent["requests"])]


async def test_admission_wait_is_a_phase_and_tenants_reach_the_status(start_router) -> None:  # type: ignore[no-untyped-def]
    """With admission on and a bound of one pending prefill token per worker, the second of two
    simultaneous requests waits in the router's queue until the first one's first token."""
    async with SimFleet(workers=1, time_scale=1.0, profile="h100-llama3-8b") as fleet:
        r = await start_router(
            worker_urls=tuple(fleet.urls),
            tenants={"chat": {"class": "interactive", "api_keys": ["key-chat"]}},
            admission_max_queued_prefill_tokens=1,
        )
        await r.wait_healthy(1, timeout=10)

        async def one(i: int) -> None:
            headers = {"Authorization": "Bearer key-chat"}
            async with r.session.post(r.url + "/generate", json=_body(i, n=8), headers=headers) as resp:
                assert resp.status == 200
                await resp.read()

        await asyncio.gather(one(0), one(1))
        async with r.session.get(r.url + "/admin/requests/recent") as resp:
            reqs = (await resp.json())["requests"]
        waits = sorted(g["phases"]["admission"] for g in reqs)
        assert waits[0] < 0.005 <= waits[1]  # the second waited for the first one's prefill (tens of ms)
        for g in reqs:
            assert sum(g["phases"].values()) == pytest.approx(g["ttft_s"], abs=1e-5)
        async with r.session.get(r.url + "/admin/status") as resp:
            st = await resp.json()
        (row,) = st["tenants"]
        assert row["tenant"] == "chat" and row["class"] == "interactive" and row["admitted"] == 2

"""`kvroute diagnose` names the slow engine and the phase: a live fleet with one deliberately slow
simulated engine (one running slot: its requests wait in its queue), and recorded snapshots."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import orjson
import pytest

from kvroute.engines.sim.fleet import SimFleet
from kvroute.router.observability.diagnose import (
    _quantile,
    diagnose,
    fetch,
    fetch_status,
    windows_from_metrics,
)


def _body(i: int) -> dict[str, object]:
    return {
        "text": f"user {i}: " + "summarise the quarterly report " * 8,
        "sampling_params": {"max_new_tokens": 48, "ignore_eos": True},
        "stream": True,
    }


@pytest.mark.slow
async def test_diagnose_names_the_slow_engine_and_its_queue(start_router) -> None:  # type: ignore[no-untyped-def]
    # H100 costs in real time: a request's 48 decode steps take ~0.3 s, far above what a loaded CI host
    # adds (the engine reports its queue on its own clock, which does not count host overhead).
    async with SimFleet(workers=3, time_scale=1.0, profile="h100-llama3-8b") as fleet:
        slow = fleet.urls[1]
        fleet.engines[1].max_running = 1  # one request at a time: the rest wait in the engine's queue
        r = await start_router(worker_urls=tuple(fleet.urls), policy="round_robin")
        await r.wait_healthy(3, timeout=10)

        async def one(i: int) -> None:
            async with r.session.post(r.url + "/generate", json=_body(i)) as resp:
                assert resp.status == 200
                await resp.read()

        # Bursts of 12 streamed requests: 4 per worker; on the slow one 3 of them wait in its queue.
        for wave in range(2):
            await asyncio.gather(*(one(wave * 12 + i) for i in range(12)))

        d = diagnose(await fetch_status(r.url, None, 60.0))
        assert d.requests == 24
        assert d.worst == slow
        top = d.workers[0]
        assert top.url == slow and top.dominant_phase == "engine_queue"
        assert top.causes[0].kind == "phase" and top.causes[0].phase == "engine_queue"
        assert top.slowdown is not None and top.slowdown > 1.5
        line = next(ln for ln in d.report().splitlines() if ln.strip().startswith(slow))
        assert "of TTFT p99 in the engine's queue" in line

        # With the ring off (an empty window), /metrics since start tells the same story.
        status, metrics = await fetch(r.url, None, 60.0)
        assert metrics is not None
        for w in status["workers"]:
            w["window"] = {"requests": 0}
        status["fleet"] = {"requests": 0}
        d2 = diagnose(status, windows_from_metrics(metrics))
        assert d2.worst == slow and d2.workers[0].dominant_phase == "engine_queue"
        assert d2.workers[0].source == "metrics" and d2.workers[0].requests == 8
        assert "mean TTFT since start in the engine's queue" in d2.report()

        # The command itself, against the live router (a subprocess: its own event loop).
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kvroute", "diagnose", r.url, "--json",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err
        js = orjson.loads(out)
        assert js["worst"] == slow and js["workers"][0]["causes"][0]["phase"] == "engine_queue"


def _worker(
    url: str, p99: float, tail: dict[str, float], hit: float, new: float, **kw: object
) -> dict[str, object]:
    w: dict[str, object] = {
        "url": url,
        "state": "healthy",
        "circuit": "closed",
        "blind": False,
        "load": {"engine_queued": 0},
        "events": None,
        "window": {
            "requests": 50,
            "ttft_p50_s": p99 / 3,
            "ttft_p99_s": p99,
            "p99_phases_s": tail,
            "hit_ratio": hit,
            "new_tokens_mean": new,
        },  # fmt: skip
    }
    w.update(kw)
    return w


def test_diagnose_ranks_cache_miss_and_prefill_load_on_a_recorded_snapshot() -> None:
    tail_ok = {"route": 0.001, "engine_queue": 0.05, "engine_prefill": 0.2, "other": 0.05}
    tail_bad = {"route": 0.001, "engine_queue": 0.3, "engine_prefill": 1.6, "other": 0.1}
    status = {
        "window_s": 60,
        "fleet": {
            "requests": 150,
            "ttft_p50_s": 0.1,
            "ttft_p99_s": 2.0,
            "hit_ratio": 0.61,
            "p99_phases_s": tail_bad,
        },  # fmt: skip
        "workers": [
            _worker("http://w1", 0.3, tail_ok, 0.7, 1000),
            _worker("http://w3", 2.0, tail_bad, 0.12, 4000),
            _worker("http://w2", 0.31, tail_ok, 0.65, 1100, circuit="half_open"),
        ],
        "replicas": {"enabled": False},
    }
    d = diagnose(status)
    assert [w.url for w in d.workers] == ["http://w3", "http://w2", "http://w1"]
    w3 = d.workers[0]
    assert w3.causes[0].kind == "phase" and {c.kind for c in w3.causes} == {
        "phase",
        "prefill_load",
        "cache_miss",
    }
    assert w3.dominant_phase == "engine_prefill" and w3.dominant_share == pytest.approx(0.8, abs=0.01)
    assert "hit ratio 12% vs fleet 61%" in w3.line()
    assert d.workers[1].causes[0].kind == "breaker"  # a half-open breaker outranks everything on w2
    report = d.report()
    assert "80% of TTFT p99 in prefill" in report and "look first at http://w3" in report
    print(report)


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    cum = [(0.1, 10.0), (1.0, 90.0), (10.0, 100.0), (float("inf"), 100.0)]
    assert _quantile(cum, 0.5) == pytest.approx(0.1 + 0.9 * (50 - 10) / 80)
    assert _quantile(cum, 0.99) == pytest.approx(1.0 + 9.0 * (99 - 90) / 10)
    assert _quantile([(1.0, 0.0), (float("inf"), 0.0)], 0.5) is None
    assert _quantile([(1.0, 5.0), (float("inf"), 10.0)], 0.99) == 1.0  # in +Inf: the last finite bound

"""Phases, engine timings, the recent-requests ring and the access log, without a network."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from kvroute.router.observability.access_log import AccessLog
from kvroute.router.observability.phases import TTFT_PHASES, RequestPhases, engine_timings, reason_class
from kvroute.router.observability.ring import RecentQuery, RecentRequests, quantile, summarize


def _req(
    worker: str = "w0",
    ttft: float = 1.0,
    *,
    queue: float | None = 0.5,
    prefill: float | None = 0.2,
    route: float = 0.001,
    connect: float = 0.01,
    status: int = 200,
    rid: str = "r",
) -> RequestPhases:
    ph = RequestPhases(rid=rid, route="/generate", t0=100.0, started_at=1000.0, worker=worker)
    ph.route_s = route
    ph.sent_at = 100.0 + route
    ph.head_at = ph.sent_at + connect
    ph.first_at = 100.0 + ttft
    ph.end_at = 100.0 + ttft + 1.0
    ph.engine_queue_s, ph.engine_prefill_s = queue, prefill
    ph.status = status
    ph.stream = True
    ph.prompt_tokens, ph.cached_tokens, ph.output_tokens = 100, 40, 11
    return ph


@pytest.mark.parametrize(
    ("ttft", "queue", "prefill", "connect", "expect"),
    [
        # streamed: every part fits; the rest is "other"
        (1.0, 0.5, 0.2, 0.01, {"engine_queue": 0.5, "engine_prefill": 0.2, "connect": 0.01}),
        # no engine timings (OpenAI route, engine without metrics): the engine's time is "other"
        (1.0, None, None, 0.01, {"engine_queue": 0.0, "engine_prefill": 0.0, "connect": 0.01}),
        # the head came late (connect ~ ttft): the engine's own phases are taken out of it first
        (1.0, 0.6, 0.3, 0.998, {"engine_queue": 0.6, "engine_prefill": 0.3, "connect": 0.099}),
        # engine clock longer than what the router saw (sim time scale): clamped to the TTFT
        (0.1, 5.0, 1.0, 0.01, {"engine_queue": 0.099, "engine_prefill": 0.0}),
    ],
)
def test_ttft_breakdown_adds_up_to_the_ttft(ttft, queue, prefill, connect, expect) -> None:  # type: ignore[no-untyped-def]
    ph = _req(ttft=ttft, queue=queue, prefill=prefill, connect=connect)
    parts = ph.ttft_breakdown()
    assert parts is not None and tuple(parts) == TTFT_PHASES
    assert sum(parts.values()) == pytest.approx(ttft)
    assert all(v >= 0 for v in parts.values())
    for k, v in expect.items():
        assert parts[k] == pytest.approx(v, abs=1e-9), k
    assert parts["route"] == pytest.approx(0.001)


def test_non_streamed_answers_have_no_connect_phase() -> None:
    ph = _req(ttft=1.0, queue=0.2, prefill=0.1, connect=0.99)
    ph.stream = False  # the head arrived with the whole body
    parts = ph.ttft_breakdown()
    assert parts is not None and parts["connect"] == 0.0
    assert parts["other"] == pytest.approx(1.0 - 0.001 - 0.3)


def test_no_first_token_means_no_breakdown() -> None:
    ph = _req()
    ph.first_at = None
    assert ph.ttft_breakdown() is None and ph.as_dict()["phases"] is None


def test_engine_timings_read_sglang_meta_info_names() -> None:
    # Field names as SGLang 0.5.10 writes them (observability/req_time_stats.py).
    meta = {"queue_time": 0.25, "prefill_waiting_latency": 0.05, "prefill_launch_latency": 0.125,
            "forward_entry_time": 1.7e9, "e2e_latency": 2.0}  # fmt: skip
    assert engine_timings(meta) == (pytest.approx(0.3), 0.125)
    assert engine_timings({"queue_time": 0.1, "prefill_waiting_latency": None}) == (0.1, None)
    assert engine_timings({"cached_tokens": 3}) == (None, None)
    assert engine_timings(None) == (None, None)
    assert engine_timings({"queue_time": -1, "prefill_launch_latency": True}) == (None, None)


def test_reason_class_is_bounded() -> None:
    assert reason_class("imbalanced: least loaded", 3) == "imbalance"
    assert reason_class("softmax T=0.5: cost 1.0 (cached 2 blocks)", 2) == "explore"
    assert reason_class("min cost 3.0 (cached 4 blocks)", 4) == "prefix_hit"
    assert reason_class("min cost 3.0 (cached 0 blocks)", 0) == "load"


def test_ring_is_bounded_and_filters() -> None:
    ring = RecentRequests(5)
    for i in range(8):
        ring.add(_req(worker=f"w{i % 2}", ttft=0.1 * (i + 1), rid=f"r{i}", status=500 if i == 7 else 200))
    assert len(ring) == 5
    newest = ring.query(RecentQuery(limit=2))
    assert [p.rid for p in newest] == ["r7", "r6"]
    assert {p.worker for p in ring.query(RecentQuery(worker="w0"))} == {"w0"}
    slow = ring.query(RecentQuery(min_ttft_s=0.65))
    assert [p.rid for p in slow] == ["r7", "r6"]
    assert [p.rid for p in ring.query(RecentQuery(errors=True))] == ["r7"]
    off = RecentRequests(0)
    off.add(_req())
    assert len(off) == 0 and off.query(RecentQuery()) == []


def test_summarize_quantiles_and_tail_phases() -> None:
    reqs = [_req(ttft=1.0, queue=0.1) for _ in range(99)] + [_req(ttft=10.0, queue=9.0)]
    s = summarize(reqs)
    assert s.ttft_p50_s == pytest.approx(1.0) and s.ttft_p99_s == pytest.approx(1.0)
    assert s.p99_phases_s["engine_queue"] == pytest.approx(9.0)  # the slowest 1%: the 10 s request
    assert s.phases_mean_s["engine_queue"] == pytest.approx((99 * 0.1 + 9.0) / 100)
    assert s.hit_ratio == pytest.approx(0.4)
    assert quantile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0 and quantile([], 0.5) is None


async def test_access_log_writes_one_json_line_per_request(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "access.jsonl"
    log = AccessLog(str(path))
    log.write(_req(rid="a"))
    log.write(_req(rid="b", status=502))
    await asyncio.sleep(0)  # lines stay buffered until the flush timer or close
    log.close()
    lines = [orjson.loads(x) for x in path.read_bytes().splitlines()]
    assert [x["rid"] for x in lines] == ["a", "b"]
    assert lines[1]["status"] == 502
    assert set(lines[0]["phases"]) == set(TTFT_PHASES)
    assert lines[0]["new_tokens"] == 60


def test_batched_phase_metrics_equal_direct_observations() -> None:
    """The bulk path (bucket counts added at flush) gives the histogram exactly what `observe` would."""
    from kvroute.router.metrics import Metrics
    from kvroute.router.observability.phase_metrics import PhaseMetrics

    batched, direct = Metrics(), Metrics()
    pm = PhaseMetrics(batched)
    reqs = [_req(ttft=t, queue=q) for t, q in ((0.05, 0.01), (1.0, 0.5), (3.0, 2.9), (70.0, 60.0))]
    for ph in reqs:
        parts = ph.ttft_breakdown()
        assert parts is not None
        pm.observe("w0", parts, 60)
        for phase, v in parts.items():
            direct.ttft_phase.labels("w0", phase).observe(v)
        direct.new_prompt_tokens.labels("w0").observe(60)
    pm.flush()
    pm.flush()  # nothing new: adds nothing

    def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in m.registry.collect()
            if fam.name in ("kvroute_ttft_phase_seconds", "kvroute_new_prompt_tokens")
            for s in fam.samples
            if not s.name.endswith("_created")
        }

    got, want = samples(batched), samples(direct)
    assert got.keys() == want.keys() and len(got) > 50
    for k, v in want.items():
        assert got[k] == pytest.approx(v), k

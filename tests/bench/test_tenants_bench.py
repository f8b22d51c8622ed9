"""kvroute.bench.tenants' workload and its verdict on made-up results (the run itself is the benchmark)."""

from __future__ import annotations

from pathlib import Path

from kvroute.bench.loadgen import RequestResult
from kvroute.bench.tenants import ENGINES, Args, prefill_s, summarize, verdict, workload


def test_workload_shapes() -> None:
    a = Args(20.0, 6.0, 1.5, 128, 0, Path("/tmp"), ("tenants",))
    chat, batch, rate = workload(a)
    assert abs(rate - 1.5 * ENGINES / prefill_s(12_000)) < 1e-9 and 10 < rate < 25
    assert all(r.prompt_tokens == 1500 and r.output_tokens == 32 for r in chat)
    assert len({r.text[:1000] for r in chat}) == 1  # one shared system prompt
    assert len({r.text[1000:] for r in chat}) == len(chat)  # unique questions
    assert all(r.prompt_tokens == 12_000 and r.output_tokens == 128 for r in batch)
    assert len({r.text for r in batch}) == len(batch)
    assert 60 <= len(chat) <= 180 and abs(len(batch) - rate * 20) < 5 * (rate * 20) ** 0.5


def _r(rid: str, ok: bool, status: int | None, ttft: float | None = None, **kw: object) -> RequestResult:
    return RequestResult(rid, "x", ok, 100, 0.0, ttft_s=ttft, status=status, **kw)  # type: ignore[arg-type]


def test_summary_and_verdict_count_what_the_targets_need() -> None:
    chat = [_r(f"c{i}", True, 200, 0.5, output_tokens=32, done_s=1.0) for i in range(98)]
    chat += [_r(f"slow{i}", True, 200, 1.5, output_tokens=32, done_s=2.0) for i in range(2)]
    batch = [
        _r("ok", True, 200, 5.0, output_tokens=128, done_s=10.0),
        _r("late", True, 200, 5.0, output_tokens=128, done_s=70.0),
        _r("rej", False, 429, retry_after="3"),
        _r("rej-bare", False, 429),
        _r("gone", False, None, error="TimeoutError"),
    ]
    s_chat, s_batch = summarize(chat, 60.0), summarize(batch, 60.0)
    assert s_chat["within_slo"] == 0.98 and s_chat["ttft_p99_s"] == 1.5
    assert (s_batch["http_429"], s_batch["http_429_with_retry_after"], s_batch["lost"]) == (2, 1, 1)
    assert s_batch["output_tokens_in_window"] == 128 and s_batch["output_tokens"] == 256
    report = {
        "runs": {
            "tenants": {"chat": s_chat, "batch": s_batch},
            "calib": {"batch": {**s_batch, "output_tokens_in_window": 150}},
        }
    }
    v = verdict(report, Args(60.0, 6.0, 1.5, 128, 0, Path("/tmp"), ()))
    assert not v["chat_within_slo_ge_99pct"] and not v["chat_ttft_p99_le_1s"]
    assert not v["batch_all_completed_or_429_retry_after"]  # one lost, one 429 without Retry-After
    assert v["batch_fraction_of_capacity"] == round(128 / (150 * (1 - v["chat_share_of_prefill_time"])), 3)

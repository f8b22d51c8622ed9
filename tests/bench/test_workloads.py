"""Workload generators and the prefix-reuse ceiling on hand-built inputs whose answers are known."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kvroute.bench.workloads import Request, Workload, WorkloadError, block_text, build
from kvroute.bench.workloads.ceiling import prefix_reuse_ceiling, ttft_lower_bounds


def _req(rid: str, text: str, t: float = 0.0) -> Request:
    return Request(rid=rid, arrival_s=t, text=text, output_tokens=1)


def test_ceiling_counts_whole_pages_seen_before_and_never_the_last_token() -> None:
    reqs = [
        _req("a", "aaaabbbbcc"),  # nothing seen before: 0
        _req("b", "aaaabbbbdd"),  # pages aaaa, bbbb seen; (10-1)//4 = 2 pages allowed: 8
        _req("c", "aaaabbbb"),  # both pages seen, but the last token is never cached: 1 page = 4
        _req("d", "xxxxaaaa"),  # first page unseen: the match stops there: 0
        _req("e", "aaaabbbxcccc"),  # second page differs in its last token: 1 page = 4
    ]
    c = prefix_reuse_ceiling(reqs, page_size=4)
    assert c.cached_tokens == (0, 8, 4, 0, 4)
    assert c.total_prompt == 10 + 10 + 8 + 8 + 12
    assert c.ratio == pytest.approx(16 / 48)


def test_ceiling_depends_on_order_and_page_size() -> None:
    reqs = [_req("a", "abcdefgh" * 2 + "z"), _req("b", "abcdefgh" * 2 + "y")]
    assert prefix_reuse_ceiling(reqs, 4).cached_tokens == (0, 16)
    assert prefix_reuse_ceiling(reqs, 16).cached_tokens == (0, 16)
    assert prefix_reuse_ceiling(reqs, 32).cached_tokens == (0, 0)  # no full page at all
    assert prefix_reuse_ceiling(reqs[::-1], 4).cached_tokens == (0, 16)
    with pytest.raises(ValueError):
        prefix_reuse_ceiling(reqs, 0)


def test_ttft_lower_bound_is_prefill_of_uncached_tokens() -> None:
    c = prefix_reuse_ceiling([_req("a", "aaaabbbbcc"), _req("b", "aaaabbbbdd")], page_size=4)
    calls: list[tuple[int, int]] = []

    def cost(new: int, cached: int) -> float:
        calls.append((new, cached))
        return 0.001 * new

    assert ttft_lower_bounds(c, cost) == pytest.approx([0.010, 0.002])
    assert calls == [(10, 0), (2, 8)]


def test_block_text_is_deterministic_ascii() -> None:
    assert block_text(7, 512) == block_text(7, 512)
    assert block_text(7, 512) != block_text(8, 512)
    assert block_text(7, 512, salt=1) != block_text(7, 512)
    assert block_text(7, 100) == block_text(7, 512)[:100]
    assert block_text(7, 512).isascii() and len(block_text(7, 512)) == 512


def _write_trace(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_mooncake_blocks_slices_and_rate(tmp_path: Path) -> None:
    from kvroute.bench.workloads import mooncake

    trace = _write_trace(
        tmp_path / "t.jsonl",
        [
            {"timestamp": 1000, "input_length": 1000, "output_length": 5, "hash_ids": [0, 1]},
            {"timestamp": 3000, "input_length": 600, "output_length": 7, "hash_ids": [0, 2]},
            {"timestamp": 4000, "input_length": 1100, "output_length": 9, "hash_ids": [0, 1, 3]},
        ],
    )
    wl = mooncake.load(trace, count=None)
    r0, r1, r2 = wl.requests
    assert [r.prompt_tokens for r in wl.requests] == [1000, 600, 1100]
    assert [r.arrival_s for r in wl.requests] == [0.0, 2.0, 3.0]  # relative to the slice's first request
    assert r0.text[:512] == r1.text[:512] and r0.text[512:600] != r1.text[512:600]
    assert r2.text.startswith(r0.text)  # same ids, same tokens; r0's last block was cut to 488
    assert [r.output_tokens for r in wl.requests] == [5, 7, 9]
    c = prefix_reuse_ceiling(wl.requests, 16)
    assert c.cached_tokens == (0, 512, 992)  # r2 reuses r0's 1000 tokens, whole 16-token pages: 62*16

    sl = mooncake.load(trace, start=1, count=2, rate_factor=2.0, max_output_tokens=8)
    assert [r.rid for r in sl.requests] == ["mc1", "mc2"]
    assert [r.arrival_s for r in sl.requests] == [0.0, 0.5]
    assert [r.output_tokens for r in sl.requests] == [7, 8]
    assert sl.requests[1].text == r2.text  # a slice gives the same prompts as the whole trace


def test_mooncake_rejects_inconsistent_trace(tmp_path: Path) -> None:
    from kvroute.bench.workloads import mooncake

    bad = _write_trace(
        tmp_path / "b.jsonl", [{"timestamp": 0, "input_length": 2000, "output_length": 1, "hash_ids": [0]}]
    )
    with pytest.raises(WorkloadError):
        mooncake.load(bad)


def test_bundled_mooncake_trace_slice() -> None:
    wl = build("mooncake", start=100, count=50)
    assert len(wl.requests) == 50 and wl.requests[0].arrival_s == 0.0
    assert all(r.text.isascii() for r in wl.requests)


def test_shared_prefix_ceiling_is_known() -> None:
    wl = build(
        "shared_prefix",
        groups=2,
        users_per_group=2,
        questions_per_user=1,
        context_tokens=64,
        question_tokens=16,
        rate_per_s=10.0,
        seed=3,
    )
    assert len(wl.requests) == 4
    assert wl == build(
        "shared_prefix",
        groups=2,
        users_per_group=2,
        questions_per_user=1,
        context_tokens=64,
        question_tokens=16,
        rate_per_s=10.0,
        seed=3,
    )
    assert len({r.text[:64] for r in wl.requests}) == 2  # two group contexts
    assert len({r.text[64:] for r in wl.requests}) == 4  # four distinct questions
    # First request of each group misses; the other of each reuses the 64-token context (4 pages).
    assert prefix_reuse_ceiling(wl.requests, 16).ratio == pytest.approx(2 * 64 / (4 * 80))


def test_multiturn_turns_extend_the_previous_one() -> None:
    from kvroute.cache_index.hashing import render_plain_chat

    wl = build("multiturn", sessions=3, turns=4, system_tokens=32, user_tokens=8, output_tokens=4, seed=1)
    assert len(wl.requests) == 12
    by_session: dict[str, list[Request]] = {}
    for r in wl.requests:
        assert r.messages is not None and render_plain_chat(r.messages) == r.text
        by_session.setdefault(r.session or "", []).append(r)
    assert len(by_session) == 3
    for turns in by_session.values():
        assert [r.rid.split(".")[1] for r in turns] == ["0", "1", "2", "3"]  # in arrival order
        for prev, nxt in zip(turns, turns[1:], strict=False):
            assert nxt.text.startswith(prev.text) and nxt.arrival_s >= prev.arrival_s
    assert prefix_reuse_ceiling(wl.requests, 4).ratio > 0.5


def test_rate_factor_and_validation() -> None:
    wl = build(
        "shared_prefix",
        groups=1,
        users_per_group=3,
        questions_per_user=1,
        context_tokens=16,
        question_tokens=4,
    )
    fast = wl.with_rate(4.0)
    assert [r.arrival_s for r in fast.requests] == pytest.approx([r.arrival_s / 4 for r in wl.requests])
    with pytest.raises(WorkloadError):
        wl.with_rate(0)
    with pytest.raises(WorkloadError):
        build("nope")
    with pytest.raises(WorkloadError):
        Workload("x", (_req("a", "a", 1.0), _req("b", "b", 0.5)))


def test_owner_affinity_counts_continuations_sent_to_their_prefix_owner() -> None:
    from kvroute.bench.workloads.ceiling import owner_affinity

    reqs = [
        _req("a", "aaaabbbbcc"),
        _req("b", "xxxxyyyyzz"),
        _req("c", "aaaabbbbdd"),  # continues a (on w1)
        _req("d", "xxxxyyyyqq"),  # continues b (on w2)
        _req("e", "mmmmnnnnoo"),  # no prefix: not counted
    ]
    assert owner_affinity(reqs, ["w1", "w2", "w1", "w1", "w3"], page_size=4) == pytest.approx(0.5)
    assert owner_affinity(reqs, ["w1", "w2", "w1", "w2", "w1"], page_size=4) == 1.0
    assert math.isnan(owner_affinity(reqs, ["w1", None, "w1", "w2", "w1"], page_size=4))

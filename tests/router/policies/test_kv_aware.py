"""kv_aware: the documented cost, term by term, the hot-spot guard, the in-flight prediction, softmax."""

from __future__ import annotations

from collections import Counter

import pytest

from kvroute.router.policies import PolicyContext, make_policy
from kvroute.router.types import Worker
from tests.router.policies.util import BS, FakeOverlap, request, worker

# The term-by-term tables switch off the terms they do not test, for round numbers: decode_weight 1
# (default 0.01), reuse_weight 0 (default 2.5), attention_tokens 0 (default 8192) and the block test
# of the guard at its former margin of 256 blocks (default 0: off), in-flight blocks credited
# whatever the queue (step_tokens 0; default 8192) and no placement term (fill_weight 0; default 0.5).
# The defaults have their own tests.
TABLE_PARAMS: dict[str, object] = {
    "decode_weight": 1.0,
    "reuse_weight": 0.0,
    "attention_tokens": 0.0,
    "guard_margin_blocks": 256.0,
    "step_tokens": 0,
    "fill_weight": 0.0,
}


def policy(indexed: dict[str, int], inflight: dict[str, int] | None = None, **params: object):  # noqa: ANN201
    ctx = PolicyContext(kv_index=FakeOverlap(indexed), inflight=FakeOverlap(inflight))
    return make_policy("kv_aware", {**TABLE_PARAMS, **params}, ctx)


# Prompt of 10 blocks; TABLE_PARAMS unless said. cost = (10 - overlap) + pending + dw * active.
@pytest.mark.parametrize(
    ("indexed", "workers", "params", "expected_costs", "expected_first"),
    [
        # w1 holds 8 of 10 blocks: 2 vs 10 new blocks
        ({"w1": 8}, [worker("w0"), worker("w1")], {}, {"w0": 10.0, "w1": 2.0}, "w1"),
        # w1 holds 8 but has 4 blocks (64 tokens) of prefill queued and 5 active: 2 + 4 + 5 = 11 > 10
        ({"w1": 8}, [worker("w0"), worker("w1", 1, 4 * BS, 5)], {}, {"w0": 10.0, "w1": 11.0}, "w0"),
        # same, decode ignored (decode_weight 0): 2 + 4 = 6 < 10
        (
            {"w1": 8},
            [worker("w0"), worker("w1", 1, 4 * BS, 5)],
            {"decode_weight": 0.0},
            {"w0": 10.0, "w1": 6.0},
            "w1",
        ),
        # decode_weight 0.5: w0 has 6 active -> 10 + 3 = 13; w1 holds all 10 and 20 active -> 0 + 10 = 10
        (
            {"w1": 10},
            [worker("w0", active=6), worker("w1", active=20)],
            {"decode_weight": 0.5},
            {"w0": 13.0, "w1": 10.0},
            "w1",
        ),
        # nothing cached anywhere: least loaded wins (3 < 7 active blocks)
        ({}, [worker("w0", active=7), worker("w1", active=3)], {}, {"w0": 17.0, "w1": 13.0}, "w1"),
        # tie on cost: the worker holding more blocks wins (cache reuse), here w1 with 10
        ({"w1": 10}, [worker("w0"), worker("w1", 1, 10 * BS)], {}, {"w0": 10.0, "w1": 10.0}, "w1"),
        # queue_weight 0.5: w1 holds 9 and queues 8 blocks of prefill -> 1 + 4 = 5 < w0's 10
        (
            {"w1": 9},
            [worker("w0"), worker("w1", 1, 8 * BS)],
            {"queue_weight": 0.5},
            {"w0": 10.0, "w1": 5.0},
            "w1",
        ),
        # the engine's token usage floors active blocks: 0.5 of 1600 tokens = 50 blocks
        (
            {"w0": 10},
            [worker("w0", capacity_tokens=1600, engine_token_usage=0.5), worker("w1")],
            {},
            {"w0": 50.0, "w1": 10.0},
            "w1",
        ),
    ],
)
def test_cost_terms(
    indexed: dict[str, int],
    workers: list[Worker],
    params: dict[str, object],
    expected_costs: dict[str, float],
    expected_first: str,
) -> None:
    d = policy(indexed, **params).select(request(10), workers)
    assert {s.url: s.cost for s in d.scores} == pytest.approx(expected_costs)
    assert d.worker == expected_first
    assert d.cached_blocks == indexed.get(expected_first, 0)  # the header value comes from the overlap
    for s in d.scores:
        t = s.terms
        dw = float(params.get("decode_weight", 1.0))  # type: ignore[arg-type]
        qw = float(params.get("queue_weight", 1.0))  # type: ignore[arg-type]
        recomputed = t["new_prefill_blocks"] + qw * t["pending_prefill_blocks"] + dw * t["decode_load"]
        recomputed += t["reuse_penalty"]
        assert s.cost == pytest.approx(recomputed)  # the explained terms add up to the cost


# Prompt of 10 blocks, decode ignored; the terms added for long prompts (Mooncake), one per row.
@pytest.mark.parametrize(
    ("indexed", "inflight", "workers", "params", "expected_costs", "expected_first"),
    [
        # greedy (reuse_weight 0): w0 holds 8 but queues 10 blocks: 2 + 10 = 12 > w1's cold 10
        ({"w0": 8}, {}, [worker("w0", 1, 10 * BS), worker("w1")], {}, {"w0": 12.0, "w1": 10.0}, "w1"),
        # reuse_weight 1.5: a miss also costs 1.5 per block not confirmed held: 12 + 3 = 15 < 10 + 15
        (
            {"w0": 8},
            {},
            [worker("w0", 1, 10 * BS), worker("w1")],
            {"reuse_weight": 1.5},
            {"w0": 15.0, "w1": 25.0},
            "w0",
        ),
        # admitted in-flight blocks (routed long ago) earn reuse credit like confirmed ones by default...
        ({}, {"w1": 10}, [worker("w0"), worker("w1")], {"reuse_weight": 1.0}, {"w0": 20.0, "w1": 0.0}, "w1"),
        # ...and only lower the own prefill without it
        (
            {},
            {"w1": 10},
            [worker("w0"), worker("w1")],
            {"reuse_weight": 1.0, "inflight_credit": False},
            {"w0": 20.0, "w1": 10.0},
            "w1",
        ),
        # attention_tokens 160 (10 blocks): a new block costs 1 + (context before it) / 10 blocks;
        # w1 holds 6: 4 * (1 + (6 + 2) / 10) = 7.2; cold: 10 * (1 + 5 / 10) = 15
        (
            {"w1": 6},
            {},
            [worker("w0"), worker("w1")],
            {"attention_tokens": 160.0},
            {"w0": 15.0, "w1": 7.2},
            "w1",
        ),
    ],
)
def test_long_prompt_terms(
    indexed: dict[str, int],
    inflight: dict[str, int],
    workers: list[Worker],
    params: dict[str, object],
    expected_costs: dict[str, float],
    expected_first: str,
) -> None:
    d = policy(indexed, inflight, decode_weight=0.0, **params).select(request(10), workers)
    assert {s.url: s.cost for s in d.scores} == pytest.approx(expected_costs)
    assert d.worker == expected_first


@pytest.mark.parametrize(
    ("pending_tokens", "routed_ago_s", "step_s", "expected_first", "expected_cached"),
    [
        # w1 was given the prompt just now, 32 tokens queued < one step (64): a request sent now joins
        # the in-flight one's step and recomputes the prefix, so no credit: the idle w0 wins (10 < 10 + 2)
        (32, 0.0, None, "w0", 0),
        # 80 tokens queued >= one step: it is admitted after the prefix is cached: credited (0 + 5 < 10)
        (80, 0.0, None, "w1", 10),
        # routed longer ago than `admit_s` (0.03 s, no step measured yet): its step has started, so a
        # request sent now queues behind it and hits
        (32, 0.05, None, "w1", 10),
        # the worker's measured step (0.1 s) replaces admit_s: 0.05 s ago is still the same step
        (32, 0.05, 0.1, "w0", 0),
    ],
)
def test_inflight_blocks_count_once_admitted_to_a_step(
    pending_tokens: int, routed_ago_s: float, step_s: float | None, expected_first: str, expected_cached: int
) -> None:
    now = 1000.0
    ws = [worker("w0"), worker("w1", 1, pending_tokens)]
    ws[1].load.last_routed_at = now - routed_ago_s
    ws[1].load.step_s = step_s
    ctx = PolicyContext(kv_index=FakeOverlap({}), inflight=FakeOverlap({"w1": 10}), clock=lambda: now)
    pol = make_policy("kv_aware", {**TABLE_PARAMS, "decode_weight": 0.0, "step_tokens": 64}, ctx)
    d = pol.select(request(10), ws)
    assert (d.worker, d.cached_blocks) == (expected_first, expected_cached)


@pytest.mark.parametrize(
    ("first_routed_ago_s", "expected_first"),
    [
        # a prompt with the prefix went to w1 0.2 s ago (its prefill step has started) and another one
        # just now: the newcomer queues behind the first and hits, whatever the second does
        (0.2, "w1"),
        # both went to w1 within the last step: the newcomer would join their step and recompute
        (0.01, "w0"),
    ],
)
def test_a_prefix_in_flight_counts_when_an_older_prompt_holds_it(
    first_routed_ago_s: float, expected_first: str
) -> None:
    from kvroute.router.load import InflightIndex

    now = [100.0]
    inflight = InflightIndex(clock=lambda: now[0])
    shared = request(10, prefix=7)  # the prefix: 10 blocks; then two prompts of 12 blocks each
    first, second = request(12, prefix=7), request(12, prefix=7)
    now[0] -= first_routed_ago_s
    inflight.add("w1", first.block_hashes[:10] + (first.block_hashes[10],))
    now[0] = 100.0 - 0.005
    inflight.add("w1", second.block_hashes[:10])
    now[0] = 100.0
    ws = [worker("w0"), worker("w1", 2, 32)]
    ws[1].load.last_routed_at = 100.0 - 0.005
    ctx = PolicyContext(kv_index=FakeOverlap({}), inflight=inflight, clock=lambda: now[0])
    pol = make_policy("kv_aware", {**TABLE_PARAMS, "decode_weight": 0.0, "step_tokens": 64}, ctx)
    d = pol.select(shared, ws)
    assert d.worker == expected_first


def test_the_queue_head_drains_at_the_workers_prefill_speed() -> None:
    # w0 queues 100 blocks whose head (all of them) started 0.9 s ago at 1,600 tokens/s: 1,440 tokens
    # (90 blocks) are done, 10 remain; w1 just took a 40-block prompt. 10 + 10 < 40 + 10: w0.
    now = 50.0
    ws = [worker("w0", 1, 100 * BS), worker("w1", 1, 40 * BS)]
    ws[0].load.head_tokens, ws[0].load.head_started_at = 100 * BS, now - 0.9
    ws[0].load.prefill_tokens_per_s = 1600.0
    ws[1].load.head_tokens, ws[1].load.head_started_at = 40 * BS, now
    ws[1].load.prefill_tokens_per_s = 1600.0
    ctx = PolicyContext(kv_index=FakeOverlap({}), inflight=FakeOverlap({}), clock=lambda: now)
    d = make_policy("kv_aware", {**TABLE_PARAMS, "decode_weight": 0.0}, ctx).select(request(10), ws)
    assert d.worker == "w0"
    assert {s.url: s.terms["pending_prefill_blocks"] for s in d.scores} == pytest.approx(
        {"w0": 10.0, "w1": 40.0}
    )
    # never past the head: a head overdue by any time still leaves the prompts queued behind it
    ws[0].load.head_tokens = 30 * BS
    ws[0].load.head_started_at = now - 100.0
    d = make_policy("kv_aware", {**TABLE_PARAMS, "decode_weight": 0.0}, ctx).select(request(10), ws)
    assert {s.url: s.terms["pending_prefill_blocks"] for s in d.scores}["w0"] == pytest.approx(70.0)


def test_partial_trailing_block_counts_as_prefill_work() -> None:
    req = request(2, extra_tokens=8)  # 2 full blocks + 8 tokens = 2.5 blocks
    d = policy({"w0": 2}).select(req, [worker("w0"), worker("w1")])
    assert {s.url: s.cost for s in d.scores} == pytest.approx({"w0": 0.5, "w1": 2.5})


@pytest.mark.parametrize(
    ("indexed", "inflight", "predict", "expected_first", "expected_cached"),
    [
        ({}, {"w1": 10}, True, "w1", 10),  # burst: w1 has the prompt in flight, no event yet
        ({}, {"w1": 10}, False, "w0", 0),  # prediction off: nothing known, first candidate
        ({"w0": 4}, {"w1": 10}, True, "w1", 10),  # the deeper of the two sources
        ({"w1": 7}, {"w1": 3}, True, "w1", 7),  # max of index and in-flight, not the sum
    ],
)
def test_inflight_prediction(
    indexed: dict[str, int],
    inflight: dict[str, int],
    predict: bool,
    expected_first: str,
    expected_cached: int,
) -> None:
    d = policy(indexed, inflight, predict_inflight=predict).select(request(10), [worker("w0"), worker("w1")])
    assert d.worker == expected_first
    assert d.cached_blocks == expected_cached


@pytest.mark.parametrize(
    ("loads", "params", "hot"),
    [
        # in flight 20 vs mean 7.3: 20 > 1.5 * 7.3 + 8 = 19 -> w0 hot
        ([(20, 0, 0), (1, 0, 0), (1, 0, 0)], {}, {"w0"}),
        # 18 <= 1.5 * 6.7 + 8 = 18: not hot
        ([(18, 0, 0), (1, 0, 0), (1, 0, 0)], {}, set()),
        # block test (margin 256, decode_weight 1): 1000 active vs mean 333: 1000 > 500 + 256 -> hot
        ([(1, 0, 1000), (0, 0, 0), (0, 0, 0)], {"decode_weight": 1.0}, {"w0"}),
        # the block test is off by default (margin 0): the same worker is not hot
        ([(1, 0, 1000), (0, 0, 0), (0, 0, 0)], {"decode_weight": 1e-4, "guard_margin_blocks": 0.0}, set()),
        # guard disabled
        ([(20, 0, 1000), (1, 0, 0), (1, 0, 0)], {"guard_factor": 0.0}, set()),
        # tighter margin: 6 > 1.5 * 2.67 + 1 = 5 -> hot
        ([(6, 0, 0), (1, 0, 0), (1, 0, 0)], {"guard_margin_requests": 1.0}, {"w0"}),
    ],
)
def test_hot_spot_guard(loads: list[tuple[int, int, int]], params: dict[str, object], hot: set[str]) -> None:
    ws = [worker(f"w{i}", *ld) for i, ld in enumerate(loads)]
    # w0 holds the whole prompt: without the guard it always wins (cost 0 + its small decode load
    # would lose only on blocks), with the guard it goes last.
    d = policy({"w0": 10}, **{"decode_weight": 0.0, **params}).select(request(10), ws)
    assert {s.url for s in d.scores if s.terms["hot"]} == hot
    if hot:
        assert d.worker != "w0" and d.ranked[-1] == "w0"  # hot: retried last
        costs = [s.cost for s in d.scores]
        assert costs == sorted(costs)  # the penalty keeps ranked in cost order
    else:
        assert d.worker == "w0"


def test_softmax_temperature_is_seeded_and_prefers_cheap_workers() -> None:
    ws = [worker("w0"), worker("w1"), worker("w2")]
    idx = {"w0": 10, "w1": 5}  # costs 0, 5, 10 blocks
    seq1 = [policy(idx, temperature=4.0, seed=42).select(request(10), ws).worker for _ in range(1)]
    p1, p2 = policy(idx, temperature=4.0, seed=42), policy(idx, temperature=4.0, seed=42)
    a = [p1.select(request(10), ws).worker for _ in range(300)]
    b = [p2.select(request(10), ws).worker for _ in range(300)]
    assert a == b and a[0] == seq1[0]  # same seed, same choices
    c = Counter(a)
    # p ~ exp(0), exp(-1.25), exp(-2.5) -> 0.70, 0.20, 0.06 of 300: order holds with a wide margin
    assert c["w0"] > c["w1"] > c["w2"] > 0
    d = p1.select(request(10), ws)
    assert d.ranked[0] == d.worker and sorted(d.ranked) == ["w0", "w1", "w2"]


def test_temperature_zero_is_deterministic_and_explain_is_pure() -> None:
    ws = [worker("w0"), worker("w1")]
    idx, infl = FakeOverlap({"w1": 3}), FakeOverlap({})
    p = make_policy("kv_aware", {}, PolicyContext(kv_index=idx, inflight=infl))
    cfg = p.config  # type: ignore[attr-defined]
    # the documented defaults (docs/routing.md): tuned on Mooncake, see the module docstring
    assert (cfg.decode_weight, cfg.reuse_weight, cfg.attention_tokens) == (0.01, 2.5, 8192.0)
    assert (cfg.guard_margin_blocks, cfg.guard_margin_requests, cfg.queue_weight) == (0.0, 8.0, 1.0)
    assert cfg.step_tokens == 8192  # SGLang's chunked_prefill_size on an H100
    assert {p.select(request(10), ws).worker for _ in range(20)} == {"w1"}
    before = [w.load for w in ws]
    scores = p.explain(request(10), ws)
    assert [s.url for s in scores] == ["w1", "w0"] and [w.load for w in ws] == before


def test_capacity_normalisation_weighs_decode_load_by_kv_size() -> None:
    # w0: 40 active of 800 blocks (5%); w1: 30 active of 200 blocks (15%). Mean capacity 500.
    ws = [
        worker("w0", active=40, capacity_tokens=800 * BS),
        worker("w1", active=30, capacity_tokens=200 * BS),
    ]
    plain = policy({}).select(request(10), ws)
    norm = policy({}, normalize_by_capacity=True).select(request(10), ws)
    assert plain.worker == "w1"  # 30 < 40 raw blocks
    assert norm.worker == "w0"  # 40 * 500/800 = 25 < 30 * 500/200 = 75
    assert {s.url: s.terms["decode_load"] for s in norm.scores} == pytest.approx({"w0": 25.0, "w1": 75.0})


def test_prompt_shorter_than_a_block_never_queries_the_index() -> None:
    idx = FakeOverlap({"w0": 1})
    p = make_policy("kv_aware", {}, PolicyContext(kv_index=idx, inflight=FakeOverlap()))
    d = p.select(request(0, extra_tokens=5), [worker("w0"), worker("w1", active=1)])
    assert idx.calls == 0 and d.worker == "w0" and d.cached_blocks == 0

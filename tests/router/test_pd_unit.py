"""PD pieces without the network: body rewriting, rooms, conditional threshold, pair selection."""

from __future__ import annotations

import random

import orjson
import pytest

from kvroute.router.core import Router
from kvroute.router.pd import (
    PDConfig,
    PDError,
    PDSelector,
    batch_size,
    bootstrap_fields,
    bootstrap_host_of,
    choose_admitted_route,
    choose_route,
    insert_fields,
    rid_fields,
)
from kvroute.router.policies.base import NoWorkerAvailable
from kvroute.router.types import Worker, WorkerRole, WorkerState


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        ("/generate", {"text": "a"}, None),
        ("/generate", {"text": ["a", "b", "c"]}, 3),
        ("/generate", {"input_ids": [1, 2, 3]}, None),  # one prompt of token ids
        ("/generate", {"input_ids": [[1, 2], [3]]}, 2),
        ("/v1/completions", {"prompt": "a"}, None),
        ("/v1/completions", {"prompt": ["a", "b"]}, 2),
        ("/v1/completions", {"prompt": [1, 2, 3]}, None),
        ("/v1/completions", {"prompt": [[1, 2], [3, 4]]}, 2),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, None),
    ],
)
def test_batch_size(path: str, body: dict[str, object], expected: int | None) -> None:
    assert batch_size(body, path) == expected


def test_single_request_gets_scalar_fields_and_a_63_bit_room() -> None:
    rng = random.Random(1)
    f = bootstrap_fields({"text": "a"}, "/generate", "10.0.0.5", 8998, rng)
    assert f["bootstrap_host"] == "10.0.0.5" and f["bootstrap_port"] == 8998
    assert isinstance(f["bootstrap_room"], int) and 0 <= f["bootstrap_room"] < 2**63


def test_batch_gets_one_distinct_room_per_item() -> None:
    f = bootstrap_fields({"text": ["a", "b", "c"]}, "/generate", "h", None, random.Random(2))
    assert f["bootstrap_host"] == ["h"] * 3 and f["bootstrap_port"] == [None] * 3
    rooms = f["bootstrap_room"]
    assert len(rooms) == 3 and len(set(rooms)) == 3


def test_rooms_are_fresh_per_call() -> None:
    rng = random.Random(3)
    rooms = {bootstrap_fields({"text": "a"}, "/generate", "h", 1, rng)["bootstrap_room"] for _ in range(100)}
    assert len(rooms) == 100


def test_insert_fields_keeps_the_clients_bytes() -> None:
    body = b'  {"text": "x",  "temperature": 1.50, "custom_field": {"a": [1, 2]}}'
    parsed = orjson.loads(body)
    out = insert_fields(body, parsed, {"bootstrap_room": 7, "bootstrap_host": "h"})
    assert out.endswith(b'"text": "x",  "temperature": 1.50, "custom_field": {"a": [1, 2]}}')
    got = orjson.loads(out)
    assert got == {**parsed, "bootstrap_room": 7, "bootstrap_host": "h"}


def test_insert_fields_into_an_empty_object() -> None:
    assert orjson.loads(insert_fields(b"{ }", {}, {"rid": "r"})) == {"rid": "r"}


def test_client_supplied_bootstrap_fields_are_replaced_not_duplicated() -> None:
    body = b'{"text": "x", "bootstrap_room": 1}'
    out = insert_fields(body, orjson.loads(body), {"bootstrap_room": 99})
    assert out.count(b"bootstrap_room") == 1
    assert orjson.loads(out) == {"text": "x", "bootstrap_room": 99}


def test_insert_fields_rejects_non_objects() -> None:
    with pytest.raises(PDError):
        insert_fields(b"[1, 2]", {}, {"rid": "r"})


def test_rid_added_only_when_absent() -> None:
    extra, rids = rid_fields({"text": "a"}, "/generate")
    assert list(extra) == ["rid"] and rids == [extra["rid"]]
    extra, rids = rid_fields({"text": ["a", "b"]}, "/generate")
    assert len(extra["rid"]) == 2 and rids == extra["rid"]
    assert rid_fields({"text": "a", "rid": "mine"}, "/generate") == ({}, ["mine"])
    assert rid_fields({"text": ["a", "b"], "rid": ["x", "y"]}, "/generate") == ({}, ["x", "y"])
    # SGLang expands a scalar rid on a batch to rid_i: those are the ids an abort must name
    assert rid_fields({"text": ["a", "b"], "rid": "m"}, "/generate") == ({}, ["m_0", "m_1"])


def test_bootstrap_host_is_the_prefill_hostname() -> None:
    assert bootstrap_host_of("http://10.1.2.3:30000") == "10.1.2.3"
    assert bootstrap_host_of("http://prefill-0.svc:8000/") == "prefill-0.svc"


@pytest.mark.parametrize(
    ("base", "scale", "cap", "queue", "expected"),
    [
        (0, 8192, 4096, 0, 0),  # disabled
        (256, 8192, 4096, 0, 256),  # empty prefill queue: the base threshold
        (256, 8192, 4096, 8192, 512),  # one queue-scale of backlog doubles it
        (256, 8192, 1024, 10**6, 1024),  # capped
        (256, 0, 4096, 10**6, 256),  # queue ignored
        (256, 8192, 4096, None, 4096),  # no prefill worker up: everything that fits goes local
    ],
)
def test_local_threshold(base: int, scale: int, cap: int, queue: int | None, expected: int) -> None:
    cfg = PDConfig(
        local_prefill_max_tokens=base, local_queue_scale_tokens=scale, local_prefill_cap_tokens=cap
    )
    assert cfg.local_threshold(queue) == expected


def _router(regular: int = 0) -> Router:
    r = Router(block_size=16, policy="least_load")
    for i in range(2):
        r.add_worker(
            Worker(
                f"http://p{i}:1", role=WorkerRole.PREFILL, state=WorkerState.HEALTHY, bootstrap_port=9000 + i
            )
        )
        r.add_worker(Worker(f"http://d{i}:1", role=WorkerRole.DECODE, state=WorkerState.HEALTHY))
    for i in range(regular):
        r.add_worker(Worker(f"http://r{i}:1", role=WorkerRole.REGULAR, state=WorkerState.HEALTHY))
    return r


def test_pair_prefill_by_queued_prefill_and_decode_by_decode_load() -> None:
    router = _router()
    sel = PDSelector(router, PDConfig())
    router.get_worker("http://p0:1").load.pending_prefill_tokens = 5000  # type: ignore[union-attr]
    router.get_worker("http://d1:1").load.active_blocks = 900  # type: ignore[union-attr]
    req = router.routing_request(text="x" * 400)
    route = choose_route(sel, req, PDConfig())
    assert route.prefill is not None and route.prefill.url == "http://p1:1"
    assert route.decode.url == "http://d0:1" and route.mode == "disaggregated"


def test_prefill_prefers_the_worker_holding_the_prompt() -> None:
    router = _router()
    # step_tokens=0: count an in-flight prompt as held at once. By default kv_aware only does so once a
    # full prefill step is queued there (a newcomer sharing the leader's step recomputes the prefix).
    config = PDConfig(prefill_policy_params=(("step_tokens", 0),))
    sel = PDSelector(router, config)
    req = router.routing_request(text="y" * 640)
    router.load.on_routed(
        "http://p1:1", req.prompt_tokens, req.prompt_tokens, 16, block_hashes=req.block_hashes
    )  # p1 has this prompt in flight
    route = choose_route(sel, req, config)
    assert route.prefill is not None and route.prefill.url == "http://p1:1"


def test_exclude_moves_to_another_pair_and_runs_out() -> None:
    router = _router()
    sel = PDSelector(router, PDConfig())
    req = router.routing_request(text="z" * 100)
    route = choose_route(sel, req, PDConfig(), exclude={"http://p0:1", "http://d0:1"})
    assert route.prefill is not None and (route.prefill.url, route.decode.url) == (
        "http://p1:1",
        "http://d1:1",
    )
    with pytest.raises(NoWorkerAvailable):
        choose_route(sel, req, PDConfig(), exclude={"http://d0:1", "http://d1:1"})


def test_conditional_sends_short_uncached_prompts_local_and_long_ones_to_a_pair() -> None:
    router = _router(regular=1)
    cfg = PDConfig(local_prefill_max_tokens=64)
    sel = PDSelector(router, cfg)
    short = choose_route(sel, router.routing_request(text="s" * 50), cfg)
    assert short.prefill is None and short.decode.url == "http://r0:1" and short.mode == "local"
    long = choose_route(sel, router.routing_request(text="l" * 500), cfg)
    assert long.mode == "disaggregated"


def test_conditional_threshold_grows_with_the_prefill_queue() -> None:
    router = _router(regular=1)
    cfg = PDConfig(local_prefill_max_tokens=64, local_queue_scale_tokens=1000, local_prefill_cap_tokens=1024)
    sel = PDSelector(router, cfg)
    req = router.routing_request(text="m" * 200)
    assert choose_route(sel, req, cfg).mode == "disaggregated"
    for i in range(2):  # both prefill workers backed up by 3000 tokens: threshold 64 * 4 = 256
        router.get_worker(f"http://p{i}:1").load.pending_prefill_tokens = 3000  # type: ignore[union-attr]
    assert choose_route(sel, req, cfg).mode == "local"


def test_admitted_route_waits_while_every_prefill_worker_is_full() -> None:
    """Late binding: the prefill policy picks among the workers with room; none with room -> None;
    a prompt served locally goes even while the prefill pool is full and others wait."""
    router = _router(regular=1)
    cfg = PDConfig(local_prefill_max_tokens=64)
    sel = PDSelector(router, cfg)
    router.get_worker("http://p1:1").load.pending_prefill_tokens = 100  # type: ignore[union-attr]
    long = router.routing_request(text="l" * 500)
    full: set[str] = {"http://p0:1"}  # the policy's pick (least queued) is full: the other one has room
    route = choose_admitted_route(sel, long, cfg, (), lambda w: w.url in full)
    assert route is not None and route.prefill is not None and route.prefill.url == "http://p1:1"
    full.add("http://p1:1")
    assert choose_admitted_route(sel, long, cfg, (), lambda w: w.url in full) is None
    full.clear()  # room again, but requests of its priority already wait: it queues behind them
    assert choose_admitted_route(sel, long, cfg, (), lambda w: w.url in full, behind=True) is None
    short = router.routing_request(text="s" * 50)
    for behind in (False, True):
        local = choose_admitted_route(sel, short, cfg, (), lambda w: True, behind=behind)
        assert local is not None and local.mode == "local" and local.decode.url == "http://r0:1"


def test_conditional_without_a_local_pool_disaggregates() -> None:
    router = _router(regular=0)
    cfg = PDConfig(local_prefill_max_tokens=64)
    route = choose_route(PDSelector(router, cfg), router.routing_request(text="s" * 10), cfg)
    assert route.mode == "disaggregated"


def test_unknown_policy_names_fail_at_construction() -> None:
    with pytest.raises(ValueError):
        PDSelector(_router(), PDConfig(decode_policy="nope"))


def test_window_summarises_the_planners_inputs() -> None:
    from prometheus_client import CollectorRegistry

    from kvroute.router.pd import PDRecord
    from kvroute.router.pd_metrics import PDMetrics, PDWindow

    now = [100.0]
    window = PDWindow(horizon_s=10.0, clock=lambda: now[0])
    m = PDMetrics(CollectorRegistry(), window)
    m.observe(PDRecord("disaggregated", "ok", 1000, 500, 10, ttft_s=0.2, itls=[0.01, 0.03], finished_at=91.0))
    m.observe(PDRecord("local", "ok", 200, 0, 30, ttft_s=0.1, itls=[0.02], finished_at=95.0))
    m.observe(PDRecord("disaggregated", "upstream_error", 999, 0, 0, finished_at=96.0))  # not counted
    m.observe(PDRecord("local", "ok", 50, 0, 5, finished_at=80.0))  # outside the horizon
    s = window.summary(current_prefill=2, current_decode=3)
    assert s.requests == 2 and s.local_fraction == 0.5
    assert s.load.request_rate == pytest.approx(2 / 9.0)
    assert s.load.prompt_tokens == 600 and s.load.output_tokens == 20
    assert s.load.cache_hit_ratio == pytest.approx(500 / 1200)
    assert s.load.measured_ttft_s == pytest.approx(0.15) and s.load.measured_itl_s == pytest.approx(0.02)
    assert (s.load.current_prefill, s.load.current_decode) == (2, 3)
    assert s.load.measured_prefill_s is None  # the local request has no prefill measured: no pairing
    assert m.requests.labels("disaggregated", "upstream_error")._value.get() == 1


def test_window_pairs_the_measured_prefill_with_the_samples_and_reads_bursts() -> None:
    """The planner corrects its service time by the prefill measured without queueing, over the same
    requests as its prompt samples; arrivals in bursts read as burstiness ~ the burst size."""
    from prometheus_client import CollectorRegistry

    from kvroute.router.pd import PDRecord
    from kvroute.router.pd_metrics import PDMetrics, PDWindow

    now = [0.0]
    window = PDWindow(horizon_s=60.0, clock=lambda: now[0])
    m = PDMetrics(CollectorRegistry(), window)
    for burst in range(5):  # 8 at one instant every 6 s
        now[0] = burst * 6.0
        for _ in range(8):
            window.arrive()
    for i in range(4):
        rec = PDRecord("disaggregated", "ok", 1000, 0, 10, ttft_s=9.0, finished_at=25.0)
        rec.prefill_queue_s, rec.prefill_s = 8.0, 0.1 * (i + 1)
        m.observe(rec)
    now[0] = 30.0
    load = window.summary().load
    assert load.measured_prefill_s == pytest.approx(0.25)  # the queue is not in it
    assert load.measured_ttft_s == pytest.approx(9.0)
    assert load.arrival_burstiness == pytest.approx(8.0)


def test_window_rate_counts_arrivals_and_a_shorter_horizon() -> None:
    """The planner's rate is what arrives (counted once per request as it arrives, before admission's
    queue), not what an overloaded fleet finishes or lets in; a shorter horizon reads the newest part."""
    from prometheus_client import CollectorRegistry

    from kvroute.router.pd import PDRecord
    from kvroute.router.pd_metrics import PDMetrics, PDWindow

    now = [0.0]
    window = PDWindow(horizon_s=60.0, clock=lambda: now[0])
    m = PDMetrics(CollectorRegistry(), window)
    for t in range(60):  # 1 request/s for 50 s, then 5/s for 10 s; only 3 ever finish
        now[0] = float(t)
        for _ in range(1 if t < 50 else 5):
            m.arrive()
            m.pool_enter("decode")  # entering a pool (each attempt, each side) is not demand again
            m.pool_enter("prefill")
    now[0] = 60.0
    for t in (58.0, 59.0, 59.5):
        m.observe(PDRecord("disaggregated", "ok", 1000, 0, 10, ttft_s=3.0, finished_at=t))
    assert window.summary().load.request_rate == pytest.approx(100 / 60)
    assert window.summary(horizon_s=10).load.request_rate == pytest.approx(5.0)
    assert window.summary(horizon_s=10).requests == 3  # lengths and latencies still from finished ones


@pytest.mark.parametrize("prefill_policy", ["kv_aware", "least_load", "round_robin", "cache_aware"])
def test_any_policy_can_serve_the_prefill_pool(prefill_policy: str) -> None:
    router = _router()
    cfg = PDConfig(prefill_policy=prefill_policy, decode_policy="power_of_two")
    route = choose_route(PDSelector(router, cfg), router.routing_request(text="q" * 64), cfg)
    assert route.prefill is not None and route.prefill.role is WorkerRole.PREFILL
    assert route.decode.role is WorkerRole.DECODE

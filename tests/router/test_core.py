"""Router (library core): tokenize once, KV events in, kv_aware decisions out, lifecycle bookkeeping."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter

import msgspec
import pytest
import zmq
import zmq.asyncio

from kvroute import Router
from kvroute.cache_index.events import AllBlocksCleared, BlockRemoved, BlockStored, KvEventBatch
from kvroute.cache_index.hashing import ByteTokenizer, hash_blocks, hash_text_blocks, namespace_seed
from kvroute.router.policies.base import NoWorkerAvailable
from kvroute.router.types import Worker, WorkerRole, WorkerState

BS = 16
_engine_ids = itertools.count(1 << 40)


def healthy(url: str, **kw: object) -> Worker:
    return Worker(url=url, state=WorkerState.HEALTHY, **kw)  # type: ignore[arg-type]


def make_router(n: int = 3, **kw: object) -> Router:
    r = Router(block_size=BS, **kw)  # type: ignore[arg-type]
    for i in range(n):
        r.add_worker(healthy(f"http://w{i}"))
    return r


def stored(tokens: list[int]) -> tuple[list[BlockStored], list[int]]:
    """One BlockStored per full page of `tokens`, chained, with fresh engine hashes (SGLang <= 0.5.10)."""
    events, engine_hashes, parent = [], [], None
    for off in range(0, len(tokens) - BS + 1, BS):
        h = next(_engine_ids)
        events.append(BlockStored((h,), parent, tuple(tokens[off : off + BS]), BS))
        engine_hashes.append(h)
        parent = h
    return events, engine_hashes


def feed(r: Router, url: str, text: str) -> list[int]:
    """`url` reports holding the byte tokens of `text`; returns the engine hashes of its pages."""
    events, hashes = stored(list(text.encode()))
    r.apply_kv_events(url, KvEventBatch(time.time(), tuple(events)))
    return hashes


SYSTEM = "You are a meticulous assistant. Answer briefly and cite sources. " * 8  # 520 bytes: 32 full blocks


# --- tokenize once -------------------------------------------------------------------------------


def test_routing_request_tokenizes_by_precedence() -> None:
    r = make_router()
    by_ids = r.routing_request(input_ids=list(range(40)), text="ignored")
    seed = namespace_seed("")
    assert by_ids.prompt_tokens == 40 and by_ids.block_hashes == tuple(hash_blocks(list(range(40)), BS, seed))
    by_text = r.routing_request(text="hello " * 10, max_tokens=5, session_key="u1", model="m")
    assert by_text.prompt_tokens == 60 and len(by_text.block_hashes) == 3  # 60 bytes: 3 full blocks
    assert (by_text.expected_output_tokens, by_text.session_key, by_text.model) == (5, "u1", "m")
    msgs = [{"role": "user", "content": "hi there"}]
    by_chat = r.routing_request(messages=msgs)
    assert by_chat.prompt_tokens == len(ByteTokenizer().apply_chat_template(msgs))  # through the template


def test_model_seed_and_text_fallback_change_the_hashes() -> None:
    text = "x" * 256
    plain = make_router().routing_request(text=text)
    seeded = make_router(model_seed="llama").routing_request(text=text)
    assert seeded.block_hashes == tuple(hash_blocks(list(text.encode()), BS, namespace_seed("llama")))
    assert seeded.block_hashes != plain.block_hashes  # another model, other blocks
    fb = make_router(text_fallback=True, text_chunk_bytes=64).routing_request(text=text)
    assert fb.block_hashes == tuple(hash_text_blocks(text, 64, namespace_seed("")))
    assert fb.prompt_tokens == 4 * BS  # 4 chunks count as 4 blocks of load


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "no prompt"),
        ({"text": ""}, "empty"),
        ({"input_ids": []}, "input_ids is empty"),
        ({"input_ids": "abc"}, "list of integers"),
        ({"input_ids": [1, -2]}, "integers in"),
        ({"input_ids": [2**32]}, "integers in"),
        ({"text": 5}, "text must be a string"),
        ({"messages": []}, "non-empty list"),
        ({"messages": ["hi"]}, "each message must be an object"),
        ({"text": "hi", "max_tokens": -1}, "max_tokens"),
        ({"text": "hi", "session_key": 3}, "session key"),
    ],
)
def test_routing_request_rejects_bad_prompts(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_router().routing_request(**kwargs)  # type: ignore[arg-type]


# --- kv_aware on events ---------------------------------------------------------------------------


def test_picks_the_worker_holding_the_longest_prefix() -> None:
    r = make_router(3)
    prompt = SYSTEM + "Question: what is a KV cache?"
    feed(r, "http://w0", SYSTEM[:128])  # 8 blocks
    feed(r, "http://w1", SYSTEM)  # 32 blocks
    d = r.select(r.routing_request(text=prompt))
    assert d.worker == "http://w1" and d.cached_blocks == 32
    assert d.ranked == ("http://w1", "http://w0", "http://w2")  # retry order follows overlap
    scores = {s.url: s for s in r.explain(r.routing_request(text=prompt))}
    assert scores["http://w0"].cached_blocks == 8 and scores["http://w2"].cached_blocks == 0


def test_spreads_unrelated_prompts() -> None:
    r = make_router(4)
    picks = []
    for i in range(8):
        req = r.routing_request(text=f"{i} unrelated prompt number {i} " * 8)
        d = r.select(req)
        r.on_routed(d, req)  # in flight: its load steers the next one away
        picks.append(d.worker)
    assert Counter(picks) == {f"http://w{i}": 2 for i in range(4)}


def test_shared_prefix_burst_follows_the_first_request_before_any_event() -> None:
    """4 tenants (system prompts), 4 requests each, all arriving before any prefill is done."""
    tenants = [f"tenant {t}: " + SYSTEM for t in "ABCD"]
    order = [(t, 0) for t in range(4)] + [(t, i) for t in range(4) for i in range(1, 4)]
    placed: dict[bool, dict[int, set[str]]] = {}
    for predict in (True, False):
        # step_tokens 0: followers are credited with the in-flight prefix however short the queue (by
        # default they are only behind >= 8192 queued tokens; the next test)
        r = make_router(4, policy_params={"predict_inflight": predict, "step_tokens": 0})
        placed[predict] = {t: set() for t in range(4)}
        for t, i in order:
            req = r.routing_request(text=tenants[t] + f"question {i}")
            d = r.select(req)
            r.on_routed(d, req)  # no first token, no event yet
            placed[predict][t].add(d.worker)
    # in-flight prediction: each tenant's prefix is prefilled on one worker, its followers hit it
    assert all(len(ws) == 1 for ws in placed[True].values())
    assert len(set().union(*placed[True].values())) == 4  # and the tenants are spread over the fleet
    # events only: the followers see no overlap anywhere and scatter by load
    assert max(len(ws) for ws in placed[False].values()) >= 3


def test_short_burst_spreads_unless_queued_behind_a_full_step() -> None:
    """Default step_tokens (8192): a follower sent while less than one prefill step is queued on the
    leader's worker would be admitted in the leader's step and recompute the prefix (SGLang, the sim),
    so it goes where it waits least; with a long prefix queued it follows the leader."""
    for prefix_tokens, expect_one_worker in ((1000, False), (9000, True)):
        r = make_router(4)
        system = (SYSTEM * (prefix_tokens // len(SYSTEM) + 1))[:prefix_tokens]
        workers = set()
        for i in range(3):
            req = r.routing_request(text=system + f"question {i}")
            d = r.select(req)
            r.on_routed(d, req)
            workers.add(d.worker)
        assert (len(workers) == 1) is expect_one_worker


def test_an_evicted_prefix_stops_attracting_traffic() -> None:
    r = make_router(3)
    req = r.routing_request(text=SYSTEM)
    hashes = feed(r, "http://w2", SYSTEM)
    assert r.select(req).worker == "http://w2"
    r.apply_kv_events("http://w2", KvEventBatch(time.time(), (BlockRemoved((hashes[20],)),)))
    d = r.select(req)
    assert d.worker == "http://w2" and d.cached_blocks == 20  # pages 20.. gone (and their descendants)
    r.apply_kv_events("http://w2", KvEventBatch(time.time(), (BlockRemoved((hashes[0],)),)))
    d = r.select(req)
    assert d.worker == "http://w0" and d.cached_blocks == 0  # nothing left: back to load order
    feed(r, "http://w1", SYSTEM)
    r.apply_kv_events("http://w1", KvEventBatch(time.time(), (AllBlocksCleared(),)))
    assert r.index_stats()["workers"]["http://w1"]["blocks"] == 0  # flush_cache clears


def test_balance_guard_moves_traffic_off_a_skewed_worker() -> None:
    r = make_router(3, policy_params={"decode_weight": 0.0})
    req = r.routing_request(text=SYSTEM)
    feed(r, "http://w0", SYSTEM)
    tickets = []
    for i in range(12):  # 12 unrelated requests pinned on w0
        other = r.routing_request(text=f"other {i} " * 4)
        tickets.append(r.on_routed("http://w0", other))
    d = r.select(req)
    # in flight 12 > 1.5 * 4 + 8 = 14? no -> w0 still wins on its cache
    assert d.worker == "http://w0"
    for i in range(4):
        tickets.append(r.on_routed("http://w0", r.routing_request(text=f"more {i} " * 4)))
    d = r.select(req)
    # 16 > 1.5 * 16/3 + 8 = 16? no; one more makes it hot
    assert d.worker == "http://w0"
    tickets.append(r.on_routed("http://w0", r.routing_request(text="last one " * 4)))
    d = r.select(req)
    assert d.worker != "http://w0" and d.ranked[-1] == "http://w0"  # 17 > 16.5: hot, retried last
    for t in tickets:
        r.on_finished(t)
    assert r.select(req).worker == "http://w0"  # load gone: the cache wins again


def test_softmax_with_a_seed_is_reproducible() -> None:
    def run() -> list[str]:
        # reuse and attention terms off: the cost gap is then exactly the 16 blocks saved (defaults
        # would widen it to ~40 and w0, w2 would almost never be drawn)
        params = {"temperature": 8.0, "seed": 1234, "reuse_weight": 0.0, "attention_tokens": 0.0}
        r = make_router(3, policy_params=params)
        feed(r, "http://w1", SYSTEM[:256])  # w1 saves 16 blocks: preferred but not always
        req = r.routing_request(text=SYSTEM)
        return [r.select(req).worker for _ in range(100)]

    a, b = run(), run()
    assert a == b
    c = Counter(a)
    assert c["http://w1"] > c["http://w0"] > 0 and c["http://w2"] > 0  # exp(-2) each: ~10 of 100


# --- lifecycle, stats, workers ---------------------------------------------------------------------


def test_lifecycle_reserves_load_and_records_cached_ratio() -> None:
    r = make_router(2)
    feed(r, "http://w1", SYSTEM)
    req = r.routing_request(text=SYSTEM + "tail")
    d = r.select(req)
    t = r.on_routed(d, req)
    w1 = r.get_worker("http://w1")
    assert w1 is not None and w1.load.in_flight == 1
    assert w1.load.pending_prefill_tokens == req.prompt_tokens - 32 * BS  # only the uncached tail
    r.on_first_token(t)
    r.on_tokens(t, 20)
    r.on_finished(t, cached_tokens=32 * BS, output_tokens=20)
    r.on_finished(t, cached_tokens=0)  # idempotent: not counted twice
    st = r.worker_stats("http://w1")
    assert st is not None and (st.routed, st.finished, st.output_tokens) == (1, 1, 20)
    assert st.cached_token_ratio == pytest.approx(32 * BS / req.prompt_tokens)
    assert st.predicted_cached_tokens == st.cached_tokens  # prediction matched the engine
    assert (w1.load.in_flight, w1.load.pending_prefill_tokens, w1.load.active_blocks) == (0, 0, 0)


def test_on_routed_by_url_computes_the_overlap_itself() -> None:
    r = make_router(2, policy="round_robin")
    feed(r, "http://w1", SYSTEM)
    req = r.routing_request(text=SYSTEM, with_blocks=True)  # round_robin alone would not hash
    t = r.on_routed("http://w1", req)
    assert t.cached_blocks_predicted == 32 and t.uncached_tokens == 8  # the trailing partial block
    with pytest.raises(KeyError):
        r.on_routed("http://nope", req)


def test_hashing_only_for_policies_that_read_blocks() -> None:
    r = make_router(2, policy="round_robin")
    plain = r.routing_request(text=SYSTEM)
    assert plain.block_hashes == () and plain.prompt_tokens == len(SYSTEM.encode())
    r.set_policy("least_load", {"metric": "requests"})
    assert r.routing_request(input_ids=list(range(64))).block_hashes == ()
    r.set_policy("least_load")  # metric=blocks: the pending prefill counts the uncached part only
    assert len(r.routing_request(input_ids=list(range(64))).block_hashes) == 64 // BS
    r.set_policy("kv_aware")
    hashed = r.routing_request(text=SYSTEM)
    assert len(hashed.block_hashes) == len(SYSTEM.encode()) // BS
    assert hashed.prompt_tokens == plain.prompt_tokens


def test_candidates_roles_exclusions_and_no_worker() -> None:
    r = Router(block_size=BS, policy="least_load")
    r.add_worker(healthy("http://p", role=WorkerRole.PREFILL))
    r.add_worker(healthy("http://a", model="m1"))
    r.add_worker(healthy("http://b", model="m2"))
    r.add_worker(Worker(url="http://c"))  # PENDING: not routable
    req = r.routing_request(text="hello world, hello world")
    assert r.select(req, role=WorkerRole.PREFILL).worker == "http://p"
    assert set(r.select(req).ranked) == {"http://a", "http://b"}  # regular and healthy only
    assert r.select(req, exclude=["http://a"]).ranked == ("http://b",)
    assert r.select(r.routing_request(text="hello world, hello!!", model="m2")).ranked == ("http://b",)
    assert len(r.select(r.routing_request(text="hello world, hello!!", model="x")).ranked) == 2  # unknown
    with pytest.raises(NoWorkerAvailable, match="no healthy regular worker"):
        r.select(req, exclude=["http://a", "http://b"])
    assert len(r.explain(req)) == 3  # explain scores every regular worker, pending included


def test_remove_worker_forgets_its_blocks_and_in_flight_prompts() -> None:
    r = make_router(2)
    feed(r, "http://w1", SYSTEM)
    req = r.routing_request(text=SYSTEM)
    t = r.on_routed("http://w1", req)
    assert r.remove_worker("http://w1") is not None
    assert r.index.block_count("http://w1") == 0 and r.load.inflight.match(req.block_hashes) == {}
    r.on_finished(t)  # a late release is harmless
    feed(r, "http://w1", SYSTEM)  # late batch from the removed worker: dropped
    assert r.dropped_batches == 1
    r.add_worker(healthy("http://w1"))
    assert r.select(req).cached_blocks == 0  # re-added: starts empty
    assert r.remove_worker("http://gone") is None


def test_page_size_mismatch_and_duplicates_are_refused() -> None:
    r = make_router(1)
    with pytest.raises(ValueError, match="page_size 64 does not divide the router's --block-size 16"):
        r.add_worker(healthy("http://big", page_size=64))
    with pytest.raises(ValueError, match="already registered"):
        r.add_worker(healthy("http://w0"))


def test_blind_workers_and_index_stats() -> None:
    r = make_router(2)
    feed(r, "http://w0", "a" * 64)
    for url in ("http://w0", "http://w1"):
        t = r.on_routed(url, r.routing_request(text="b" * 64))
        r.on_first_token(t)
        r.on_finished(t)
    assert r.blind_workers() == ["http://w1"]  # served a prefilled request, never sent an event
    stats = r.index_stats()
    assert stats["blind_workers"] == ["http://w1"]
    assert (
        stats["workers"]["http://w0"]["blocks"] == 4 and stats["workers"]["http://w0"]["event_batches"] == 1
    )
    assert stats["apply"]["stored"] == 4
    r.reset_worker_index("http://w0")
    assert (
        r.index_stats()["workers"]["http://w0"] | {"blocks": 0, "resets": 1}
        == r.index_stats()["workers"]["http://w0"]
    )


def test_set_policy_keeps_the_old_one_on_error() -> None:
    r = make_router(2)
    with pytest.raises(ValueError, match="unknown parameter"):
        r.set_policy("cache_aware", {"cache_treshold": 0.5})
    assert r.policy_info()["name"] == "kv_aware"
    r.set_policy("cache_aware", {"cache_threshold": 0.5})
    info = r.policy_info()
    assert info["name"] == "cache_aware" and info["params"]["cache_threshold"] == 0.5
    assert "kv_aware" in info["available"]


# --- subscription over real ZeroMQ -----------------------------------------------------------------


async def test_subscribe_feeds_the_index_from_a_zmq_publisher() -> None:
    ctx = zmq.asyncio.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    r = make_router(2)
    try:
        await r.subscribe("http://w1", f"tcp://127.0.0.1:{port}", topic="kv")
        events, _ = stored(list(SYSTEM.encode()))
        payload = msgspec.msgpack.encode(KvEventBatch(time.time(), tuple(events)))
        req = r.routing_request(text=SYSTEM)
        deadline = time.monotonic() + 10
        seq = 0
        # The SUB may join late (slow joiner): republish (idempotent stores) until the index has it.
        while r.index.block_count("http://w1") < 32:
            assert time.monotonic() < deadline, "events never reached the index"
            await pub.send_multipart([b"kv", seq.to_bytes(8, "big"), payload])
            seq += 1
            await asyncio.sleep(0.02)
        assert r.select(req).worker == "http://w1"
        assert r.index_stats()["workers"]["http://w1"]["subscribed"] is True
        await r.unsubscribe("http://w1")
        assert r.index_stats()["workers"]["http://w1"]["subscribed"] is False
    finally:
        await r.close()
        pub.close(linger=0)
        ctx.term()


def test_cached_blocks_override_and_decision_scores_are_capped() -> None:
    r = make_router(12)
    req = r.routing_request(text=SYSTEM)
    t = r.on_routed("http://w3", req, cached_blocks=32)  # e.g. a PD decode worker: nothing to prefill
    assert t.uncached_tokens == req.prompt_tokens - 32 * BS
    d = r.select(req)
    assert len(d.ranked) == 12 and len(d.scores) == 8  # the table is explain's, not every decision's
    assert [s.url for s in d.scores] == list(d.ranked[:8])
    assert len(r.explain(req)) == 12


async def test_removing_a_subscribed_worker_closes_its_stream() -> None:
    ctx = zmq.asyncio.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    r = make_router(2)
    try:
        await r.subscribe("http://w0", f"tcp://127.0.0.1:{port}")
        assert r.index_stats()["workers"]["http://w0"]["subscribed"] is True
        r.remove_worker("http://w0")  # sync: the unsubscription is scheduled on the loop
        await r.close()  # ... and awaited here
        assert r._subscriber is not None and r._subscriber.workers == []
    finally:
        await r.close()
        pub.close(linger=0)
        ctx.term()

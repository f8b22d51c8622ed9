"""KvEventSubscriber over real ZeroMQ on loopback: publisher -> subscriber -> applier -> RadixIndex,
gap recovery by replay (ours and SGLang's own publishers, both reply shapes), forget-on-gap without
replay, engine restart, decode errors, and delivery that yields to the loop during a burst."""

from __future__ import annotations

import asyncio
import atexit
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from kvroute.cache_index.apply import KvEventApplier
from kvroute.cache_index.events import BlockRemoved, BlockStored, KvEventBatch
from kvroute.cache_index.hashing import hash_blocks
from kvroute.cache_index.radix import RadixIndex
from kvroute.engines.kv_events import KvEventSubscriber, resolve_endpoint
from kvroute.engines.kv_publisher import END_SEQ, KvEventPublisher, PublisherForm, sglang_page_hash
from tests.sglang_ref import load_kv_events

BS = 4


async def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.005)


def page_events(
    tokens: list[int], prior_hex: str | None = None, parent: int | None = None
) -> list[BlockStored]:
    """What SGLang 0.5.10 sends for a new chain: one BlockStored per page, SHA-256 chained hashes."""
    out = []
    for i in range(0, len(tokens) - BS + 1, BS):
        page = tokens[i : i + BS]
        prior_hex, h = sglang_page_hash(page, prior_hex)
        out.append(BlockStored((h,), parent, tuple(page), BS, None, "GPU"))
        parent = h
    return out


class Harness:
    """Subscriber feeding an applier and an index, with the calls it received."""

    def __init__(self) -> None:
        self.index = RadixIndex()
        self.applier = KvEventApplier(self.index, block_size=BS)
        self.batches: list[tuple[str, KvEventBatch]] = []
        self.resets: list[str] = []
        self.sub = KvEventSubscriber(self.on_batch, self.on_reset, replay_timeout=2.0, max_drain=32)

    def on_batch(self, worker: str, batch: KvEventBatch) -> None:
        self.batches.append((worker, batch))
        self.applier.apply(worker, batch)

    def on_reset(self, worker: str) -> None:
        self.resets.append(worker)
        self.applier.forget(worker)

    async def sync(self, pub: KvEventPublisher, worker: str) -> None:
        """Slow joiner: publish empty batches until one arrives, then start counting afresh."""
        deadline = time.monotonic() + 5
        n = len(self.batches)
        while len(self.batches) == n:
            assert time.monotonic() < deadline, "subscription never became live"
            pub.publish([])
            await asyncio.sleep(0.01)
        # let the probes in flight land
        await wait_for(lambda: self.sub.stats(worker)["last_seq"] == pub.next_seq - 1)


async def probe_until_live(
    h: Harness, send: Callable[[int, bytes], None], enc: KvEventPublisher, seq: int
) -> int:
    """Send empty batches on a raw PUB with rising seqs from `seq` until the subscriber sees one; the
    next seq to send."""
    deadline = time.monotonic() + 5
    while not h.batches:
        assert time.monotonic() < deadline, "subscription never became live"
        send(seq, enc.encode([]))
        seq += 1
        await asyncio.sleep(0.01)
    return seq


class DroppingPublisher(KvEventPublisher):
    """Loses chosen sends, as a PUB past its high-water mark does (the replay buffer keeps them)."""

    drop: set[int]

    def __init__(self, *a: object, **kw: object) -> None:
        super().__init__(*a, **kw)  # type: ignore[arg-type]
        self.drop = set()

    def _send(self, frames: tuple[bytes, bytes, bytes]) -> None:
        if int.from_bytes(frames[1], "big") not in self.drop:
            super()._send(frames)


def test_resolve_endpoint() -> None:
    assert resolve_endpoint("tcp://*:5557", "10.1.2.3") == "tcp://10.1.2.3:5557"
    assert resolve_endpoint("tcp://0.0.0.0:5557", "gpu-7") == "tcp://gpu-7:5557"
    assert resolve_endpoint("tcp://[::]:5557", "fe80::1") == "tcp://[fe80::1]:5557"
    assert resolve_endpoint("tcp://*:5557", "[fe80::1]") == "tcp://[fe80::1]:5557"
    assert resolve_endpoint("tcp://10.0.0.9:5557", "10.1.2.3") == "tcp://10.0.0.9:5557"
    assert resolve_endpoint("ipc:///tmp/kv", "10.1.2.3") == "ipc:///tmp/kv"


@pytest.mark.parametrize("form", ["array", "map"])
async def test_end_to_end_into_index(form: PublisherForm) -> None:
    h = Harness()
    tokens = list(range(1, 33))  # 8 pages
    async with KvEventPublisher("tcp://127.0.0.1:0", topic="kv", form=form) as pub:
        await h.sub.add("w0", pub.endpoint, topic="kv")
        try:
            await h.sync(pub, "w0")
            evs = page_events(tokens)
            pub.publish(evs[:5])
            pub.publish(evs[5:])
            await wait_for(lambda: h.index.match(hash_blocks(tokens, BS)) == {"w0": 8})
            pub.publish([BlockRemoved(evs[6].block_hashes, "GPU")])
            await wait_for(lambda: h.index.match(hash_blocks(tokens, BS)) == {"w0": 6})
            st = h.sub.stats("w0")
            assert st["gaps"] <= 1 and st["resets"] == st["gaps"]  # at most the join
            assert st["events"] == 9 and st["decode_errors"] == 0 and st["last_seq"] == pub.next_seq - 1
            assert st["lag_s"] is not None and -1 < st["lag_s"] < 5
        finally:
            await h.sub.close()


@pytest.mark.parametrize(("form", "shape"), [("array", "0.5.10"), ("map", "0.5.23")])
async def test_gap_recovered_by_replay(form: PublisherForm, shape: str) -> None:
    h = Harness()
    tokens = list(range(1, 17))
    evs = page_events(tokens)
    async with DroppingPublisher(
        "tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0", form=form, replay_form=shape
    ) as pub:
        await h.sub.add("w0", pub.endpoint, replay_endpoint=pub.replay_endpoint)
        try:
            await h.sync(pub, "w0")
            base = h.sub.stats("w0")
            first = pub.next_seq
            pub.drop = {first + 1, first + 2}  # pages 2 and 3 are lost on the live stream
            for e in evs:
                pub.publish([e])
            await wait_for(lambda: h.index.match(hash_blocks(tokens, BS)) == {"w0": 4})
            st = h.sub.stats("w0")
            assert st["gaps"] == base["gaps"] + 1 and st["replays"] == base["replays"] + 1
            assert st["resets"] == base["resets"]  # nothing forgotten
            seqs = [b.events for w, b in h.batches if b.events]
            assert seqs == [(e,) for e in evs]  # each page exactly once, in order
        finally:
            await h.sub.close()


async def test_gap_without_replay_forgets_and_rebuilds() -> None:
    h = Harness()
    a = list(range(1, 17))
    b = list(range(101, 117))
    async with DroppingPublisher("tcp://127.0.0.1:0") as pub:
        await h.sub.add("w0", pub.endpoint)
        try:
            await h.sync(pub, "w0")
            pub.publish(page_events(a))
            await wait_for(lambda: h.index.match(hash_blocks(a, BS)) == {"w0": 4})
            resets = len(h.resets)
            gaps = h.sub.stats("w0")["gaps"]
            pub.drop = {pub.next_seq}
            pub.publish([BlockRemoved((page_events(a)[3].block_hashes[0],))])  # lost
            pub.publish(page_events(b))  # arrives after the gap
            await wait_for(lambda: h.index.match(hash_blocks(b, BS)) == {"w0": 4})
            assert len(h.resets) == resets + 1 and h.sub.stats("w0")["gaps"] == gaps + 1
            assert h.index.match(hash_blocks(a, BS)) == {}  # forgotten, not stale
        finally:
            await h.sub.close()


async def test_replay_that_cannot_fill_the_gap_resets() -> None:
    """The replay buffer lost the missing batch (buffer_steps=1), then a replay endpoint that never
    answers (bounded by replay_timeout): both end in on_reset, never a hang."""
    h = Harness()
    h.sub._replay_timeout = 0.3
    ctx = zmq.asyncio.Context.instance()
    silent = ctx.socket(zmq.ROUTER)
    a = list(range(1, 9))
    try:
        silent.bind("tcp://127.0.0.1:0")
        async with DroppingPublisher(
            "tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0", buffer_steps=1
        ) as pub:
            await h.sub.add("w0", pub.endpoint, replay_endpoint=pub.replay_endpoint)
            await h.sync(pub, "w0")
            base = h.sub.stats("w0")
            pub.drop = {pub.next_seq}
            pub.publish([])  # lost, and pushed out of the 1-batch buffer by the next one
            pub.publish(page_events(a))
            await wait_for(lambda: h.sub.stats("w0")["resets"] == base["resets"] + 1)
            await wait_for(lambda: h.index.match(hash_blocks(a, BS)) == {"w0": 2})
            st = h.sub.stats("w0")
            assert st["replay_failures"] == base["replay_failures"] + 1 and st["replays"] == base["replays"]

            # same stream, now with a replay endpoint that never answers
            await h.sub.add("w0", pub.endpoint, replay_endpoint=silent.getsockopt_string(zmq.LAST_ENDPOINT))
            await h.sync(pub, "w0")
            base = h.sub.stats("w0")
            pub.drop = {pub.next_seq}
            pub.publish([])
            pub.publish([])
            t0 = time.monotonic()
            await wait_for(lambda: h.sub.stats("w0")["resets"] == base["resets"] + 1)
            assert time.monotonic() - t0 < 2.0
            assert h.sub.stats("w0")["replay_failures"] == base["replay_failures"] + 1
    finally:
        await h.sub.close()
        silent.close(linger=0)


async def test_engine_restart_duplicates_and_decode_errors() -> None:
    """Raw PUB socket so seq and payload are under test control."""
    h = Harness()
    ctx = zmq.asyncio.Context.instance()
    pub = ctx.socket(zmq.PUB)
    try:
        pub.bind("tcp://127.0.0.1:0")
        ep = pub.getsockopt_string(zmq.LAST_ENDPOINT)
        await h.sub.add("w0", ep)
        enc = KvEventPublisher("tcp://127.0.0.1:0")

        def send(seq: int, payload: bytes) -> None:
            pub.send_multipart([b"", seq.to_bytes(8, "big"), payload], flags=zmq.NOBLOCK)

        s = await probe_until_live(h, send, enc, 0)
        await wait_for(lambda: h.sub.stats("w0")["last_seq"] == s - 1)
        tokens = list(range(1, 9))
        send(s, enc.encode(page_events(tokens)))
        send(s + 1, b"\xc1garbage")
        send(s + 1, enc.encode([]))  # duplicate seq: dropped
        send(s + 2, enc.encode([]))
        await wait_for(lambda: h.sub.stats("w0")["last_seq"] == s + 2)
        st = h.sub.stats("w0")
        assert st["decode_errors"] == 1 and st["duplicates"] == 1 and st["gaps"] <= 1
        assert h.index.match(hash_blocks(tokens, BS)) == {"w0": 2}
        resets = len(h.resets)
        send(0, enc.encode([]))  # the engine restarted: its cache is new
        await wait_for(lambda: len(h.resets) == resets + 1)
        assert h.index.match(hash_blocks(tokens, BS)) == {}
        await enc.close()
    finally:
        await h.sub.close()
        pub.close(linger=0)


async def test_burst_is_delivered_in_slices_that_yield() -> None:
    h = Harness()
    ticks = 0
    seen_ticks: set[int] = set()

    def on_batch(worker: str, batch: KvEventBatch) -> None:
        seen_ticks.add(ticks)
        h.batches.append((worker, batch))

    h.sub._on_batch = on_batch  # observe the loop ticks at delivery time
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)

    async with KvEventPublisher("tcp://127.0.0.1:0") as pub:
        await h.sub.add("w0", pub.endpoint)
        t = asyncio.get_running_loop().create_task(ticker())
        try:
            await h.sync(pub, "w0")
            n0 = len(h.batches)
            seen_ticks.clear()
            for _ in range(2000):
                pub.publish([])
            await wait_for(lambda: len(h.batches) >= n0 + 2000, timeout=20)
            assert len(seen_ticks) >= 2000 // 32 // 2  # delivered across many loop iterations
        finally:
            stop.set()
            await t
            await h.sub.close()


# --- SGLang's own ZmqEventPublisher as the engine ------------------------------------------------


def _sglang_publisher(version: str, tmp_path: Path) -> tuple[object, str, str]:
    m = load_kv_events(version)
    if version == "0.5.23":
        p = m.ZmqEventPublisher(attn_dp_rank=0, endpoint="tcp://127.0.0.1:0", bind=True,
                                replay_endpoint="tcp://127.0.0.1:0", topic="kv")  # fmt: skip
        return p, p._local_pub_endpoint, p._local_replay_endpoint
    # 0.5.10 binds only wildcard/ipc endpoints (a wildcard would listen beyond loopback): use ipc
    p = m.ZmqEventPublisher(attn_dp_rank=0, endpoint=f"ipc://{tmp_path}/kv.sock",
                            replay_endpoint="tcp://127.0.0.1:0", topic="kv")  # fmt: skip
    return p, f"ipc://{tmp_path}/kv.sock", p._replay.getsockopt_string(zmq.LAST_ENDPOINT)


@pytest.mark.parametrize("version", ["0.5.10.post1", "0.5.23"])
async def test_sglang_publisher_late_join_replays_history_before_add_returns(
    version: str, tmp_path: Path
) -> None:
    m = load_kv_events(version)
    pub, ep, rep = _sglang_publisher(version, tmp_path)
    h = Harness()
    a = list(range(1, 17))
    try:
        # history published before anyone subscribes: only the replay buffer has it
        pub.publish(m.KVEventBatch(ts=time.time(), events=[  # type: ignore[attr-defined]
            m.BlockStored(block_hashes=list(e.block_hashes), parent_block_hash=e.parent_block_hash,
                          token_ids=list(e.token_ids), block_size=BS, lora_id=None, medium="GPU")
            for e in page_events(a)]))  # fmt: skip
        await wait_for(lambda: len(pub._buffer) == 1)  # type: ignore[attr-defined]  # sent to nobody
        await h.sub.add("w0", ep, replay_endpoint=rep, topic="kv")
        # add() returns after the initial replay: the history is known before any live message
        assert h.index.match(hash_blocks(a, BS)) == {"w0": 4}
        st = h.sub.stats("w0")
        assert st["replays"] == 1 and st["gaps"] == 0 and st["decode_errors"] == 0 and h.resets == []
        # the live stream follows the replayed history (a probe lost to the slow joiner is replayed)
        deadline = time.monotonic() + 5
        while h.sub.stats("w0")["last_seq"] < 1:
            assert time.monotonic() < deadline, h.sub.stats("w0")
            pub.publish(m.KVEventBatch(ts=time.time(), events=[]))  # type: ignore[attr-defined]
            await asyncio.sleep(0.02)
        assert h.resets == [] and h.index.match(hash_blocks(a, BS)) == {"w0": 4}
        kinds = [type(e) for _, b in h.batches for e in b.events]
        assert kinds == [BlockStored] * 4
    finally:
        await h.sub.close()
        await asyncio.to_thread(pub.shutdown)  # type: ignore[attr-defined]
        atexit.unregister(pub.shutdown)  # type: ignore[attr-defined]  # SGLang registers it at init


@pytest.mark.parametrize("version", ["0.5.10.post1", "0.5.23"])
async def test_large_replay_to_a_slow_consumer_loses_nothing(version: str, tmp_path: Path) -> None:
    """SGLang's ROUTER drops replies it cannot queue: an 8,000-batch history replayed to a consumer
    slower than the sender must still arrive whole (resumed from the first missing batch)."""
    m = load_kv_events(version)
    pub, ep, rep = _sglang_publisher(version, tmp_path)
    h = Harness()
    n = 8000

    def slow(worker: str, batch: KvEventBatch) -> None:
        end = time.perf_counter() + 30e-6  # ~10x slower than the publisher sends
        while time.perf_counter() < end:
            pass
        h.on_batch(worker, batch)

    h.sub._on_batch = slow
    try:
        # ~2 KB per batch (16 pages of 16 tokens), 16 MB in all: more than the kernel's socket buffers hold
        events = [m.BlockStored(block_hashes=list(e.block_hashes), parent_block_hash=e.parent_block_hash,
                                token_ids=list(e.token_ids), block_size=BS, lora_id=None, medium="GPU")
                  for e in page_events(list(range(1000, 1000 + 16 * BS)))]  # fmt: skip
        for _ in range(n):
            pub.publish(m.KVEventBatch(ts=time.time(), events=events))  # type: ignore[attr-defined]
        await wait_for(lambda: len(pub._buffer) == n)  # type: ignore[attr-defined]
        await h.sub.add("w0", ep, replay_endpoint=rep, topic="kv")
        st = h.sub.stats("w0")
        # whole and in order, however many times it had to be resumed where replies were dropped
        assert (st["batches"], st["last_seq"], st["replays"], st["replay_failures"]) == (n, n - 1, 1, 0)
        assert st["duplicates"] == 0, st
        assert h.resets == []
    finally:
        await h.sub.close()
        await asyncio.to_thread(pub.shutdown)  # type: ignore[attr-defined]
        atexit.unregister(pub.shutdown)  # type: ignore[attr-defined]


async def test_replay_cut_in_the_middle_resumes_from_the_first_missing_batch() -> None:
    """A scripted replay server that drops seq 5 the first time (as a full ROUTER pipe does): the
    subscriber asks again from 5 and ends with all ten batches once each, no reset."""
    pub = KvEventPublisher("tcp://127.0.0.1:0")  # live stream only; the replay is scripted below
    ctx = zmq.asyncio.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.bind("tcp://127.0.0.1:0")
    payloads = [pub.encode([]) for _ in range(10)]
    starts: list[int] = []

    async def serve() -> None:
        while True:
            client, _, start_b = await router.recv_multipart()
            start = int.from_bytes(start_b, "big")
            starts.append(start)
            for seq in range(start, 10):
                if len(starts) == 1 and seq == 5:
                    continue  # dropped
                await router.send_multipart((client, b"", seq.to_bytes(8, "big"), payloads[seq]))
            await router.send_multipart((client, b"", END_SEQ, b""))

    server = asyncio.get_running_loop().create_task(serve())
    h = Harness()
    try:
        await pub.start()
        await h.sub.add("w0", pub.endpoint, replay_endpoint=router.getsockopt_string(zmq.LAST_ENDPOINT))
        st = h.sub.stats("w0")
        assert starts == [0, 5]
        assert (st["batches"], st["last_seq"], st["replays"], st["replay_resumes"]) == (10, 9, 1, 1)
        assert st["replay_failures"] == 0 and h.resets == []
    finally:
        server.cancel()
        await h.sub.close()
        await pub.close()
        router.close(linger=0)


async def test_consumer_exception_is_counted_not_fatal() -> None:
    h = Harness()
    calls: list[int] = []

    def bad(worker: str, batch: KvEventBatch) -> None:
        calls.append(len(batch.events))
        if len(calls) % 2:
            raise RuntimeError("consumer bug")

    h.sub._on_batch = bad
    async with KvEventPublisher("tcp://127.0.0.1:0") as pub:
        await h.sub.add("w0", pub.endpoint)
        try:
            deadline = time.monotonic() + 5
            while not calls:
                assert time.monotonic() < deadline
                pub.publish([])
                await asyncio.sleep(0.01)
            n = len(calls)
            for _ in range(4):
                pub.publish([])
            await wait_for(lambda: len(calls) >= n + 4)
            st = h.sub.stats("w0")
            assert st["callback_errors"] == (len(calls) + 1) // 2 and st["batches"] == len(calls)
        finally:
            await h.sub.close()
        with pytest.raises(KeyError):
            h.sub.stats("w0")


async def test_sglang_publisher_that_connects_reaches_a_binding_subscriber() -> None:
    """SGLang 0.5.10 connects its PUB when the endpoint names a concrete address: the subscriber binds it
    (`bind=True`) and receives; a connecting subscriber there would wait for nothing."""
    from kvroute.engines.sim.fleet import free_port

    m = load_kv_events("0.5.10.post1")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    h = Harness()
    await h.sub.add("w0", endpoint, topic="kv", bind=True)  # bound before the engine starts
    pub = m.ZmqEventPublisher(attn_dp_rank=0, endpoint=endpoint, topic="kv")
    a = list(range(1, 17))
    try:
        assert "*" not in endpoint  # SGLang's rule: no wildcard -> its PUB connects
        deadline = time.monotonic() + 5
        while h.index.match(hash_blocks(a, BS)) != {"w0": 4}:  # a slow joiner may lose the first sends
            assert time.monotonic() < deadline, h.sub.stats("w0")
            pub.publish(m.KVEventBatch(ts=time.time(), events=[  # type: ignore[attr-defined]
                m.BlockStored(block_hashes=list(e.block_hashes), parent_block_hash=e.parent_block_hash,
                              token_ids=list(e.token_ids), block_size=BS, lora_id=None, medium="GPU")
                for e in page_events(a)]))  # fmt: skip
            await asyncio.sleep(0.05)
        assert h.sub.stats("w0")["decode_errors"] == 0
    finally:
        await h.sub.close()
        await asyncio.to_thread(pub.shutdown)  # type: ignore[attr-defined]
        atexit.unregister(pub.shutdown)  # type: ignore[attr-defined]


async def test_bind_to_an_address_this_host_lacks_binds_every_interface() -> None:
    from kvroute.engines.sim.fleet import free_port

    port = free_port()
    h = Harness()
    try:
        await h.sub.add("w0", f"tcp://192.0.2.1:{port}", bind=True)  # TEST-NET-1: never local
        async with KvEventPublisher(f"tcp://127.0.0.1:{port}", bind=False) as pub:
            await h.sync(pub, "w0")  # the engine connecting to loopback reaches it
    finally:
        await h.sub.close()


async def test_engine_restart_whose_sequence_does_not_restart_at_zero() -> None:
    """Issue #18: an engine restarted behind the same endpoint whose first batch we see is not seq 0 (a
    late join, a PUB drop) was taken for duplicates and dropped until its seq passed the old one, leaving
    the index stale. A seq below the last one that no replay explains is a restart: the worker's blocks
    are forgotten and the new stream is followed at once."""
    h = Harness()
    ctx = zmq.asyncio.Context.instance()
    pub = ctx.socket(zmq.PUB)
    try:
        pub.bind("tcp://127.0.0.1:0")
        ep = pub.getsockopt_string(zmq.LAST_ENDPOINT)
        await h.sub.add("w0", ep)
        enc = KvEventPublisher("tcp://127.0.0.1:0")

        def send(seq: int, payload: bytes) -> None:
            pub.send_multipart([b"", seq.to_bytes(8, "big"), payload], flags=zmq.NOBLOCK)

        # Probes start at seq 2, as when the subscriber joins late and misses the first batches (a slow
        # join on a loaded host made this test flaky): that path must not make seq 5 look like a duplicate.
        s = await probe_until_live(h, send, enc, 2)
        old = list(range(1, 9))
        for i in range(40):  # the old engine gets well past the new one's first seq
            send(s + i, enc.encode(page_events(old) if i == 0 else []))
        await wait_for(lambda: h.sub.stats("w0")["last_seq"] == s + 39)
        assert h.index.match(hash_blocks(old, BS)) == {"w0": 2}
        resets = len(h.resets)
        new = list(range(100, 108))
        send(5, enc.encode(page_events(new)))  # the restarted engine's first batch we see: seq 5, not 0
        await wait_for(lambda: len(h.resets) > resets)
        await wait_for(lambda: h.index.match(hash_blocks(new, BS)) == {"w0": 2})
        assert h.index.match(hash_blocks(old, BS)) == {}  # the old engine's cache is gone
        send(6, enc.encode([]))
        await wait_for(lambda: h.sub.stats("w0")["last_seq"] == 6)
        await enc.close()
    finally:
        await h.sub.close()
        pub.close(linger=0)

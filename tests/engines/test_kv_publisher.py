"""KvEventPublisher puts SGLang's exact bytes on the wire: payloads byte-equal to SGLang's own encoder,
decodable by SGLang's own decoder, PUB framing, ROUTER replay in both reply shapes, page hashes."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable

import msgspec
import pytest
import zmq
import zmq.asyncio

from kvroute.cache_index.events import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent, decode_batch
from kvroute.engines.kv_publisher import (
    END_SEQ,
    KvEventPublisher,
    PublisherForm,
    sglang_page_hash,
    should_bind,
)
from tests.sglang_ref import load_kv_events

FORMS: list[tuple[PublisherForm, str]] = [("array", "0.5.10.post1"), ("map", "0.5.23")]

EVENTS: list[KvEvent] = [
    BlockStored((1, -2), None, (1, 2, 3, 4), 2, None, "GPU"),
    BlockStored((3,), -2, (5, 6), 2, 4),
    BlockStored((9,), 3, (7, 8), 2, None, "CPU_PINNED", lora_name="ad", cache_salt="salt"),
    BlockRemoved((5,)),
    BlockRemoved((5, 6), "CPU_PINNED"),
    AllBlocksCleared(),
]


def sglang_events(m: object, version: str) -> list[object]:
    extra = {"lora_name": "ad", "cache_salt": "salt"} if version == "0.5.23" else {}
    return [
        m.BlockStored(block_hashes=[1, -2], parent_block_hash=None, token_ids=[1, 2, 3, 4], block_size=2,  # type: ignore[attr-defined]
                      lora_id=None, medium="GPU"),
        m.BlockStored(block_hashes=[3], parent_block_hash=-2, token_ids=[5, 6], block_size=2, lora_id=4),  # type: ignore[attr-defined]
        m.BlockStored(block_hashes=[9], parent_block_hash=3, token_ids=[7, 8], block_size=2, lora_id=None,  # type: ignore[attr-defined]
                      medium="CPU_PINNED", **extra),
        m.BlockRemoved(block_hashes=[5]),  # type: ignore[attr-defined]
        m.BlockRemoved(block_hashes=[5, 6], medium="CPU_PINNED"),  # type: ignore[attr-defined]
        m.AllBlocksCleared(),  # type: ignore[attr-defined]
    ]  # fmt: skip


async def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.005)


@pytest.mark.parametrize(("form", "version"), FORMS)
def test_payload_byte_equal_to_sglang_encoder(form: PublisherForm, version: str) -> None:
    m = load_kv_events(version)
    ref_batch = m.KVEventBatch(ts=123.25, events=sglang_events(m, version), attn_dp_rank=0)
    ref = msgspec.msgpack.Encoder().encode(ref_batch)
    ours = KvEventPublisher("tcp://127.0.0.1:0", form=form).encode(EVENTS, ts=123.25)
    assert ours == ref  # (0.5.10's array form has no lora_name/cache_salt: they are dropped)
    # SGLang's own decoder reads it into its own classes
    theirs = msgspec.msgpack.Decoder(m.KVEventBatch).decode(ours)
    assert theirs == m.KVEventBatch(ts=123.25, events=sglang_events(m, version), attn_dp_rank=0)
    # and so does ours (the array form drops the map-only fields)
    back = decode_batch(ours)
    assert back.events[0] == EVENTS[0] and back.events[3:] == tuple(EVENTS[3:])
    assert back.events[2].lora_name == ("ad" if form == "map" else None)  # type: ignore[union-attr]


def test_attn_dp_rank_none_and_array_forms_differ() -> None:
    a = KvEventPublisher("tcp://127.0.0.1:0", attn_dp_rank=None).encode([], ts=1.0)
    assert msgspec.msgpack.decode(a) == [1.0, [], None]
    m = KvEventPublisher("tcp://127.0.0.1:0", form="map", attn_dp_rank=3).encode([AllBlocksCleared()], ts=1.0)
    assert msgspec.msgpack.decode(m) == [1.0, [{"type": "AllBlocksCleared"}], 3]


def _reference_page_hash(tokens: list[int], prior_hex: str | None) -> tuple[str, int]:
    """hicache_storage.get_hash_str + hash_str_to_int64, written out independently."""
    h = hashlib.sha256()
    if prior_hex:
        h.update(bytes.fromhex(prior_hex))
    for t in tokens:
        h.update(t.to_bytes(4, byteorder="little", signed=False))
    hx = h.hexdigest()
    u = int(hx[:16], 16)
    return hx, u - 2**64 if u >= 2**63 else u


def test_sglang_page_hash_matches_hicache_algorithm() -> None:
    # A known value: sha256 of u32 LE [1, 2, 3, 4]
    hx, val = sglang_page_hash([1, 2, 3, 4], None)
    assert hx == hashlib.sha256(bytes.fromhex("01000000020000000300000004000000")).hexdigest()
    assert val == int.from_bytes(bytes.fromhex(hx)[:8], "big", signed=True)
    prior = None
    signs = set()
    for page in range(64):
        toks = [page * 7 + i for i in range(16)] + [2**32 - 1]
        got = sglang_page_hash(toks, prior)
        assert got == _reference_page_hash(toks, prior)
        signs.add(got[1] < 0)
        prior = got[0]
    assert signs == {True, False}  # both branches of the signed conversion were exercised
    assert sglang_page_hash([], None)[0] == hashlib.sha256(b"").hexdigest()


def test_should_bind_follows_sglang() -> None:
    assert should_bind("tcp://*:5557") and should_bind("tcp://[::]:5557") and should_bind("tcp://0.0.0.0:1")
    assert should_bind("ipc:///tmp/x") and should_bind("inproc://x") and should_bind("tcp://127.0.0.1:0")
    assert not should_bind("tcp://10.0.0.1:5557") and not should_bind("tcp://localhost:5557")


@pytest.mark.parametrize("form", ["array", "map"])
async def test_pub_frames_and_seq(form: PublisherForm) -> None:
    ctx = zmq.asyncio.Context.instance()
    async with KvEventPublisher("tcp://127.0.0.1:0", topic="kv", form=form) as pub:
        assert pub.endpoint.startswith("tcp://127.0.0.1:") and not pub.endpoint.endswith(":0")
        sub = ctx.socket(zmq.SUB)
        try:
            sub.setsockopt(zmq.SUBSCRIBE, b"kv")
            sub.connect(pub.endpoint)
            # slow joiner: publish probes until one arrives
            got: list[list[bytes]] = []
            deadline = time.monotonic() + 5
            while not got:
                assert time.monotonic() < deadline
                pub.publish([])
                if await sub.poll(20):
                    got.append(await sub.recv_multipart())
            seqs = [pub.publish(EVENTS[:1]), pub.publish(EVENTS[3:4])]
            assert seqs[1] == seqs[0] + 1
            frames = []
            while len(frames) < 2:
                f = await asyncio.wait_for(sub.recv_multipart(), 5)
                if int.from_bytes(f[1], "big") >= seqs[0]:
                    frames.append(f)
        finally:
            sub.close(linger=0)
    assert [f[0] for f in frames] == [b"kv", b"kv"]
    assert [f[1] for f in frames] == [s.to_bytes(8, "big") for s in seqs]
    assert decode_batch(frames[0][2]).events == (EVENTS[0],)
    assert int.from_bytes(got[0][1], "big") >= 0 and len(got[0]) == 3


async def _replay(endpoint: str, start: int) -> list[list[bytes]]:
    ctx = zmq.asyncio.Context.instance()
    d = ctx.socket(zmq.DEALER)
    try:
        d.connect(endpoint)
        await d.send_multipart([b"", start.to_bytes(8, "big")])
        out = []
        while True:
            f = await asyncio.wait_for(d.recv_multipart(), 5)
            out.append(f)
            if END_SEQ in f:
                return out
    finally:
        d.close(linger=0)


@pytest.mark.parametrize(("form", "shape"), [("array", "0.5.10"), ("map", "0.5.23"), ("array", "0.5.23")])
async def test_replay_shapes_and_buffer(form: PublisherForm, shape: str) -> None:
    async with KvEventPublisher(
        "tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0", topic="t", form=form,
        replay_form=shape, buffer_steps=3,  # type: ignore[arg-type]
    ) as pub:  # fmt: skip
        assert pub.replay_endpoint is not None and not pub.replay_endpoint.endswith(":0")
        payloads = [pub.encode([BlockRemoved((i,))], ts=float(i)) for i in range(5)]
        for i in range(5):
            pub.publish([BlockRemoved((i,))])
        replies = await _replay(pub.replay_endpoint, 1)
        tail = await _replay(pub.replay_endpoint, 4)
    # buffer_steps=3 keeps seq 2, 3, 4; start=1 gets all three, then the end marker
    if shape == "0.5.10":
        assert replies[-1] == [b"", END_SEQ, b""]
        body = [(int.from_bytes(f[1], "big"), f[2]) for f in replies[:-1]]
        assert all(len(f) == 3 for f in replies)
    else:
        assert replies[-1] == [b"", b"", END_SEQ, b""]
        assert all(len(f) == 4 and f[1] == b"t" for f in replies[:-1])
        body = [(int.from_bytes(f[2], "big"), f[3]) for f in replies[:-1]]
    assert [s for s, _ in body] == [2, 3, 4]
    assert [decode_batch(p).events for _, p in body] == [decode_batch(payloads[i]).events for i in (2, 3, 4)]
    assert len(tail) == 2  # seq 4 and the end marker


async def test_publish_before_start_and_close_are_clean() -> None:
    pub = KvEventPublisher("tcp://127.0.0.1:0")
    with pytest.raises(RuntimeError):
        pub.publish([])
    await pub.start()
    assert pub.publish([]) == 0 and pub.next_seq == 1
    await pub.close()
    await pub.close()  # idempotent
    with pytest.raises(ValueError):
        KvEventPublisher("tcp://127.0.0.1:0", form="json")  # type: ignore[arg-type]


async def test_long_replay_complete_and_in_order() -> None:
    async with KvEventPublisher("tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0") as pub:
        for _ in range(600):  # more than one 256-send slice of the replay task
            pub.publish([])
        assert pub.replay_endpoint is not None
        replies = await _replay(pub.replay_endpoint, 0)
    assert [int.from_bytes(f[1], "big", signed=True) for f in replies] == [*range(600), -1]

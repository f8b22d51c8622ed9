"""Decoder conformance: batches built and encoded by SGLang's own kv_events.py (0.5.10.post1 array form,
0.5.23 map form) decode exactly; hand-built variants (omitted/extra fields); malformed inputs raise the
one error type."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as stg

from kvroute.cache_index.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEventBatch,
    KvEventDecodeError,
    decode_batch,
)
from tests.sglang_ref import VERSIONS, load_kv_events

enc = msgspec.msgpack.encode


def sglang_payload(
    version: str, events: list[dict[str, Any]], ts: float = 12.5, rank: int | None = 0
) -> bytes:
    """Encode with SGLang's classes and encoder (what its ZmqEventPublisher sends)."""
    m = load_kv_events(version)
    objs = []
    for e in events:
        kind = e["kind"]
        kw = {k: v for k, v in e.items() if k != "kind"}
        objs.append(getattr(m, kind)(**kw))
    return msgspec.msgpack.Encoder().encode(m.KVEventBatch(ts=ts, events=objs, attn_dp_rank=rank))


@pytest.mark.parametrize("version", VERSIONS)
def test_sglang_batch_decodes_exactly(version: str) -> None:
    events = [
        # 0.5.10 style: one page per event
        dict(kind="BlockStored", block_hashes=[-5], parent_block_hash=None, token_ids=[1, 2, 3, 4],
             block_size=4, lora_id=None, medium="GPU"),
        # 0.5.23 style: merged pages, several hashes and all tokens, block_size of one page
        dict(kind="BlockStored", block_hashes=[7, 2**63 - 1], parent_block_hash=-5,
             token_ids=[5, 6, 7, 8, 9, 10, 11, 2**32 - 1], block_size=4, lora_id=3),
        dict(kind="BlockRemoved", block_hashes=[7, -(2**63)], medium="CPU_PINNED"),
        dict(kind="BlockRemoved", block_hashes=[1]),
        dict(kind="AllBlocksCleared"),
    ]  # fmt: skip
    got = decode_batch(sglang_payload(version, events, ts=12.5, rank=2))
    assert got == KvEventBatch(
        ts=12.5,
        events=(
            BlockStored((-5,), None, (1, 2, 3, 4), 4, None, "GPU"),
            BlockStored((7, 2**63 - 1), -5, (5, 6, 7, 8, 9, 10, 11, 2**32 - 1), 4, 3, None),
            BlockRemoved((7, -(2**63)), "CPU_PINNED"),
            BlockRemoved((1,), None),
            AllBlocksCleared(),
        ),
        attn_dp_rank=2,
    )
    # Types are exactly the public ones whatever the wire form.
    kinds = [BlockStored, BlockStored, BlockRemoved, BlockRemoved, AllBlocksCleared]
    assert [type(e) for e in got.events] == kinds


def test_sglang_0523_extra_fields_and_enum_medium() -> None:
    m = load_kv_events("0.5.23")
    ev = m.BlockStored(
        block_hashes=[1], parent_block_hash=None, token_ids=[9, 9], block_size=2, lora_id=None,
        medium=m.StorageMedium.CPU, cache_salt="s", session_id="sess-1", lora_name="ad",
    )  # fmt: skip
    payload = msgspec.msgpack.Encoder().encode(m.KVEventBatch(ts=1.0, events=[ev]))
    raw = msgspec.msgpack.decode(payload)
    assert isinstance(raw[1][0], dict) and raw[1][0]["type"] == "BlockStored"  # really the map form
    (got,) = decode_batch(payload).events
    assert got == BlockStored((1,), None, (9, 9), 2, None, "CPU_PINNED", lora_name="ad", cache_salt="s")


@pytest.mark.parametrize("version", VERSIONS)
def test_empty_batch(version: str) -> None:
    assert decode_batch(sglang_payload(version, [], ts=3.0, rank=None)) == KvEventBatch(3.0, (), None)


def test_array_form_omitted_trailing_fields_take_defaults() -> None:
    payload = enc([7, [["BlockStored", [1], None, [1, 2], 2], ["BlockRemoved", [1]], ["AllBlocksCleared"]]])
    got = decode_batch(payload)
    assert got.ts == 7.0 and got.attn_dp_rank is None
    assert got.events == (BlockStored((1,), None, (1, 2), 2), BlockRemoved((1,)), AllBlocksCleared())


def test_map_form_unknown_keys_and_any_key_order() -> None:
    ev = {"future": [1, 2], "token_ids": [3], "type": "BlockStored", "block_size": 1,
          "parent_block_hash": 4, "block_hashes": [5], "lora_id": None, "medium": "GPU"}  # fmt: skip
    got = decode_batch(enc([1.5, [ev, {"type": "BlockRemoved", "block_hashes": [5], "x": 1}], 0]))
    assert got.events == (BlockStored((5,), 4, (3,), 1, None, "GPU"), BlockRemoved((5,)))
    assert got.attn_dp_rank == 0


def test_array_form_extra_trailing_elements_ignored() -> None:
    # msgspec's (and so SGLang's own) decoder ignores them: forward compatibility for added fields.
    got = decode_batch(enc([1.0, [["BlockRemoved", [1], "GPU", "later-field"]], 0, "later"]))
    assert got.events == (BlockRemoved((1,), "GPU"),)


def test_large_batch_header_forms() -> None:
    # array16 events header and float32 / int timestamps go through the form peek
    many = [["BlockRemoved", [i]] for i in range(20)]
    assert len(decode_batch(enc([5, many])).events) == 20
    maps = [{"type": "BlockRemoved", "block_hashes": [i]} for i in range(20)]
    assert decode_batch(enc([-3, maps])).events[19] == BlockRemoved((19,))
    f32 = msgspec.msgpack.Encoder().encode([1.0, maps])  # float64
    assert decode_batch(f32).ts == 1.0


MALFORMED: list[tuple[str, Any]] = [
    ("empty", b""),
    ("not msgpack", b"\xc1"),
    ("truncated", enc([1.0, [["BlockStored", [1], None, [1, 2], 2, None]]])[:-3]),
    ("batch not array", enc({"ts": 1.0})),
    ("ts wrong type", enc(["x", []])),
    ("events not list", enc([1.0, 5])),
    ("unknown tag array", enc([1.0, [["BlockMoved", [1]]]])),
    ("unknown tag map", enc([1.0, [{"type": "BlockMoved", "block_hashes": [1]}]])),
    ("missing tag map", enc([1.0, [{"block_hashes": [1]}]])),
    ("too few fields", enc([1.0, [["BlockStored", [1], None, [1, 2]]]])),
    ("too few batch", enc([1.0])),
    ("hash not int", enc([1.0, [["BlockRemoved", ["a"]]]])),
    ("hashes not list", enc([1.0, [["BlockRemoved", 5]]])),
    ("token negative", enc([1.0, [["BlockStored", [1], None, [-1], 1]]])),
    ("token over u32", enc([1.0, [["BlockStored", [1], None, [2**32], 1]]])),
    ("bigram tokens", enc([1.0, [["BlockStored", [1], None, [[1, 2]], 1]]])),
    ("medium wrong type", enc([1.0, [{"type": "BlockRemoved", "block_hashes": [1], "medium": 3}]])),
    ("map missing field", enc([1.0, [{"type": "BlockStored", "block_hashes": [1], "token_ids": [1]}]])),
    ("mixed forms", enc([1.0, [{"type": "AllBlocksCleared"}, ["AllBlocksCleared"]]])),
    ("mixed forms 2", enc([1.0, [["AllBlocksCleared"], {"type": "AllBlocksCleared"}]])),
    ("rank wrong type", enc([1.0, [], "r"])),
    ("not bytes", None),
    ("str", "abc"),
]


@pytest.mark.parametrize(("name", "payload"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_raises_one_error_type(name: str, payload: Any) -> None:
    with pytest.raises(KvEventDecodeError) as info:
        decode_batch(payload)
    assert isinstance(info.value, ValueError)


def test_every_truncation_raises_decode_error() -> None:
    payload = enc([1.0, [{"type": "BlockStored", "block_hashes": [1, 2], "parent_block_hash": None,
                          "token_ids": [1, 2], "block_size": 1, "lora_id": None}], 0])  # fmt: skip
    for cut in range(len(payload)):
        with pytest.raises(KvEventDecodeError):
            decode_batch(payload[:cut])


_i64 = stg.integers(-(2**63), 2**63 - 1)
_event = stg.one_of(
    stg.fixed_dictionaries({
        "kind": stg.just("BlockStored"),
        "block_hashes": stg.lists(_i64, min_size=1, max_size=4),
        "parent_block_hash": stg.none() | _i64,
        "token_ids": stg.lists(stg.integers(0, 2**32 - 1), max_size=40),
        "block_size": stg.integers(1, 64),
        "lora_id": stg.none() | stg.integers(0, 100),
        "medium": stg.sampled_from([None, "GPU", "CPU_PINNED"]),
    }),
    stg.fixed_dictionaries({
        "kind": stg.just("BlockRemoved"),
        "block_hashes": stg.lists(_i64, max_size=4),
        "medium": stg.sampled_from([None, "GPU", "CPU_PINNED"]),
    }),
    stg.just({"kind": "AllBlocksCleared"}),
)  # fmt: skip


def _expected(e: dict[str, Any]) -> Any:
    if e["kind"] == "BlockStored":
        return BlockStored(tuple(e["block_hashes"]), e["parent_block_hash"], tuple(e["token_ids"]),
                           e["block_size"], e["lora_id"], e["medium"])  # fmt: skip
    if e["kind"] == "BlockRemoved":
        return BlockRemoved(tuple(e["block_hashes"]), e["medium"])
    return AllBlocksCleared()


@settings(max_examples=150, deadline=None)
@given(
    version=stg.sampled_from(VERSIONS),
    events=stg.lists(_event, max_size=6),
    ts=stg.floats(0, 2e9),
    rank=stg.none() | stg.integers(0, 7),
)
def test_property_sglang_encodings_round_trip(
    version: str, events: list[dict[str, Any]], ts: float, rank: int | None
) -> None:
    got = decode_batch(sglang_payload(version, events, ts=ts, rank=rank))
    assert got == KvEventBatch(ts, tuple(_expected(e) for e in events), rank)

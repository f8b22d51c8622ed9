"""Typed SGLang/vLLM KV-cache events and the decoder of their msgpack batches (PROTOCOLS.md section 1).

Two wire forms exist and a fleet may mix them (one form per engine):
- tagged arrays (SGLang <= 0.5.10, old vLLM): ``["BlockStored", hashes, parent, tokens, size, lora, medium]``;
- tagged maps (SGLang 0.5.23, vLLM since ~0.26): ``{"type": "BlockStored", "block_hashes": ..., ...}``.
The batch itself is always the array ``[ts, events, attn_dp_rank]``.

Decoding is msgspec's typed decoding (schema checks in C, no per-field Python work): the array form
decodes straight into the public structs below; the map form decodes into private mirror structs and
is converted. Which form a payload uses is read from the first event's msgpack header byte.
"""

from __future__ import annotations

from typing import Annotated, Final, TypeAlias

import msgspec

__all__ = [
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "KvEvent",
    "KvEventBatch",
    "KvEventDecodeError",
    "MEDIUM_CPU",
    "MEDIUM_GPU",
    "decode_batch",
]

MEDIUM_GPU: Final = "GPU"
"""Device HBM: the tier whose hits save prefill work, the one routing counts."""
MEDIUM_CPU: Final = "CPU_PINNED"
"""Host pinned memory (SGLang HiCache L2)."""

TokenId = Annotated[int, msgspec.Meta(ge=0, lt=2**32)]
EngineHash: TypeAlias = int
"""Opaque engine key (SGLang: signed int64); msgpack itself bounds it to the 64-bit range."""


class KvEventDecodeError(ValueError):
    """A KV-event payload that is not a valid batch; the only error `decode_batch` raises."""


class _Event(msgspec.Struct, frozen=True, gc=False, array_like=True, tag=True):
    """Base of the public events; its options are those of the array wire form (tag = class name)."""


class BlockStored(_Event, frozen=True):
    """Pages stored in the engine's cache: one engine hash per page of `block_size` tokens.

    Up to SGLang 0.5.10 one event is one page; 0.5.23 merges consecutive pages of a chain into one
    event (several hashes, all their tokens, `block_size` still the size of one page).
    `lora_name` and `cache_salt` exist only in the map form (SGLang 0.5.23); they stay None otherwise.
    """

    block_hashes: tuple[EngineHash, ...]
    parent_block_hash: EngineHash | None
    token_ids: tuple[TokenId, ...]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    cache_salt: str | None = None


class BlockRemoved(_Event, frozen=True):
    """Pages evicted from the tier `medium` (None = GPU for engines that do not say)."""

    block_hashes: tuple[EngineHash, ...]
    medium: str | None = None


class AllBlocksCleared(_Event, frozen=True):
    """The engine flushed its whole cache."""


KvEvent: TypeAlias = BlockStored | BlockRemoved | AllBlocksCleared


class KvEventBatch(msgspec.Struct, frozen=True, gc=False, array_like=True):
    """One published batch (one scheduler step): `ts` is the engine's wall clock (time.time())."""

    ts: float
    events: tuple[KvEvent, ...]
    attn_dp_rank: int | None = None


# --- map form: private mirrors, tag field "type", unknown keys (session_id, ...) ignored ---------


class _MapEvent(msgspec.Struct, frozen=True, gc=False, tag_field="type"):
    pass


class _MapBlockStored(_MapEvent, frozen=True, tag="BlockStored"):
    block_hashes: tuple[EngineHash, ...]
    parent_block_hash: EngineHash | None
    token_ids: tuple[TokenId, ...]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    cache_salt: str | None = None


class _MapBlockRemoved(_MapEvent, frozen=True, tag="BlockRemoved"):
    block_hashes: tuple[EngineHash, ...]
    medium: str | None = None


class _MapAllBlocksCleared(_MapEvent, frozen=True, tag="AllBlocksCleared"):
    pass


class _MapBatch(msgspec.Struct, frozen=True, gc=False, array_like=True):
    ts: float
    events: tuple[_MapBlockStored | _MapBlockRemoved | _MapAllBlocksCleared, ...]
    attn_dp_rank: int | None = None


_ARRAY_DECODER: Final = msgspec.msgpack.Decoder(KvEventBatch)
_MAP_DECODER: Final = msgspec.msgpack.Decoder(_MapBatch)
_CLEARED: Final = AllBlocksCleared()

# Bytes a msgpack number occupies after its header byte (for skipping `ts` while peeking).
_NUM_SIZE: Final = {0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
_ARRAY_HDR: Final = {0xDC: 2, 0xDD: 4}


def _first_event_is_map(data: bytes | bytearray | memoryview) -> bool:
    """Peek at the header byte of the first event; False when unsure (the array decoder then reports)."""
    try:
        b = data[0]
        if 0x90 <= b <= 0x9F:
            i = 1
        elif b in _ARRAY_HDR:
            i = 1 + _ARRAY_HDR[b]
        else:
            return False
        b = data[i]  # ts
        if b < 0x80 or b >= 0xE0:
            i += 1
        elif b in _NUM_SIZE:
            i += 1 + _NUM_SIZE[b]
        else:
            return False
        b = data[i]  # events array header
        if 0x90 <= b <= 0x9F:
            i += 1
        elif b in _ARRAY_HDR:
            i += 1 + _ARRAY_HDR[b]
        else:
            return False
        b = data[i]
        return 0x80 <= b <= 0x8F or b == 0xDE or b == 0xDF
    except IndexError:
        return False


def _from_map(ev: _MapBlockStored | _MapBlockRemoved | _MapAllBlocksCleared) -> KvEvent:
    if type(ev) is _MapBlockStored:
        return BlockStored(
            ev.block_hashes, ev.parent_block_hash, ev.token_ids, ev.block_size,
            ev.lora_id, ev.medium, ev.lora_name, ev.cache_salt,
        )  # fmt: skip
    if type(ev) is _MapBlockRemoved:
        return BlockRemoved(ev.block_hashes, ev.medium)
    return _CLEARED


def decode_batch(payload: bytes | bytearray | memoryview) -> KvEventBatch:
    """Decode one msgpack batch of either wire form into typed events.

    Missing trailing fields take their defaults (`omit_defaults`), extra trailing array elements and
    unknown map keys are ignored (msgspec's forward-compatibility rule, as SGLang's own decoder does).
    Raises `KvEventDecodeError` (and nothing else) for truncated msgpack, wrong types, unknown tags,
    too few fields, or a batch mixing both forms.
    """
    try:
        if _first_event_is_map(payload):
            mb = _MAP_DECODER.decode(payload)
            return KvEventBatch(mb.ts, tuple(map(_from_map, mb.events)), mb.attn_dp_rank)
        return _ARRAY_DECODER.decode(payload)
    except (msgspec.DecodeError, TypeError) as exc:  # ValidationError is a DecodeError
        raise KvEventDecodeError(f"invalid KV event batch: {exc}") from exc

"""Token ids -> chained block hashes; tokenizers used only to compute them.

A block's hash covers its whole prefix (it is chained over the parent's hash), so two equal
hashes mean two equal prefixes and the index can be a flat dict keyed by hash.
"""

from __future__ import annotations

import json
import struct
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NewType, Protocol

import xxhash

BlockHash = NewType("BlockHash", int)
"""kvroute's own identity of a block: xxh3-64 chained over the parent hash and the block's tokens."""

EngineBlockHash = NewType("EngineBlockHash", int)
"""The engine's opaque key for a block (SGLang: first 8 bytes of a chained SHA-256, signed)."""

_U64 = struct.Struct("<Q")


def namespace_seed(model: str = "", lora: str | None = None) -> int:
    """Seed that separates models and LoRA adapters: the same tokens under two models are two blocks."""
    return xxhash.xxh3_64_intdigest(f"{model}\x00{lora or ''}".encode())


_PIECE = 1 << 17  # elements converted per C call on large inputs (~2 ms each: the GIL can switch between)


def _chain(parent: int, payload: bytes, seed: int) -> int:
    return xxhash.xxh3_64_intdigest(_U64.pack(parent) + payload, seed=seed)


def hash_blocks(token_ids: Sequence[int], block_size: int, seed: int = 0, parent: int = 0) -> list[BlockHash]:
    """Hashes of the full blocks of `token_ids` (a trailing partial block is not hashed).

    `parent` continues a chain (the hash of the block before `token_ids[0]`); 0 starts at the root.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    n_full = len(token_ids) // block_size
    if n_full == 0:
        return []
    # One u32 LE conversion for the whole prompt, then slices: no per-token Python work. In pieces of
    # _PIECE ids: one C call over a 30 M-token prompt would hold the GIL for ~0.3 s, and the router hashes
    # large prompts on a thread so that its event loop keeps running (router/proxy.py).
    ids = token_ids[: n_full * block_size]
    try:
        arr = array("I")
        for i in range(0, len(ids), _PIECE):
            arr.extend(ids[i : i + _PIECE])
        buf = arr.tobytes()
    except OverflowError as exc:
        raise ValueError("token ids must be in [0, 2**32)") from exc
    if array("I").itemsize != 4:  # pragma: no cover - every supported platform has 4-byte unsigned int
        raise RuntimeError("array('I') is not 32-bit on this platform")
    step = block_size * 4
    out: list[BlockHash] = []
    h = parent
    pack = _U64.pack
    digest = xxhash.xxh3_64_intdigest
    for off in range(0, len(buf), step):
        h = digest(pack(h) + buf[off : off + step], seed=seed)
        out.append(BlockHash(h))
    return out


def hash_text_blocks(text: str, chunk_bytes: int, seed: int = 0) -> list[BlockHash]:
    """Fallback for fleets without a tokenizer: chained hashes of fixed-size chunks of UTF-8 bytes.

    Approximate (a chunk is not a KV page), like SGLang's own character-level router, but the
    same chaining rule keeps 'equal hash = equal prefix'.
    """
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    data = text.encode("utf-8")
    out: list[BlockHash] = []
    h = 0
    for off in range(0, len(data) - chunk_bytes + 1, chunk_bytes):
        h = _chain(h, data[off : off + chunk_bytes], seed)
        out.append(BlockHash(h))
    return out


class Tokenizer(Protocol):
    """What routing needs of a tokenizer: ids for a prompt, and for chat messages after the template."""

    @property
    def name(self) -> str: ...

    def encode(self, text: str) -> list[int]: ...

    def apply_chat_template(self, messages: Sequence[dict[str, Any]]) -> list[int]: ...


def _message_text(content: Any) -> str:
    """OpenAI message content: a string, or a list of parts of which the text parts count."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    raise ValueError("message content must be a string or a list of parts")


@dataclass(frozen=True)
class ByteTokenizer:
    """Deterministic byte-level tokenizer: token id = UTF-8 byte value (+ `offset`).

    Used by tests and by the simulated engine, and as the router's default, so that the router and
    a simulated fleet tokenize identically without any model files.
    """

    name: str = "byte"
    offset: int = 0

    def encode(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        if self.offset == 0:
            if len(data) <= _PIECE:
                return list(data)
            out: list[int] = []
            for i in range(0, len(data), _PIECE):  # in pieces: see hash_blocks (the GIL)
                out.extend(data[i : i + _PIECE])
            return out
        return [b + self.offset for b in data]

    def apply_chat_template(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        return self.encode(render_plain_chat(messages))


def render_plain_chat(messages: Sequence[dict[str, Any]]) -> str:
    """A minimal ChatML-like rendering used when a model ships no template (and by the byte tokenizer)."""
    parts = []
    for m in messages:
        if not isinstance(m, dict):
            raise ValueError("each message must be an object")
        parts.append(f"<|{m.get('role', 'user')}|>\n{_message_text(m.get('content'))}\n")
    parts.append("<|assistant|>\n")
    return "".join(parts)


class HFTokenizer:
    """A Hugging Face `tokenizer.json` read from a local directory or file; never downloads.

    The chat template comes from `tokenizer_config.json` beside it (rendered with jinja2, as
    `transformers` does); without one, `render_plain_chat` is used.
    """

    def __init__(self, path: str | Path) -> None:
        try:
            from tokenizers import Tokenizer as _RustTokenizer
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise RuntimeError(
                "--tokenizer needs the 'tokenizers' package: pip install 'kvroute[hf]'"
            ) from exc
        p = Path(path)
        tok_file = p / "tokenizer.json" if p.is_dir() else p
        if not tok_file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {tok_file}")
        self._tok = _RustTokenizer.from_file(str(tok_file))
        self.name = str(p)
        self._template: Any = None
        self._special: dict[str, str] = {}
        cfg_file = tok_file.parent / "tokenizer_config.json"
        if cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text())
            tmpl = cfg.get("chat_template")
            if isinstance(tmpl, list):  # named templates: take "default"
                tmpl = next((t.get("template") for t in tmpl if t.get("name") == "default"), None)
            for key in ("bos_token", "eos_token"):
                v = cfg.get(key)
                self._special[key] = v.get("content", "") if isinstance(v, dict) else (v or "")
            if tmpl:
                import jinja2
                from jinja2.sandbox import ImmutableSandboxedEnvironment

                env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

                def raise_exception(msg: str) -> None:
                    raise jinja2.TemplateError(msg)

                env.globals["raise_exception"] = raise_exception
                self._template = env.from_string(tmpl)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        if self._template is None:
            return self.encode(render_plain_chat(messages))
        text = self._template.render(messages=list(messages), add_generation_prompt=True, **self._special)
        return self.encode(text)

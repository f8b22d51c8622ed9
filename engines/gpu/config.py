"""Model and engine configuration for the GPU engine: named Llama-shaped presets and engine knobs."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelConfig:
    """Shapes of a Llama-architecture decoder.

    Invariants: ``num_heads % num_kv_heads == 0`` (GQA groups) and ``head_dim`` even (rotary halves).
    ``dtype`` is a torch dtype name ("bfloat16", "float16", "float32").
    """

    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 500000.0
    rms_eps: float = 1e-5
    max_position: int = 131072
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for rotary embeddings")

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def kv_bytes_per_token(self, dtype_bytes: int | None = None) -> int:
        """Bytes of K and V for one token over all layers."""
        b = dtype_bytes if dtype_bytes is not None else (4 if self.dtype == "float32" else 2)
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * b

    def param_count(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        qkv = h * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        per_layer = qkv + self.num_heads * self.head_dim * h + 3 * h * i + 2 * h
        return self.num_layers * per_layer + 2 * self.vocab_size * h + h

    def with_dtype(self, dtype: str) -> ModelConfig:
        return dataclasses.replace(self, dtype=dtype)


PRESETS: dict[str, ModelConfig] = {
    # CPU tests: a few thousand parameters' worth of real computation.
    "tiny": ModelConfig(
        "tiny",
        vocab_size=512,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        intermediate_size=128,
        max_position=8192,
        dtype="float32",
    ),
    # Llama-3-8B shapes (random weights unless a checkpoint is given).
    "llama3-8b": ModelConfig(
        "llama3-8b",
        vocab_size=128256,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=14336,
    ),
    # Llama-3.2-3B / 1B shapes: smaller models for fitting more engines or KV on one GPU.
    "llama3-3b": ModelConfig(
        "llama3-3b",
        vocab_size=128256,
        hidden_size=3072,
        num_layers=28,
        num_heads=24,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=8192,
    ),
    "llama3-1b": ModelConfig(
        "llama3-1b",
        vocab_size=128256,
        hidden_size=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        intermediate_size=8192,
    ),
}


def load_model_config(spec: str) -> ModelConfig:
    """A preset name, a JSON file of ModelConfig fields, or a Hugging Face ``config.json`` / its directory."""
    if spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"unknown model config {spec!r}: not a preset ({', '.join(PRESETS)}) nor a file")
    raw = json.loads(path.read_text())
    if "hidden_size" in raw and "num_attention_heads" in raw:  # Hugging Face LlamaConfig
        heads = raw["num_attention_heads"]
        return ModelConfig(
            name=raw.get("_name_or_path") or path.parent.name or "hf",
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads", heads),
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            intermediate_size=raw["intermediate_size"],
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            rms_eps=float(raw.get("rms_norm_eps", 1e-5)),
            max_position=int(raw.get("max_position_embeddings", 8192)),
            dtype=str(raw.get("torch_dtype", "bfloat16")),
        )
    return ModelConfig(**raw)


@dataclass(frozen=True)
class EngineConfig:
    """Knobs of one engine instance.

    ``num_pages``: KV pool size in pages; 0 means size it from ``kv_memory_fraction`` of free device memory.
    ``max_batch_tokens``: tokens per forward step (decodes plus prefill chunk), the chunked-prefill budget.
    ``max_running``: requests decoding at once; 0 disables the limit (pages still bound it).
    ``disaggregation_mode``: "prefill" engines lend a finished prompt's pages to the decode engine named by
    the request's bootstrap room; "decode" engines copy them in and decode
    (``kvroute.engines.gpu.bootstrap``).
    """

    page_size: int = 16
    num_pages: int = 0
    kv_memory_fraction: float = 0.8
    max_batch_tokens: int = 8192
    max_running: int = 256
    max_new_tokens_default: int = 128
    seed: int = 0
    device: str = "cpu"
    attention: str = "auto"  # "auto" | "torch" | "triton"
    model_path: str | None = None
    served_model_name: str = "kvroute-gpu"
    disaggregation_mode: str = "null"  # "null" | "prefill" | "decode" (SGLang's --disaggregation-mode)
    bootstrap_timeout_s: float = 30.0  # PD: how long a decode waits for its room; a prefill holds lent pages
    high_priority_stream: bool | None = None  # CUDA stream priority; None: high for decode engines only

    def __post_init__(self) -> None:
        if self.disaggregation_mode not in ("null", "prefill", "decode"):
            mode = self.disaggregation_mode
            raise ValueError(f"disaggregation_mode must be null, prefill or decode, not {mode}")

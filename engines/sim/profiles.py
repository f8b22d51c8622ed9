"""Named GPU cost profiles for the simulated engine, each with its source.

A profile gives the cost of one scheduler step from measured tables, interpolated piecewise
linearly between measured points (and extrapolated linearly past the last one):
`step_ms = overhead + linear(total tokens in the step) + sum(prefill_attn(new, prior) per chunk)
+ decode_attn(batch, mean context)`. See `engines/sim/README.md`.
"""

from __future__ import annotations

import json
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

PROFILE_DIR = Path(__file__).parent / "profiles"


def interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear y(x) through sorted points; linear extrapolation at both ends, never below 0."""
    if len(xs) == 1:
        return ys[0]
    i = bisect_left(xs, x)
    if i <= 0:
        i = 1
    elif i >= len(xs):
        i = len(xs) - 1
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    y = y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return max(y, 0.0)


@dataclass(frozen=True)
class Grid2D:
    """Measured costs on a (row, col) grid; rows may lack some columns. Rows interpolate through (0, 0)."""

    rows: tuple[float, ...]
    cols_per_row: tuple[tuple[float, ...], ...]
    vals_per_row: tuple[tuple[float, ...], ...]
    zero_row: bool

    @staticmethod
    def from_keys(table: dict[str, float], zero_row: bool) -> Grid2D:
        by_row: dict[int, list[tuple[int, float]]] = {}
        for key, ms in table.items():
            r, c = key.split("x")
            by_row.setdefault(int(r), []).append((int(c), float(ms)))
        rows = tuple(sorted(by_row))
        cols = tuple(tuple(float(c) for c, _ in sorted(by_row[r])) for r in rows)
        vals = tuple(tuple(v for _, v in sorted(by_row[r])) for r in rows)
        return Grid2D(tuple(float(r) for r in rows), cols, vals, zero_row)

    def __call__(self, row: float, col: float) -> float:
        per_row = [interp(c, v, col) for c, v in zip(self.cols_per_row, self.vals_per_row, strict=True)]
        xs, ys = list(self.rows), per_row
        if self.zero_row and row < xs[0]:
            return interp([0.0, xs[0]], [0.0, ys[0]], row)
        return interp(xs, ys, row)


@dataclass(frozen=True)
class GpuProfile:
    """Costs of one model on one GPU. Times in milliseconds of simulated (GPU) time."""

    name: str
    source: str
    model: str
    linear_tokens: tuple[float, ...]
    linear_ms: tuple[float, ...]
    prefill_attn: Grid2D
    """(new tokens N, prior tokens P) -> ms for one chunk of N tokens over P cached ones."""
    decode_attn: Grid2D
    """(batch B, context C per sequence) -> ms for B sequences decoding one token each."""
    kv_bytes_per_token: int
    max_total_tokens: int
    """KV pool size in tokens (SGLang's max_total_num_tokens)."""
    context_length: int = 131072
    max_running_requests: int = 1024
    chunked_prefill_size: int = 8192
    step_overhead_ms: float = 0.3
    """Scheduler/launch overhead per step, not in the kernel tables."""
    link_gbytes_per_s: float = 50.0
    """PD KV transfer bandwidth (GB/s), e.g. one 400 Gb/s RDMA NIC."""
    transfer_latency_ms: float = 1.0
    cost_scale: float = 1.0
    """Multiplies every cost: <1 makes a faster (test) GPU."""

    def linear(self, n_tokens: int) -> float:
        if n_tokens <= 0:
            return 0.0
        return interp(self.linear_tokens, self.linear_ms, n_tokens)

    def step_ms(self, chunks: Sequence[tuple[int, int]], decode_batch: int, decode_ctx_total: int) -> float:
        """Cost of one forward step: prefill `chunks` of (new, prior) tokens plus `decode_batch` decodes."""
        n_tokens = decode_batch + sum(n for n, _ in chunks)
        if n_tokens == 0:
            return 0.0
        ms = self.step_overhead_ms + self.linear(n_tokens)
        for n_new, n_prior in chunks:
            ms += self.prefill_attn(n_new, n_prior)
        if decode_batch:
            ms += self.decode_attn(decode_batch, decode_ctx_total / decode_batch)
        return ms * self.cost_scale

    def transfer_ms(self, n_tokens: int) -> float:
        """PD: time to move `n_tokens` of KV from the prefill to the decode server."""
        return self.transfer_latency_ms + n_tokens * self.kv_bytes_per_token / (self.link_gbytes_per_s * 1e6)


def load_measured(path: Path, name: str, **overrides: object) -> GpuProfile:
    """A profile from a `calibrate_gpu.py` JSON (see `/work/shared/data/gpu/README.md`)."""
    data = json.loads(path.read_text())
    lin = sorted((int(k), float(v)) for k, v in data["linear_ms"].items())
    prof = GpuProfile(
        name=name,
        source=f"{path.name}: {data.get('measured', '')} ({data.get('device', '')}, {data.get('model', '')})",
        model=str(data.get("model", "")),
        linear_tokens=tuple(float(k) for k, _ in lin),
        linear_ms=tuple(v for _, v in lin),
        prefill_attn=Grid2D.from_keys(data["prefill_attn_ms"], zero_row=True),
        decode_attn=Grid2D.from_keys(data["decode_attn_ms"], zero_row=False),
        # Llama-3-8B: 32 layers x 8 KV heads x 128 dims x (K, V) x 2 bytes (bf16).
        kv_bytes_per_token=32 * 8 * 128 * 2 * 2,
        # ~80 GB minus 16 GB of weights and activation/graph memory at mem_fraction 0.88: what
        # SGLang reports as max_total_num_tokens for Llama-3-8B on one H100 (order of 4e5).
        max_total_tokens=400_000,
    )
    return replace(prof, **overrides)  # type: ignore[arg-type]


def h100_llama3_8b() -> GpuProfile:
    return load_measured(PROFILE_DIR / "h100-llama3-8b.json", "h100-llama3-8b")


def tiny() -> GpuProfile:
    """For tests: H100 costs / 10, a KV pool of 8192 tokens, small chunks, 64 running requests."""
    return replace(
        h100_llama3_8b(),
        name="tiny",
        source="h100-llama3-8b scaled: costs x0.1, pool 8192 tokens (test profile)",
        cost_scale=0.1,
        max_total_tokens=8192,
        context_length=8192,
        max_running_requests=64,
        chunked_prefill_size=1024,
    )


PROFILES = {"h100-llama3-8b": h100_llama3_8b, "tiny": tiny}
"""Registry: name -> factory. `get_profile` also accepts a path to a calibration JSON."""


def get_profile(name_or_path: str) -> GpuProfile:
    if name_or_path in PROFILES:
        return PROFILES[name_or_path]()
    p = Path(name_or_path)
    if p.suffix == ".json" and p.exists():
        return load_measured(p, p.stem)
    raise ValueError(f"unknown profile {name_or_path!r}; known: {', '.join(PROFILES)} or a .json path")

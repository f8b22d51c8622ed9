"""Replay of the Mooncake FAST'25 request traces (kvcache-ai/Mooncake, Apache-2.0).

Each trace line is `{timestamp (ms), input_length, output_length, hash_ids}`; a hash id stands for a
512-token block, and two prompts sharing their first k ids share their first k*512 tokens. Here each
id becomes a deterministic block of 512 ASCII characters (one token each under the byte tokenizer),
the last block is cut to `input_length`, and timestamps are made relative to the slice's first request.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from kvroute.bench.workloads import Request, Workload, WorkloadError, block_text

TRACE_BLOCK_TOKENS = 512
DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DEFAULT_TRACE = DATA_DIR / "mooncake_conversation_trace.jsonl.gz"
"""The conversation trace (12,031 requests over one hour), gzipped, unchanged otherwise."""


def read_trace(path: str | Path = DEFAULT_TRACE) -> list[dict[str, Any]]:
    """All lines of a Mooncake trace file (plain or .gz JSON lines)."""
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError) as exc:
        raise WorkloadError(f"cannot read Mooncake trace {p}: {exc}") from exc
    for i, r in enumerate(rows):
        n = len(r.get("hash_ids", ()))
        if not (TRACE_BLOCK_TOKENS * (n - 1) < r.get("input_length", -1) <= TRACE_BLOCK_TOKENS * n):
            raise WorkloadError(f"{p}:{i + 1}: input_length does not fit its {n} hash ids")
    return rows


def load(
    path: str | Path = DEFAULT_TRACE,
    start: int = 0,
    count: int | None = 2000,
    rate_factor: float = 1.0,
    max_output_tokens: int | None = None,
    output_scale: float = 1.0,
    salt: int = 0,
) -> Workload:
    """A contiguous slice `[start, start+count)` of the trace as a workload.

    `rate_factor` > 1 replays faster (every gap divided by it). `output_scale` and `max_output_tokens`
    shrink generations (e.g. to keep a 2-core machine's streaming load bounded); both are reported.
    """
    rows = read_trace(path)
    if start < 0 or start >= len(rows):
        raise WorkloadError(f"start {start} outside the trace's {len(rows)} requests")
    sl = rows[start : start + count if count is not None else None]
    t0 = sl[0]["timestamp"]
    blocks: dict[int, str] = {}
    reqs = []
    for i, r in enumerate(sl):
        ids = r["hash_ids"]
        parts = []
        for h in ids:
            b = blocks.get(h)
            if b is None:
                b = blocks[h] = block_text(h, TRACE_BLOCK_TOKENS, salt)
            parts.append(b)
        text = "".join(parts)[: r["input_length"]]
        out = max(1, round(r["output_length"] * output_scale))
        if max_output_tokens is not None:
            out = min(out, max_output_tokens)
        reqs.append(
            Request(
                rid=f"mc{start + i}",
                arrival_s=(r["timestamp"] - t0) / 1000.0,
                text=text,
                output_tokens=out,
            )
        )
    params = {
        "trace": Path(path).name,
        "start": start,
        "count": len(sl),
        "max_output_tokens": max_output_tokens,
        "output_scale": output_scale,
    }
    wl = Workload("mooncake", tuple(reqs), params)
    return wl.with_rate(rate_factor) if rate_factor != 1.0 else wl

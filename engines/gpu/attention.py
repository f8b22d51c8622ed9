"""Attention over the paged KV pool for one forward step: metadata, a plain-torch backend and a Triton one.

A step's tokens are packed decodes first (one token each), then prefill chunks (``new_lens`` tokens each,
after ``prefix_lens`` tokens already in the pool). Both backends first write the step's K/V into the pool,
then attend through the page tables, so a prefill chunk sees its cached prefix and itself (causal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass
class StepMeta:
    """Where each token of the step reads and writes K/V. Lists mirror tensors for the torch backend."""

    page_size: int
    slots: torch.Tensor  # [T] int64 pool rows for the step's new K/V
    num_decode: int
    decode_pages: list[list[int]]
    decode_lens: list[int]  # context length including the new token
    decode_table: torch.Tensor  # [Bd, maxP] int32
    decode_lens_t: torch.Tensor  # [Bd] int32
    prefill_pages: list[list[int]]
    prefix_lens: list[int]
    new_lens: list[int]
    prefill_table: torch.Tensor  # [Bp, maxP] int32
    prefix_lens_t: torch.Tensor  # [Bp] int32
    new_lens_t: torch.Tensor  # [Bp] int32
    cu_q_t: torch.Tensor  # [Bp + 1] int32, offsets within the prefill part
    blk_req: torch.Tensor | None = None
    blk_start: torch.Tensor | None = None

    @property
    def max_decode_len(self) -> int:
        return max(self.decode_lens, default=0)


def _table(pages: list[list[int]], device: torch.device) -> torch.Tensor:
    width = max((len(p) for p in pages), default=0) or 1
    rows = [p + [0] * (width - len(p)) for p in pages] or [[0]]
    return torch.tensor(rows, dtype=torch.int32).to(device, non_blocking=True)


def build_meta(
    page_size: int,
    device: torch.device,
    decode_pages: list[list[int]],
    decode_lens: list[int],
    prefill_pages: list[list[int]],
    prefix_lens: list[int],
    new_lens: list[int],
    prefill_block_m: int | None = None,
) -> StepMeta:
    """Metadata for a step; ``prefill_block_m`` also builds the Triton prefill block map."""
    ps = page_size
    slots: list[int] = []
    for pages, n in zip(decode_pages, decode_lens, strict=True):
        t = n - 1
        slots.append(pages[t // ps] * ps + t % ps)
    for pages, p, n in zip(prefill_pages, prefix_lens, new_lens, strict=True):
        slots.extend(pages[t // ps] * ps + t % ps for t in range(p, p + n))
    cu = [0]
    for n in new_lens:
        cu.append(cu[-1] + n)
    meta = StepMeta(
        page_size=ps,
        slots=torch.tensor(slots, dtype=torch.int64).to(device, non_blocking=True),
        num_decode=len(decode_lens),
        decode_pages=decode_pages,
        decode_lens=decode_lens,
        decode_table=_table(decode_pages, device),
        decode_lens_t=torch.tensor(decode_lens, dtype=torch.int32).to(device, non_blocking=True),
        prefill_pages=prefill_pages,
        prefix_lens=prefix_lens,
        new_lens=new_lens,
        prefill_table=_table(prefill_pages, device),
        prefix_lens_t=torch.tensor(prefix_lens, dtype=torch.int32).to(device, non_blocking=True),
        new_lens_t=torch.tensor(new_lens, dtype=torch.int32).to(device, non_blocking=True),
        cu_q_t=torch.tensor(cu, dtype=torch.int32).to(device, non_blocking=True),
    )
    if prefill_block_m is not None and new_lens:
        from kvroute.engines.gpu.kernels import prefill_block_map

        meta.blk_req, meta.blk_start = prefill_block_map(new_lens, prefill_block_m, device, prefix_lens)
    return meta


class AttentionBackend(Protocol):
    """Writes the step's K/V for one layer, then attends. q ``[T, H, D]``, k/v ``[T, Hkv, D]``."""

    name: str

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: StepMeta,
    ) -> torch.Tensor: ...


def reference_extend(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pages: list[int],
    prefix_len: int,
    page_size: int,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One sequence's ``q`` ``[N, H, D]`` (positions ``prefix_len..``) over its pages, causal, in float32.

    Gathers K/V into contiguous tensors and calls ``scaled_dot_product_attention``: the ground truth the
    kernels are checked against.
    """
    n, nh, dim = q.shape
    total = prefix_len + n
    ps = page_size
    rows = torch.tensor(
        [pages[t // ps] * ps + t % ps for t in range(total)], dtype=torch.long, device=k_cache.device
    )
    k = k_cache.index_select(0, rows).float()
    v = v_cache.index_select(0, rows).float()
    group = nh // k.shape[1]
    k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [H, total, D]
    v = v.repeat_interleave(group, dim=1).transpose(0, 1)
    qpos = torch.arange(prefix_len, total, device=q.device)[:, None]
    mask = torch.arange(total, device=q.device)[None, :] <= qpos  # [N, total]
    o = F.scaled_dot_product_attention(
        q.float().transpose(0, 1), k, v, attn_mask=mask, scale=1.0 / math.sqrt(dim)
    )
    return o.transpose(0, 1).to(out_dtype or q.dtype)


class TorchAttention:
    """Plain torch: index_copy into the pool, then per-sequence gather + SDPA. The CPU path."""

    name = "torch"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: StepMeta,
    ) -> torch.Tensor:
        k_cache.index_copy_(0, meta.slots, k.to(k_cache.dtype))
        v_cache.index_copy_(0, meta.slots, v.to(v_cache.dtype))
        outs: list[torch.Tensor] = []
        for i, (pages, n) in enumerate(zip(meta.decode_pages, meta.decode_lens, strict=True)):
            outs.append(reference_extend(q[i : i + 1], k_cache, v_cache, pages, n - 1, meta.page_size))
        off = meta.num_decode
        for pages, p, n in zip(meta.prefill_pages, meta.prefix_lens, meta.new_lens, strict=True):
            outs.append(reference_extend(q[off : off + n], k_cache, v_cache, pages, p, meta.page_size))
            off += n
        return torch.cat(outs, 0) if outs else torch.empty_like(q)


class TritonAttention:
    """Our Triton kernels: store_kv, split-KV paged decode, paged prefill (see ``kernels.py``)."""

    name = "triton"

    def __init__(self) -> None:
        from kvroute.engines.gpu import kernels

        self._k = kernels
        self.decode_tuning = kernels.DecodeTuning()
        self.prefill_tuning = kernels.PrefillTuning()

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: StepMeta,
    ) -> torch.Tensor:
        kn = self._k
        kn.store_kv(k, v, k_cache, v_cache, meta.slots)
        out = torch.empty_like(q)
        nd = meta.num_decode
        if nd:
            kn.paged_decode(
                q[:nd],
                k_cache,
                v_cache,
                meta.decode_table,
                meta.decode_lens_t,
                meta.max_decode_len,
                meta.page_size,
                out=out[:nd],
                tuning=self.decode_tuning,
            )
        if meta.new_lens:
            assert meta.blk_req is not None and meta.blk_start is not None
            kn.paged_prefill(
                q[nd:],
                k_cache,
                v_cache,
                meta.prefill_table,
                meta.prefix_lens_t,
                meta.new_lens_t,
                meta.cu_q_t,
                meta.blk_req,
                meta.blk_start,
                meta.page_size,
                out=out[nd:],
                tuning=self.prefill_tuning,
            )
        return out


def make_backend(kind: str, device: torch.device) -> AttentionBackend:
    """ "auto": Triton on CUDA when importable, else torch."""
    if kind == "torch" or (kind == "auto" and device.type != "cuda"):
        return TorchAttention()
    try:
        return TritonAttention()
    except ImportError:
        if kind == "triton":
            raise
        return TorchAttention()

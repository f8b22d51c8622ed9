"""Triton kernels over the paged KV pool: store new K/V, paged decode attention (split-KV), paged prefill.

All three address K/V through a page table: token ``n`` of a sequence lives at pool row
``block_table[n // PAGE] * PAGE + n % PAGE``. GQA is handled by mapping query head ``h`` to KV head
``h // G``. Scores use exp2 with the log2(e) factor folded into the scale (one multiply per score).
Import needs ``triton``; callers check :func:`available` first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def available() -> bool:
    return True


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, stride_kt, stride_vt, ROW: tl.constexpr, BLOCK: tl.constexpr
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = offs < ROW
    k = tl.load(k_ptr + t.to(tl.int64) * stride_kt + offs, mask=m)
    v = tl.load(v_ptr + t.to(tl.int64) * stride_vt + offs, mask=m)
    tl.store(kc_ptr + slot * ROW + offs, k, mask=m)
    tl.store(vc_ptr + slot * ROW + offs, v, mask=m)


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
) -> None:
    """Write ``k``/``v`` ``[T, Hkv, D]`` into pool rows ``slots`` ``[T]`` of one layer's cache."""
    t = k.shape[0]
    if t == 0:
        return
    row = k.shape[1] * k.shape[2]
    k2 = k.reshape(t, row)
    v2 = v.reshape(t, row)
    if k2.stride(1) != 1:
        k2 = k2.contiguous()
    if v2.stride(1) != 1:
        v2 = v2.contiguous()
    _store_kv_kernel[(t,)](
        k2,
        v2,
        k_cache,
        v_cache,
        slots,
        k2.stride(0),
        v2.stride(0),
        ROW=row,
        BLOCK=triton.next_power_of_2(row),
    )


@triton.jit
def _decode_partial_kernel(
    q_ptr,
    kc_ptr,
    vc_ptr,
    bt_ptr,
    len_ptr,
    o_ptr,
    lse_ptr,
    stride_qb,
    stride_qh,
    stride_cs,
    stride_ch,
    stride_btb,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    qk_scale,
    split_len,
    PAGE: tl.constexpr,
    G: tl.constexpr,
    BLOCK_G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    seq_len = tl.load(len_ptr + b)
    start = sp * split_len
    end = tl.minimum(seq_len, start + split_len)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    gm = g < G
    heads = kvh * G + g
    q = tl.load(
        q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=gm[:, None],
        other=0.0,
    )
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nm = n < end
        page = tl.load(bt_row + n // PAGE, mask=nm, other=0).to(tl.int64)
        row = (page * PAGE + n % PAGE) * stride_cs + kvh * stride_ch
        k = tl.load(kc_ptr + row[:, None] + d[None, :], mask=nm[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(nm[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vc_ptr + row[:, None] + d[None, :], mask=nm[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    nonempty = l_i > 0
    safe_l = tl.where(nonempty, l_i, 1.0)
    out = acc / safe_l[:, None]
    lse = tl.where(nonempty, m_i + tl.math.log2(safe_l), float("-inf"))
    o_off = b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + sp * stride_os + d[None, :]
    tl.store(o_ptr + o_off, out, mask=gm[:, None])
    tl.store(lse_ptr + b.to(tl.int64) * stride_lb + heads * stride_lh + sp, lse, mask=gm)


@triton.jit
def _decode_reduce_kernel(
    o_part_ptr,
    lse_ptr,
    out_ptr,
    num_splits,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, D)
    sm = s < num_splits
    lse = tl.load(lse_ptr + b.to(tl.int64) * stride_lb + h * stride_lh + s, mask=sm, other=float("-inf"))
    mx = tl.max(lse, 0)
    w = tl.math.exp2(lse - mx)
    w = tl.where(sm, w, 0.0)
    part = tl.load(
        o_part_ptr + b.to(tl.int64) * stride_pb + h * stride_ph + s[:, None] * stride_ps + d[None, :],
        mask=sm[:, None],
        other=0.0,
    )
    out = tl.sum(part * w[:, None], 0) / tl.sum(w, 0)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


@dataclass(frozen=True)
class DecodeTuning:
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    target_programs: int = 1056  # ~8 waves' worth of CTAs on 132 SMs, to hide the ragged tail


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    max_len: int,
    page_size: int,
    out: torch.Tensor | None = None,
    tuning: DecodeTuning = DecodeTuning(),
) -> torch.Tensor:
    """One query token per sequence over its paged K/V. ``q`` ``[B, H, D]``; returns ``[B, H, D]``."""
    bsz, nh, dim = q.shape
    nkv = k_cache.shape[1]
    group = nh // nkv
    if out is None:
        out = torch.empty_like(q)
    if bsz == 0:
        return out
    bn = tuning.block_n
    max_blocks = max(1, triton.cdiv(max_len, bn))
    splits = max(1, min(max_blocks, triton.cdiv(tuning.target_programs, bsz * nkv), 64))
    split_len = triton.cdiv(max_blocks, splits) * bn
    splits = triton.cdiv(max(max_len, 1), split_len)
    o_part = torch.empty((bsz, nh, splits, dim), dtype=torch.float32, device=q.device)
    lse = torch.empty((bsz, nh, splits), dtype=torch.float32, device=q.device)
    qk_scale = LOG2E / math.sqrt(dim)
    _decode_partial_kernel[(bsz, nkv, splits)](
        q,
        k_cache,
        v_cache,
        block_table,
        seq_lens,
        o_part,
        lse,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        block_table.stride(0),
        o_part.stride(0),
        o_part.stride(1),
        o_part.stride(2),
        lse.stride(0),
        lse.stride(1),
        qk_scale,
        split_len,
        PAGE=page_size,
        G=group,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        D=dim,
        BLOCK_N=bn,
        num_warps=tuning.num_warps,
        num_stages=tuning.num_stages,
    )
    _decode_reduce_kernel[(bsz, nh)](
        o_part,
        lse,
        out,
        splits,
        o_part.stride(0),
        o_part.stride(1),
        o_part.stride(2),
        lse.stride(0),
        lse.stride(1),
        out.stride(0),
        out.stride(1),
        D=dim,
        BLOCK_S=max(2, triton.next_power_of_2(splits)),
        num_warps=4,
    )
    return out


@triton.jit
def _prefill_kernel(
    q_ptr,
    kc_ptr,
    vc_ptr,
    o_ptr,
    bt_ptr,
    prefix_ptr,
    newlen_ptr,
    cuq_ptr,
    blk_req_ptr,
    blk_start_ptr,
    stride_qt,
    stride_qh,
    stride_cs,
    stride_ch,
    stride_btb,
    stride_ot,
    stride_oh,
    qk_scale,
    PAGE: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    h = tl.program_id(0)  # heads vary fastest: a query block's heads run together and share K/V in L2
    pid = tl.program_id(1)
    kvh = h // G
    req = tl.load(blk_req_ptr + pid)
    qs = tl.load(blk_start_ptr + pid)
    prefix = tl.load(prefix_ptr + req)
    n_new = tl.load(newlen_ptr + req)
    q_off = tl.load(cuq_ptr + req).to(tl.int64)
    m = qs + tl.arange(0, BLOCK_M)
    mm = m < n_new
    d = tl.arange(0, D)
    q = tl.load(
        q_ptr + (q_off + m)[:, None] * stride_qt + h * stride_qh + d[None, :], mask=mm[:, None], other=0.0
    )
    qpos = prefix + m
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    bt_row = bt_ptr + req.to(tl.int64) * stride_btb
    kv_end = prefix + tl.minimum(qs + BLOCK_M, n_new)
    # Keys below every query of the block need no causal mask.
    full_end = ((prefix + qs + 1) // BLOCK_N) * BLOCK_N
    full_end = tl.minimum(full_end, kv_end)
    for n0 in range(0, full_end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        page = tl.load(bt_row + n // PAGE).to(tl.int64)
        row = (page * PAGE + n % PAGE) * stride_cs + kvh * stride_ch
        k = tl.load(kc_ptr + row[:, None] + d[None, :])
        s = tl.dot(q, tl.trans(k)) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vc_ptr + row[:, None] + d[None, :])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    for n0 in range(full_end, kv_end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nm = n < kv_end
        page = tl.load(bt_row + n // PAGE, mask=nm, other=0).to(tl.int64)
        row = (page * PAGE + n % PAGE) * stride_cs + kvh * stride_ch
        k = tl.load(kc_ptr + row[:, None] + d[None, :], mask=nm[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where((n[None, :] <= qpos[:, None]) & nm[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vc_ptr + row[:, None] + d[None, :], mask=nm[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(
        o_ptr + (q_off + m)[:, None] * stride_ot + h * stride_oh + d[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=mm[:, None],
    )


@dataclass(frozen=True)
class PrefillTuning:
    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 3


def prefill_block_map(
    new_lens: list[int], block_m: int, device: torch.device, prefix_lens: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query block: (request index, first new-token index), longest blocks first (they launch first,
    so the short ones fill the tail). Built on the host, one copy to the device."""
    blocks = [(i, s) for i, n in enumerate(new_lens) for s in range(0, n, block_m)]
    if prefix_lens is not None:
        blocks.sort(key=lambda b: -(prefix_lens[b[0]] + b[1]))
    reqs = [b[0] for b in blocks]
    starts = [b[1] for b in blocks]
    both = torch.tensor([reqs, starts], dtype=torch.int32).to(device, non_blocking=True)
    return both[0], both[1]


def paged_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    prefix_lens: torch.Tensor,
    new_lens: torch.Tensor,
    cu_q: torch.Tensor,
    blk_req: torch.Tensor,
    blk_start: torch.Tensor,
    page_size: int,
    out: torch.Tensor | None = None,
    tuning: PrefillTuning = PrefillTuning(),
) -> torch.Tensor:
    """New tokens (``q`` ``[T, H, D]``, packed by ``cu_q``) over cached pages plus themselves, causal.

    Their own K/V must already be in the pool (``store_kv`` first). ``blk_req``/``blk_start`` come from
    :func:`prefill_block_map` with the same ``tuning.block_m``.
    """
    t, nh, dim = q.shape
    nkv = k_cache.shape[1]
    if out is None:
        out = torch.empty_like(q)
    nblocks = blk_req.shape[0]
    if t == 0 or nblocks == 0:
        return out
    _prefill_kernel[(nh, nblocks)](
        q,
        k_cache,
        v_cache,
        out,
        block_table,
        prefix_lens,
        new_lens,
        cu_q,
        blk_req,
        blk_start,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        block_table.stride(0),
        out.stride(0),
        out.stride(1),
        LOG2E / math.sqrt(dim),
        PAGE=page_size,
        G=nh // nkv,
        D=dim,
        BLOCK_M=tuning.block_m,
        BLOCK_N=tuning.block_n,
        num_warps=tuning.num_warps,
        num_stages=tuning.num_stages,
    )
    return out


# ---- fused elementwise kernels of the model (fewer launches: decode steps are launch-bound) --------
@triton.jit
def _add_rms_norm_kernel(
    x_ptr,
    d_ptr,
    w_ptr,
    out_ptr,
    n,
    eps,
    stride_x,
    stride_d,
    stride_o,
    HAS_DELTA: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + row * stride_x + offs, mask=m, other=0.0)
    if HAS_DELTA:
        x = x + tl.load(d_ptr + row * stride_d + offs, mask=m, other=0.0)
        tl.store(x_ptr + row * stride_x + offs, x, mask=m)
    xf = x.to(tl.float32)
    r = tl.math.rsqrt(tl.sum(xf * xf, 0) / n + eps)
    w = tl.load(w_ptr + offs, mask=m, other=0.0)
    y = (xf * r).to(x_ptr.dtype.element_ty) * w
    tl.store(out_ptr + row * stride_o + offs, y, mask=m)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, w: torch.Tensor, eps: float) -> torch.Tensor:
    """``x += delta`` in place (when given), then RMSNorm(x) * w, in one pass. x ``[T, hidden]``."""
    t, n = x.shape
    out = torch.empty_like(x)
    if t == 0:
        return out
    d = delta if delta is not None else x
    _add_rms_norm_kernel[(t,)](
        x,
        d,
        w,
        out,
        n,
        eps,
        x.stride(0),
        d.stride(0),
        out.stride(0),
        HAS_DELTA=delta is not None,
        BLOCK=triton.next_power_of_2(n),
        num_warps=8 if n >= 4096 else 4,
    )
    return out


@triton.jit
def _rope_kernel(
    qk_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    stride_t,
    stride_h,
    stride_c,
    n_heads,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    j = tl.arange(0, HALF)
    c = tl.load(cos_ptr + pos * stride_c + j)[None, :]
    s = tl.load(sin_ptr + pos * stride_c + j)[None, :]
    for h0 in range(0, n_heads, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        hm = (h < n_heads)[:, None]
        base = qk_ptr + t.to(tl.int64) * stride_t + h[:, None] * stride_h + j[None, :]
        x1 = tl.load(base, mask=hm, other=0.0).to(tl.float32)
        x2 = tl.load(base + HALF, mask=hm, other=0.0).to(tl.float32)
        tl.store(base, (x1 * c - x2 * s).to(qk_ptr.dtype.element_ty), mask=hm)
        tl.store(base + HALF, (x2 * c + x1 * s).to(qk_ptr.dtype.element_ty), mask=hm)


def rope_(qk: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate-half RoPE in place on ``qk`` ``[T, heads, D]`` (q and k heads side by side, any row stride)."""
    t, nh, dim = qk.shape
    if t == 0:
        return
    assert qk.stride(2) == 1 and cos.stride(1) == 1
    _rope_kernel[(t,)](
        qk,
        positions,
        cos,
        sin,
        qk.stride(0),
        qk.stride(1),
        cos.stride(0),
        nh,
        HALF=dim // 2,
        BLOCK_H=min(16, triton.next_power_of_2(nh)),
        num_warps=4,
    )


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, n, stride_g, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    g = tl.load(gu_ptr + row * stride_g + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_g + n + offs, mask=m, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=m)


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """SwiGLU: silu(gate) * up for ``gu`` = [gate | up] ``[T, 2I]``; returns ``[T, I]``."""
    t, two_i = gu.shape
    n = two_i // 2
    out = torch.empty((t, n), dtype=gu.dtype, device=gu.device)
    if t == 0:
        return out
    block = 1024
    _silu_mul_kernel[(t, triton.cdiv(n, block))](
        gu, out, n, gu.stride(0), out.stride(0), BLOCK=block, num_warps=4
    )
    return out


# ---- KV transfer (PD disaggregation) ---------------------------------------------------------------
@triton.jit
def _copy_pages_kernel(
    src_k_ptr,
    dst_k_ptr,
    src_v_delta,
    dst_v_delta,
    src_pages_ptr,
    dst_pages_ptr,
    n_pages,
    src_layer_stride,
    dst_layer_stride,
    CHUNK: tl.constexpr,
    PAGES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program: ``PAGES`` pages of one layer of K (axis 2 = 0) or V (1); a page is ``CHUNK`` contiguous
    elements (page_size x Hkv x D). V is reached from K's pointer by an element offset (same dtype)."""
    pid = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    kv = tl.program_id(2).to(tl.int64)
    idx = pid * PAGES + tl.arange(0, PAGES)
    pm = idx < n_pages
    sp = tl.load(src_pages_ptr + idx, mask=pm, other=0).to(tl.int64)
    dp = tl.load(dst_pages_ptr + idx, mask=pm, other=0).to(tl.int64)
    src = src_k_ptr + kv * src_v_delta + layer * src_layer_stride + sp[:, None] * CHUNK
    dst = dst_k_ptr + kv * dst_v_delta + layer * dst_layer_stride + dp[:, None] * CHUNK
    for off in range(0, CHUNK, BLOCK):
        o = off + tl.arange(0, BLOCK)[None, :]
        if CHUNK % BLOCK == 0:
            m = pm[:, None]  # constant along the row: loads stay 16 bytes wide
        else:
            m = pm[:, None] & (o < CHUNK)
        tl.store(dst + o, tl.load(src + o, mask=m), mask=m)


def copy_kv_pages(
    src_k: torch.Tensor,
    src_v: torch.Tensor,
    dst_k: torch.Tensor,
    dst_v: torch.Tensor,
    src_pages: torch.Tensor,
    dst_pages: torch.Tensor,
    page_size: int,
) -> None:
    """Gather pages ``src_pages`` of the source K and V and scatter them to ``dst_pages``, every layer, in one
    launch.

    Pools: ``[layers, pages * page_size, Hkv, D]``, one dtype and row shape, contiguous (rows of a page are
    contiguous within a layer); ``src_pages``/``dst_pages``: int32 ``[n]`` on the device.
    """
    n = src_pages.shape[0]
    if n == 0:
        return
    for a, b in ((src_k, src_v), (dst_k, dst_v), (src_k, dst_k)):
        if a.dtype != b.dtype or a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]:
            raise ValueError(f"pools differ: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}")
    if src_k.stride() != src_v.stride() or dst_k.stride() != dst_v.stride():
        raise ValueError("K and V of a pool must share one layout")
    if not all(t.is_contiguous() for t in (src_k, src_v, dst_k, dst_v)):
        raise ValueError("KV pools must be contiguous")
    es = src_k.element_size()
    src_delta, dst_delta = src_v.data_ptr() - src_k.data_ptr(), dst_v.data_ptr() - dst_k.data_ptr()
    if src_delta % es or dst_delta % es:
        raise ValueError("K and V buffers are not element-aligned to each other")
    chunk = page_size * src_k.shape[2] * src_k.shape[3]
    # About 8k elements (16 KB of bf16) per iteration: several small pages a program, or loops over big ones.
    pages = triton.next_power_of_2(max(2, min(16, 8192 // chunk)))
    block = min(triton.next_power_of_2(chunk), max(8192 // pages, 1))
    _copy_pages_kernel[(triton.cdiv(n, pages), src_k.shape[0], 2)](
        src_k,
        dst_k,
        src_delta // es,
        dst_delta // es,
        src_pages,
        dst_pages,
        n,
        src_k.stride(0),
        dst_k.stride(0),
        CHUNK=chunk,
        PAGES=pages,
        BLOCK=block,
        num_warps=8,
    )

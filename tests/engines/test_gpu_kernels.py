"""Triton kernels vs a float32 reference (contiguous K/V through scaled_dot_product_attention), on CUDA.

Random inputs, several head layouts (GQA groups 1, 4, 8), page sizes (1, 16, 64), ragged lengths, pages
scattered through the pool, outputs poisoned with NaN first so an unwritten element fails.
"""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

SHAPES = [(32, 8, 128), (8, 8, 64), (16, 2, 128), (8, 1, 64)]  # (query heads, KV heads, head dim)
PAGE_SIZES = [1, 16, 64]


def _pool(
    nkv: int, dim: int, num_pages: int, ps: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.randn(num_pages * ps, nkv, dim, device="cuda", dtype=dtype)
    return k, torch.randn_like(k)


def _pages(rng: random.Random, lengths: list[int], ps: int, num_pages: int) -> list[list[int]]:
    perm = list(range(num_pages))
    rng.shuffle(perm)
    it = iter(perm)
    return [[next(it) for _ in range(-(-n // ps))] for n in lengths]


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "unwritten or NaN output"
    return float((out.float() - ref.float()).norm() / ref.float().norm())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ps", PAGE_SIZES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_paged_decode_matches_reference(shape: tuple[int, int, int], ps: int, dtype: str) -> None:
    from kvroute.engines.gpu import kernels
    from kvroute.engines.gpu.attention import build_meta, reference_extend

    nh, nkv, dim = shape
    dt = getattr(torch, dtype)
    rng = random.Random(hash((shape, ps, dtype)))
    torch.manual_seed(rng.randrange(1 << 30))
    lengths = [1, 2, ps, ps + 1, 63, 300, 1000, rng.randint(1, 3000), 4097]
    total_pages = sum(-(-n // ps) for n in lengths) + 7
    kc, vc = _pool(nkv, dim, total_pages, ps, dt)
    pages = _pages(rng, lengths, ps, total_pages)
    meta = build_meta(ps, torch.device("cuda"), pages, lengths, [], [], [])
    q = torch.randn(len(lengths), nh, dim, device="cuda", dtype=dt)
    for tuning in (kernels.DecodeTuning(), kernels.DecodeTuning(block_n=32, target_programs=8)):
        out = torch.full_like(q, float("nan"))
        kernels.paged_decode(
            q, kc, vc, meta.decode_table, meta.decode_lens_t, max(lengths), ps, out=out, tuning=tuning
        )
        for i, (pg, n) in enumerate(zip(pages, lengths, strict=True)):
            ref = reference_extend(q[i : i + 1], kc, vc, pg, n - 1, ps, out_dtype=torch.float32)
            assert _rel(out[i : i + 1], ref) < 1e-2, (i, n, tuning)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ps", PAGE_SIZES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_store_and_prefill_match_reference(shape: tuple[int, int, int], ps: int, dtype: str) -> None:
    from kvroute.engines.gpu import kernels
    from kvroute.engines.gpu.attention import build_meta, reference_extend

    nh, nkv, dim = shape
    dt = getattr(torch, dtype)
    rng = random.Random(hash((shape, ps, dtype, "prefill")))
    torch.manual_seed(rng.randrange(1 << 30))
    # (cached prefix, new tokens): cold, warm, unaligned prefix, single token, long ragged.
    reqs = [(0, 1), (0, 37), (ps, 5), (3 * ps + 1, 130), (500, 1), (0, 700), (1000, rng.randint(1, 400))]
    total_pages = sum(-(-(p + n) // ps) for p, n in reqs) + 5
    kc, vc = _pool(nkv, dim, total_pages, ps, dt)
    pages = _pages(rng, [p + n for p, n in reqs], ps, total_pages)
    t = sum(n for _, n in reqs)
    q = torch.randn(t, nh, dim, device="cuda", dtype=dt)
    k = torch.randn(t, nkv, dim, device="cuda", dtype=dt)
    v = torch.randn_like(k)
    for tuning in (kernels.PrefillTuning(), kernels.PrefillTuning(64, 32, 4, 2)):
        meta = build_meta(
            ps,
            torch.device("cuda"),
            [],
            [],
            pages,
            [p for p, _ in reqs],
            [n for _, n in reqs],
            prefill_block_m=tuning.block_m,
        )
        kernels.store_kv(k, v, kc, vc, meta.slots)
        assert torch.equal(kc[meta.slots], k) and torch.equal(vc[meta.slots], v)
        out = torch.full_like(q, float("nan"))
        assert meta.blk_req is not None and meta.blk_start is not None
        kernels.paged_prefill(
            q,
            kc,
            vc,
            meta.prefill_table,
            meta.prefix_lens_t,
            meta.new_lens_t,
            meta.cu_q_t,
            meta.blk_req,
            meta.blk_start,
            ps,
            out=out,
            tuning=tuning,
        )
        off = 0
        for pg, (p, n) in zip(pages, reqs, strict=True):
            ref = reference_extend(q[off : off + n], kc, vc, pg, p, ps, out_dtype=torch.float32)
            assert _rel(out[off : off + n], ref) < 1e-2, (p, n, tuning)
            off += n


def test_mixed_step_backends_agree() -> None:
    """A decode + prefill step through TritonAttention equals TorchAttention (same pool, same inputs)."""
    from kvroute.engines.gpu.attention import TorchAttention, TritonAttention, build_meta

    torch.manual_seed(1)
    nh, nkv, dim, ps = 32, 8, 128, 16
    kc, vc = _pool(nkv, dim, 200, ps, torch.bfloat16)
    dec_pages, dec_lens = [[3, 4, 5], [9]], [40, 7]
    pre_pages, pre_prefix, pre_new = [[20, 21, 22, 23], [40, 41]], [16, 0], [40, 20]
    t = len(dec_lens) + sum(pre_new)
    q = torch.randn(t, nh, dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(t, nkv, dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    tri = TritonAttention()
    meta = build_meta(
        ps,
        torch.device("cuda"),
        dec_pages,
        dec_lens,
        pre_pages,
        pre_prefix,
        pre_new,
        prefill_block_m=tri.prefill_tuning.block_m,
    )
    kc2, vc2 = kc.clone(), vc.clone()
    a = tri.forward(q, k, v, kc, vc, meta)
    b = TorchAttention().forward(q, k, v, kc2, vc2, meta)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    assert _rel(a, b) < 1e-2


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_fused_elementwise_kernels_match_torch(dtype: str) -> None:
    from kvroute.engines.gpu import kernels
    from kvroute.engines.gpu.model import apply_rope, rms_norm

    dt = getattr(torch, dtype)
    tol = 2e-2 if dt == torch.bfloat16 else 1e-5
    torch.manual_seed(3)
    for t, n in [(1, 4096), (37, 2048), (300, 64)]:
        x = torch.randn(t, n, device="cuda", dtype=dt)
        d = torch.randn_like(x)
        w = torch.rand(n, device="cuda", dtype=dt) + 0.5
        want_x = x + d
        want = rms_norm(want_x, w, 1e-5)
        got = kernels.add_rms_norm(x, d, w, 1e-5)
        assert torch.allclose(x, want_x) and _rel(got, want) < tol
        assert _rel(kernels.add_rms_norm(x, None, w, 1e-5), rms_norm(x, w, 1e-5)) < tol
        gu = torch.randn(t, 2 * n, device="cuda", dtype=dt)
        g, u = gu.chunk(2, -1)
        assert _rel(kernels.silu_mul(gu), torch.nn.functional.silu(g.float()) * u.float()) < tol
    nh, nkv, dim = 32, 8, 128
    qkv = torch.randn(50, nh + 2 * nkv, dim, device="cuda", dtype=dt)
    pos = torch.randint(0, 4000, (50,), device="cuda")
    half = dim // 2
    inv = 1.0 / (500000.0 ** (torch.arange(half, device="cuda", dtype=torch.float32) / half))
    ang = torch.arange(4096, device="cuda", dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = ang.cos(), ang.sin()
    want = apply_rope(qkv[:, : nh + nkv].clone(), cos[pos][:, None], sin[pos][:, None])
    v_before = qkv[:, nh + nkv :].clone()
    kernels.rope_(qkv[:, : nh + nkv], pos, cos, sin)
    assert _rel(qkv[:, : nh + nkv], want) < tol
    assert torch.equal(qkv[:, nh + nkv :], v_before)  # V untouched


def test_fused_model_matches_plain_torch_model() -> None:
    """Whole forward (prefill then decode) with Triton kernels vs the plain torch path, same weights."""
    import dataclasses

    from kvroute.engines.gpu.attention import TorchAttention, TritonAttention, build_meta
    from kvroute.engines.gpu.config import PRESETS
    from kvroute.engines.gpu.kv_pool import KVPool
    from kvroute.engines.gpu.model import LlamaModel, LlamaWeights

    cfg = dataclasses.replace(PRESETS["llama3-1b"], num_layers=2, vocab_size=1000, dtype="float32")
    w = LlamaWeights.random(cfg, "cuda", 0)
    ps = 16

    def run(model: LlamaModel) -> list[torch.Tensor]:
        pool = KVPool(cfg, 64, ps, "cuda", torch.float32)
        pool.k.zero_()
        pool.v.zero_()
        bm = model.attn.prefill_tuning.block_m if isinstance(model.attn, TritonAttention) else None
        pages = [list(range(0, 20)), list(range(20, 40))]
        meta = build_meta(ps, torch.device("cuda"), [], [], pages, [0, 0], [130, 7], prefill_block_m=bm)
        ids = torch.randint(0, 1000, (137,), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        pos = torch.tensor(list(range(130)) + list(range(7)), device="cuda")
        a = model.forward(ids, pos, meta, pool.k, pool.v, torch.tensor([129, 136], device="cuda"))
        meta = build_meta(ps, torch.device("cuda"), pages, [131, 8], [], [], [], prefill_block_m=bm)
        b = model.forward(
            torch.tensor([5, 6], device="cuda"),
            torch.tensor([130, 7], device="cuda"),
            meta,
            pool.k,
            pool.v,
            torch.tensor([0, 1], device="cuda"),
        )
        return [a, b]

    for x, y in zip(run(LlamaModel(w, TorchAttention())), run(LlamaModel(w, TritonAttention())), strict=True):
        assert _rel(y, x) < 1e-2

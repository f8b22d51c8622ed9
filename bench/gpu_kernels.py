"""Kernel benchmark on CUDA: paged decode bandwidth vs device copy bandwidth, paged prefill vs SDPA.

    python3 bench/gpu_kernels.py [--quick]       # writes gpu_kernels.json under $OUT (or /tmp/out)

Decode: 64 sequences x 4096 context, Llama-3-8B attention shapes (32 query / 8 KV heads of 128, bf16), one
layer, pages scattered at random through the pool; bytes = K + V read once. Target: >= 70% of the measured
device-to-device copy bandwidth (bytes read + written). Prefill: N new tokens over P cached ones (causal),
ours through the page table vs torch ``scaled_dot_product_attention`` on contiguous K/V (GQA, as in
``calibrate_gpu.py``). Target: ours <= 1.5x SDPA's time. Medians of ``triton.testing.do_bench``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvroute.engines.gpu import kernels  # noqa: E402
from kvroute.engines.gpu.attention import build_meta, reference_extend  # noqa: E402

NH, NKV, HD = 32, 8, 128
DT = torch.bfloat16


def bench(fn: object) -> float:
    return float(do_bench(fn, warmup=50, rep=200, return_mode="median"))  # type: ignore[arg-type]


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 2 GiB device-to-device copy."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.int16, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = bench(functools.partial(dst.copy_, src))
    return 2 * 2 * n / (ms * 1e-3)


def scattered_pages(lengths: list[int], ps: int, rng: random.Random) -> tuple[list[list[int]], int]:
    total = sum(-(-n // ps) for n in lengths)
    perm = list(range(total))
    rng.shuffle(perm)
    it = iter(perm)
    return [[next(it) for _ in range(-(-n // ps))] for n in lengths], total


def decode_bench(copy_bw: float, quick: bool) -> dict[str, object]:
    rng = random.Random(0)
    b, ctx = 64, 4096
    kv_bytes = 2 * b * ctx * NKV * HD * DT.itemsize
    out: dict[str, object] = {"batch": b, "context": ctx, "kv_bytes": kv_bytes, "runs": []}
    tunings = [kernels.DecodeTuning()]
    if not quick:
        for bn in (32, 64, 128):
            for w in (4, 8):
                for st in (2, 3):
                    for tp in (1056, 2112):
                        t = kernels.DecodeTuning(bn, w, st, tp)
                        if t != tunings[0]:
                            tunings.append(t)
    for ps in (16, 64, 1) if not quick else (16,):
        pages, total = scattered_pages([ctx] * b, ps, rng)
        kc = torch.randn(total * ps, NKV, HD, device="cuda", dtype=DT)
        vc = torch.randn_like(kc)
        meta = build_meta(ps, torch.device("cuda"), pages, [ctx] * b, [], [], [])
        q = torch.randn(b, NH, HD, device="cuda", dtype=DT)
        o = torch.empty_like(q)
        ref = reference_extend(q[:1], kc, vc, pages[0], ctx - 1, ps, out_dtype=torch.float32)
        for t in tunings if ps == 16 else tunings[:1]:
            try:
                fn = functools.partial(
                    kernels.paged_decode,
                    q,
                    kc,
                    vc,
                    meta.decode_table,
                    meta.decode_lens_t,
                    ctx,
                    ps,
                    out=o,
                    tuning=t,
                )
                fn()
                err = float((o[:1].float() - ref).norm() / ref.norm())
                ms = bench(fn)
            except Exception as exc:  # a tuning the compiler rejects (too much shared memory, ...)
                out["runs"].append({"page_size": ps, "tuning": t.__dict__, "error": repr(exc)[:200]})  # type: ignore[union-attr]
                continue
            bw = kv_bytes / (ms * 1e-3)
            out["runs"].append(
                {
                    "page_size": ps,
                    "tuning": t.__dict__,
                    "ms": ms,
                    "bytes_per_s": bw,  # type: ignore[union-attr]
                    "fraction_of_copy": bw / copy_bw,
                    "rel_err": err,
                }
            )
        # The same attention through SDPA on contiguous K/V (the profile's decode measurement).
        if ps == 16:
            qs = q[:, :, None, :].contiguous()
            ks = torch.randn(b, NKV, ctx, HD, device="cuda", dtype=DT)
            vs = torch.randn_like(ks)
            ms = bench(functools.partial(F.scaled_dot_product_attention, qs, ks, vs, enable_gqa=True))
            out["sdpa_contiguous_ms"] = ms
            out["sdpa_fraction_of_copy"] = kv_bytes / (ms * 1e-3) / copy_bw
    return out


def prefill_bench(quick: bool) -> dict[str, object]:
    from torch.nn.attention.bias import causal_lower_right

    rng = random.Random(1)
    shapes = [(512, 0), (2048, 0), (8192, 0), (512, 2048), (2048, 2048), (2048, 8192), (8192, 2048)]
    if quick:
        shapes = [(2048, 0), (2048, 2048)]
    tunings = [kernels.PrefillTuning()]
    if not quick:
        tunings += [
            kernels.PrefillTuning(*c)
            for c in [
                (128, 128, 8, 3),
                (64, 64, 4, 3),
                (128, 64, 4, 3),
                (128, 32, 4, 4),
                (64, 128, 8, 3),
                (128, 64, 8, 4),
                (128, 64, 8, 2),
                (64, 64, 4, 4),
            ]
        ]
    ps = 16
    rows = []
    for n, p in shapes:
        pages, total = scattered_pages([p + n], ps, rng)
        kc = torch.randn(total * ps, NKV, HD, device="cuda", dtype=DT)
        vc = torch.randn_like(kc)
        q = torch.randn(n, NH, HD, device="cuda", dtype=DT)
        o = torch.empty_like(q)
        flops = 4 * NH * HD * n * (p + (n + 1) / 2)
        # SDPA on contiguous K/V holding the same values.
        rows_idx = torch.tensor([pages[0][t // ps] * ps + t % ps for t in range(p + n)], device="cuda")
        ks = kc.index_select(0, rows_idx).transpose(0, 1)[None].contiguous()
        vs = vc.index_select(0, rows_idx).transpose(0, 1)[None].contiguous()
        qs = q.transpose(0, 1)[None].contiguous()
        if p == 0:
            sd = functools.partial(
                F.scaled_dot_product_attention, qs, ks, vs, is_causal=True, enable_gqa=True
            )
        else:
            sd = functools.partial(
                F.scaled_dot_product_attention,
                qs,
                ks,
                vs,
                attn_mask=causal_lower_right(n, p + n),
                enable_gqa=True,
            )
        sdpa_ms = bench(sd)
        ref = sd()[0].transpose(0, 1).float()
        best = None
        for t in tunings:
            meta = build_meta(ps, torch.device("cuda"), [], [], pages, [p], [n], prefill_block_m=t.block_m)
            assert meta.blk_req is not None and meta.blk_start is not None
            fn = functools.partial(
                kernels.paged_prefill,
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
                out=o,
                tuning=t,
            )
            try:
                fn()
                err = float((o.float() - ref).norm() / ref.norm())
                ms = bench(fn)
            except Exception as exc:
                rows.append({"n": n, "p": p, "tuning": t.__dict__, "error": repr(exc)[:200]})
                continue
            row = {
                "n": n,
                "p": p,
                "tuning": t.__dict__,
                "ms": ms,
                "sdpa_ms": sdpa_ms,
                "ratio": ms / sdpa_ms,
                "tflops": flops / ms / 1e9,
                "sdpa_tflops": flops / sdpa_ms / 1e9,
                "rel_err": err,
            }
            rows.append(row)
            if best is None or ms < best["ms"]:
                best = row
    return {"page_size": ps, "runs": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    copy_bw = copy_bandwidth()
    dec = decode_bench(copy_bw, args.quick)
    pre = prefill_bench(args.quick)
    res = {
        "device": dev,
        "torch": torch.__version__,
        "copy_bytes_per_s": copy_bw,
        "decode": dec,
        "prefill": pre,
    }
    out_dir = Path(os.environ.get("OUT", "/tmp/out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_kernels.json").write_text(json.dumps(res, indent=1))
    print(f"device {dev}; copy bandwidth {copy_bw / 1e12:.2f} TB/s (read + write)")
    runs = [r for r in dec["runs"] if "ms" in r]  # type: ignore[union-attr]
    default = kernels.DecodeTuning().__dict__
    print("decode 64 x 4096, one layer:")
    for ps in sorted({r["page_size"] for r in runs}):
        mine = [r for r in runs if r["page_size"] == ps]
        best = min(mine, key=lambda r: r["ms"])
        dflt = next((r for r in mine if r["tuning"] == default), best)
        print(
            f"  page {ps:3d}: default {dflt['ms'] * 1e3:7.1f} us {dflt['fraction_of_copy']:.1%} of copy; "
            f"best {best['ms'] * 1e3:7.1f} us {best['fraction_of_copy']:.1%} {best['tuning']} "
            f"err {best['rel_err']:.1e}"
        )
    if "sdpa_contiguous_ms" in dec:
        print(
            f"  sdpa contiguous: {dec['sdpa_contiguous_ms'] * 1e3:.1f} us "
            f"{dec['sdpa_fraction_of_copy']:.1%} of copy"
        )
    print("prefill (page 16), ours vs sdpa:")
    pdef = kernels.PrefillTuning().__dict__
    for n, p in sorted({(r["n"], r["p"]) for r in pre["runs"] if "ms" in r}):  # type: ignore[union-attr]
        mine = [r for r in pre["runs"] if r.get("n") == n and r.get("p") == p and "ms" in r]  # type: ignore[union-attr]
        best = min(mine, key=lambda r: r["ms"])
        dflt = next((r for r in mine if r["tuning"] == pdef), best)
        print(
            f"  {n:5d} new x {p:5d} cached: sdpa {best['sdpa_ms']:.3f} ms "
            f"({best['sdpa_tflops']:.0f} TF/s); default {dflt['ms']:.3f} ms x{dflt['ratio']:.2f}; "
            f"best {best['ms']:.3f} ms x{best['ratio']:.2f} "
            f"({best['tflops']:.0f} TF/s) {tuple(best['tuning'].values())} err {best['rel_err']:.1e}"
        )
    errs = [r for r in (*dec["runs"], *pre["runs"]) if "error" in r]  # type: ignore[misc]
    if errs:
        print(f"{len(errs)} tunings failed to compile/run, e.g. {errs[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Llama-architecture decoder (RMSNorm, RoPE, GQA attention, SwiGLU MLP) over the paged KV pool.

Weights are random from a seed (costs are real, tokens meaningless) or read from a safetensors checkpoint
in Hugging Face Llama layout. Weights are immutable after load, so several engines in one process share
one :class:`LlamaWeights` and differ only in their KV pools.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from kvroute.engines.gpu.attention import AttentionBackend, StepMeta
from kvroute.engines.gpu.config import ModelConfig


def torch_dtype(name: str) -> torch.dtype:
    try:
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]
    except KeyError as exc:
        raise ValueError(f"unsupported dtype {name!r}") from exc


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor
    wqkv: torch.Tensor  # [(H + 2 Hkv) * D, hidden]
    wo: torch.Tensor  # [hidden, H * D]
    mlp_norm: torch.Tensor
    w_gate_up: torch.Tensor  # [2 * I, hidden]
    w_down: torch.Tensor  # [hidden, I]


@dataclass
class LlamaWeights:
    cfg: ModelConfig
    embed: torch.Tensor
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    lm_head: torch.Tensor
    rope_cos: torch.Tensor  # [max_position, D/2] float32
    rope_sin: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @staticmethod
    def rope_tables(cfg: ModelConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        half = cfg.head_dim // 2
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, half, device=device, dtype=torch.float32) / half))
        ang = torch.arange(cfg.max_position, device=device, dtype=torch.float32)[:, None] * inv[None, :]
        return ang.cos(), ang.sin()

    @classmethod
    def random(cls, cfg: ModelConfig, device: torch.device | str, seed: int = 0) -> LlamaWeights:
        """Normal(0, 0.02) matrices and unit norms, drawn on the device from ``seed``."""
        dev = torch.device(device)
        dt = torch_dtype(cfg.dtype)
        gen = torch.Generator(device=dev)
        gen.manual_seed(seed)

        def mat(rows: int, cols: int) -> torch.Tensor:
            w = torch.empty((rows, cols), dtype=dt, device=dev)
            w.normal_(0.0, 0.02, generator=gen)
            return w

        h, d = cfg.hidden_size, cfg.head_dim
        layers = [
            LayerWeights(
                attn_norm=torch.ones(h, dtype=dt, device=dev),
                wqkv=mat((cfg.num_heads + 2 * cfg.num_kv_heads) * d, h),
                wo=mat(h, cfg.num_heads * d),
                mlp_norm=torch.ones(h, dtype=dt, device=dev),
                w_gate_up=mat(2 * cfg.intermediate_size, h),
                w_down=mat(h, cfg.intermediate_size),
            )
            for _ in range(cfg.num_layers)
        ]
        cos, sin = cls.rope_tables(cfg, dev)
        return cls(
            cfg,
            mat(cfg.vocab_size, h),
            layers,
            torch.ones(h, dtype=dt, device=dev),
            mat(cfg.vocab_size, h),
            cos,
            sin,
        )

    @classmethod
    def from_safetensors(cls, cfg: ModelConfig, path: str | Path, device: torch.device | str) -> LlamaWeights:
        """Hugging Face Llama names (``model.layers.N.self_attn.q_proj.weight``...), tied head allowed."""
        from safetensors.torch import load_file

        dev = torch.device(device)
        dt = torch_dtype(cfg.dtype)
        files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else [Path(path)]
        if not files:
            raise ValueError(f"no .safetensors files under {path}")
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            sd.update(load_file(str(f)))

        def get(name: str) -> torch.Tensor:
            if name not in sd:
                raise ValueError(f"checkpoint lacks {name}")
            return sd[name].to(device=dev, dtype=dt)

        layers = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            layers.append(
                LayerWeights(
                    attn_norm=get(p + "input_layernorm.weight"),
                    wqkv=torch.cat([get(p + f"self_attn.{n}_proj.weight") for n in "qkv"], 0),
                    wo=get(p + "self_attn.o_proj.weight"),
                    mlp_norm=get(p + "post_attention_layernorm.weight"),
                    w_gate_up=torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")], 0),
                    w_down=get(p + "mlp.down_proj.weight"),
                )
            )
        embed = get("model.embed_tokens.weight")
        head = get("lm_head.weight") if "lm_head.weight" in sd else embed
        cos, sin = cls.rope_tables(cfg, dev)
        return cls(cfg, embed, layers, get("model.norm.weight"), head, cos, sin)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.to(x.dtype) * w


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (Hugging Face Llama convention). x ``[T, heads, D]``; cos/sin ``[T, 1, D/2]``."""
    half = x.shape[-1] // 2
    x1 = x[..., :half].float()
    x2 = x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


class LlamaModel:
    """Forward of one step over packed tokens; returns float32 logits of the rows in ``sample_rows``.

    With ``fused`` (CUDA + Triton), RMSNorm with its residual add, RoPE and SwiGLU are single Triton kernels:
    a decode step is bound by kernel launches otherwise (about 35 per layer in plain torch).
    """

    def __init__(self, weights: LlamaWeights, attention: AttentionBackend, fused: bool | None = None) -> None:
        self.w = weights
        self.cfg = weights.cfg
        self.attn = attention
        self.fused = (attention.name == "triton") if fused is None else fused
        if self.fused:
            from kvroute.engines.gpu import kernels

            self._k = kernels

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: StepMeta,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        sample_rows: torch.Tensor,
    ) -> torch.Tensor:
        if self.fused:
            return self._forward_fused(input_ids, positions, meta, k_cache, v_cache, sample_rows)
        cfg, w = self.cfg, self.w
        t = input_ids.shape[0]
        nh, nkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        cos = w.rope_cos[positions][:, None, :]
        sin = w.rope_sin[positions][:, None, :]
        x = w.embed[input_ids]
        for li, lw in enumerate(w.layers):
            h = rms_norm(x, lw.attn_norm, cfg.rms_eps)
            qkv = F.linear(h, lw.wqkv)
            q = apply_rope(qkv[:, : nh * d].view(t, nh, d), cos, sin)
            k = apply_rope(qkv[:, nh * d : (nh + nkv) * d].view(t, nkv, d), cos, sin)
            v = qkv[:, (nh + nkv) * d :].view(t, nkv, d)
            o = self.attn.forward(q, k, v, k_cache[li], v_cache[li], meta)
            x = x + F.linear(o.reshape(t, nh * d), lw.wo)
            h = rms_norm(x, lw.mlp_norm, cfg.rms_eps)
            gate, up = F.linear(h, lw.w_gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, lw.w_down)
        x = rms_norm(x.index_select(0, sample_rows), w.final_norm, cfg.rms_eps)
        return F.linear(x, w.lm_head).float()

    def _forward_fused(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: StepMeta,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        sample_rows: torch.Tensor,
    ) -> torch.Tensor:
        cfg, w, kn = self.cfg, self.w, self._k
        t = input_ids.shape[0]
        nh, nkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        eps = cfg.rms_eps
        x = w.embed[input_ids]
        delta: torch.Tensor | None = None
        for li, lw in enumerate(w.layers):
            h = kn.add_rms_norm(x, delta, lw.attn_norm, eps)
            qkv = F.linear(h, lw.wqkv)
            qkv3 = qkv.view(t, nh + 2 * nkv, d)
            kn.rope_(qkv3[:, : nh + nkv], positions, w.rope_cos, w.rope_sin)
            o = self.attn.forward(
                qkv3[:, :nh], qkv3[:, nh : nh + nkv], qkv3[:, nh + nkv :], k_cache[li], v_cache[li], meta
            )
            h = kn.add_rms_norm(x, F.linear(o.view(t, nh * d), lw.wo), lw.mlp_norm, eps)
            delta = F.linear(kn.silu_mul(F.linear(h, lw.w_gate_up)), lw.w_down)
        assert delta is not None
        xs = x.index_select(0, sample_rows) + delta.index_select(0, sample_rows)
        return F.linear(kn.add_rms_norm(xs, None, w.final_norm, eps), w.lm_head).float()

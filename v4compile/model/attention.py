"""V4 attention (V4-SPEC section 3): low-rank Q, single 512-wide KV head (K = V), window + compressed sources.

Legend: B batch, T tokens of the call, d hidden, H heads, D head_dim, R rope dims (the LAST R channels),
W window, G output groups, r_o o_lora_rank, m compress ratio, N compressed capacity.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from v4compile.model.cache import LayerCache
from v4compile.model.compressor import Compressor, Indexer
from v4compile.model.config import ModelConfig
from v4compile.model.layers import Linear, OpTable, RMSNorm, declare
from v4compile.model.numerics import acc_dtype
from v4compile.model.ops import visible_block_indices, window_indices
from v4compile.model.packed_ops import encode_kv
from v4compile.model.rope import apply_rope_tail, layer_inv_freq
from v4compile.model.schema import TensorSpec
from v4compile.quant.formats import fake_quant_fp8


def _head_rms(q: Tensor, eps: float) -> Tensor:
    """Weightless RMS per head in the activation dtype (section 14.1); exact mode rounds once from float64."""
    if acc_dtype(q.dtype) == torch.float64:
        qd = q.double()
        return (qd * torch.rsqrt(qd.square().mean(-1, keepdim=True) + eps)).to(q.dtype)
    return q * torch.rsqrt(q.square().mean(-1, keepdim=True) + eps)


class Attention(nn.Module):
    """One block's attention; `layer_id` selects window-only, CSA (ratio 4) or HCA (ratio > 4)."""

    def __init__(self, spec: dict[str, TensorSpec], prefix: str, cfg: ModelConfig, layer_id: int, ops: OpTable,
                 device=None) -> None:
        super().__init__()
        self.ops, self.cfg = ops, cfg
        self.ratio = cfg.compress_ratios[layer_id]
        self.kind = cfg.layer_kind(layer_id)
        self.q_norm = RMSNorm(spec, f"{prefix}.q_norm", cfg.norm_eps, ops, device)
        self.kv_norm = RMSNorm(spec, f"{prefix}.kv_norm", cfg.norm_eps, ops, device)
        declare(self, "attn_sink", spec, f"{prefix}.attn_sink", device)  # f32 [H]
        for name in ("wq_a", "wq_b", "wkv", "wo_a", "wo_b"):
            setattr(self, name, Linear(spec, f"{prefix}.{name}", ops, device))
        if self.ratio:
            self.compressor = Compressor(spec, f"{prefix}.compressor", cfg, self.ratio, False, ops, device)
        if self.kind == "csa":
            self.indexer = Indexer(spec, f"{prefix}.indexer", cfg, ops, device)
        self.register_buffer("inv_freq", layer_inv_freq(cfg, layer_id, device=device), persistent=False)

    def forward(self, x: Tensor, positions: Tensor, start_pos: Tensor, lc: LayerCache,
                trace: dict | None = None, layer_id: int = -1) -> Tensor:
        """x [B, T, d] act (attn_norm-ed), positions [B, T], start_pos [B] -> [B, T, d] act; updates `lc`."""
        cfg, ops = self.cfg, self.ops
        B, T, _ = x.shape
        H, D, R = cfg.n_heads, cfg.head_dim, cfg.rope_head_dim
        c_q = self.q_norm(self.wq_a(x))  # [B, T, q_lora], reused by the indexer
        q = self.wq_b(c_q).unflatten(-1, (H, D))  # [B, T, H, D]
        q = _head_rms(q, cfg.norm_eps)
        q = apply_rope_tail(q, positions, self.inv_freq)
        kv = apply_rope_tail(self.kv_norm(self.wkv(x)), positions, self.inv_freq)  # [B, T, D]
        kv = torch.cat((fake_quant_fp8(kv[..., : D - R], 64), kv[..., D - R:]), -1)

        if self.ratio:  # compressors run before attention: a token completing a block sees it
            self.compressor(x, start_pos, self.inv_freq, lc.kv_state, lc.score_state, lc.kv, lc.kv_scale)
            if self.kind == "csa":
                idx2, scores = self.indexer(x, c_q, positions, start_pos, self.inv_freq, lc)
                if trace is not None:
                    trace.setdefault("indexer", {})[layer_id] = idx2.clone()
                    trace.setdefault("indexer_scores", {})[layer_id] = scores.clone()
            else:
                idx2 = visible_block_indices(positions, lc.capacity, self.ratio)
        else:
            idx2 = torch.zeros(B, T, 0, dtype=torch.int32, device=x.device)

        idx = window_indices(start_pos, T, cfg.window_size)  # into cat(ring, kv)
        if lc.packed:  # production layout: the chunk's rows encoded once, for the attention and the ring
            data, scales = encode_kv(kv, R)  # uint8 [B, T, nope + 2R], [B, T, 8]
            if self.ratio:
                kv2, kv2_scale = lc.kv, lc.kv_scale
            else:  # window-only: an empty second source
                kv2, kv2_scale = data.new_zeros(B, 0, data.shape[-1]), scales.new_zeros(B, 0, scales.shape[-1])
            o = ops.sparse_attention_fp8(q, torch.cat((lc.ring, data), 1), torch.cat((lc.ring_scale, scales), 1), idx,
                                         kv2, kv2_scale, idx2, self.attn_sink, D ** -0.5)
            ops.ring_write(lc.ring, data, start_pos)
            ops.ring_write(lc.ring_scale, scales, start_pos)
        else:
            kv2 = lc.kv if self.ratio else x.new_zeros(B, 0, D)
            o = ops.sparse_attention(q, torch.cat((lc.ring, kv), 1), idx, kv2, idx2, self.attn_sink, D ** -0.5)
            ops.ring_write(lc.ring, kv, start_pos)

        o = apply_rope_tail(o, positions, self.inv_freq, inverse=True)  # de-rotate by the query position
        G = cfg.o_groups
        acc = acc_dtype(o.dtype)  # act-dtype einsum (section 3.5) with acc_dtype accumulation
        wo_a = self.wo_a.dense(o.dtype).view(G, cfg.o_lora_rank, -1).to(acc)  # [G, r_o, (H/G) D]
        z = torch.einsum("btgi,goi->btgo", o.reshape(B, T, G, -1).to(acc), wo_a).to(o.dtype)
        return self.wo_b(z.flatten(2))

"""V4 primitive ops over production-layout caches (V4-SPEC 6.2, model/cache.py): the same math as their
act-dtype counterparts in model/ops.py, with KV rows stored as uint8 encodings (quant/kv_layout.py).

Every stored value is already fake-quantised (FP8 nope dims, bf16 RoPE dims, FP4 indexer keys), so encoding
is exact: the bodies decode to the activation dtype and call the act-dtype bodies (reads), or compute the
entries with the shared compressor core and encode them (writes). With bf16 activations a production cache
therefore gives bit-identical results to a reference one. Kernels read the encodings directly
(plugins/triton: sparse_attention_fp8, indexer_scores_fp4). Imported by model/ops.py (registration).

Dimension letters as in model/ops.py; W_r = nope + 2 R (row bytes: e4m3 nope, bf16 RoPE), 8 scale bytes per
KV row (one UE8M0 exponent per 64 nope dims, zero padded), Di/2 + Di/32 bytes per indexer key.
"""

from __future__ import annotations

import torch
from torch import Tensor

from v4compile.model.ops import BODIES, _v4op, compress_core, scatter_rows
from v4compile.quant.kv_layout import pack_index_rows, pack_kv_rows, unpack_index_rows, unpack_kv_rows

PACKED_ACT = torch.bfloat16
"""Activation dtype of production-layout caches: their RoPE dims are stored bf16 (exact only for bf16)."""


def encode_kv(kv: Tensor, rope_dim: int) -> tuple[Tensor, Tensor]:
    """Raw or compressed KV rows [..., D] (fake-quantised) -> (data uint8 [..., W_r], scales uint8 [..., 8])."""
    return pack_kv_rows(kv, rope_dim)


def decode_kv(data: Tensor, scales: Tensor, head_dim: int, dtype: torch.dtype) -> Tensor:
    """(data [..., W_r], scales [..., 8]) -> [..., head_dim] rows in `dtype` (R = W_r - head_dim)."""
    return unpack_kv_rows(data, scales, data.shape[-1] - head_dim, dtype)


@_v4op("compress_packed", mutates_args=("kv_state", "score_state", "cache", "cache_scale"))
def compress_packed(kv_proj: Tensor, gate_proj: Tensor, ape: Tensor, norm_weight: Tensor, inv_freq: Tensor,
                    start_pos: Tensor, kv_state: Tensor, score_state: Tensor, cache: Tensor, cache_scale: Tensor,
                    ratio: int, norm_eps: float, rotate: bool) -> None:
    """v4::compress writing production-layout rows: entries computed in bf16 (PACKED_ACT), then encoded into
    cache uint8 [B, N + 1, W_r] + cache_scale uint8 [B, N + 1, 8] (main), or for rotate (the indexer's keys)
    cache [B, N + 1, Di/2] + cache_scale [B, N + 1, Di/32]; the last row of both is scratch. The bytes are
    pack_kv_cache / pack_index_keys of the rows v4::compress stores in a bf16 cache."""
    entry, target = compress_core(kv_proj, gate_proj, ape, norm_weight, inv_freq, start_pos, kv_state, score_state,
                                  cache.shape[1], PACKED_ACT, ratio, norm_eps, rotate)
    data, scales = pack_index_rows(entry) if rotate else encode_kv(entry, 2 * inv_freq.shape[-1])
    scatter_rows(cache, target, data)
    scatter_rows(cache_scale, target, scales)


@compress_packed.register_fake
def _(kv_proj, gate_proj, ape, norm_weight, inv_freq, start_pos, kv_state, score_state, cache, cache_scale, ratio,
      norm_eps, rotate):
    return None


@_v4op("indexer_scores_fp4")
def indexer_scores_fp4(q: Tensor, weights: Tensor, k_codes: Tensor, k_scales: Tensor, positions: Tensor,
                       ratio: int) -> Tensor:
    """v4::indexer_scores with packed FP4 keys: k_codes uint8 [B, N, Di/2], k_scales uint8 [B, N, Di/32]
    -> scores f32 [B, T, N] (the keys decode exactly to q's dtype)."""
    return BODIES["indexer_scores"](q, weights, unpack_index_rows(k_codes, k_scales, q.dtype), positions, ratio)


@indexer_scores_fp4.register_fake
def _(q, weights, k_codes, k_scales, positions, ratio):
    return q.new_empty(q.shape[0], q.shape[1], k_codes.shape[1], dtype=torch.float32)


@_v4op("sparse_attention_fp8")
def sparse_attention_fp8(q: Tensor, kv: Tensor, kv_scale: Tensor, idx: Tensor, kv2: Tensor, kv2_scale: Tensor,
                         idx2: Tensor, sink: Tensor, scale: float) -> Tensor:
    """v4::sparse_attention over production-layout sources: kv uint8 [B, N, W_r] + kv_scale uint8 [B, N, 8],
    kv2 / kv2_scale likewise (N2 = 0 allowed); picks, sink and result as v4::sparse_attention (rows decode
    exactly to q's dtype)."""
    D = q.shape[-1]
    rows, rows2 = decode_kv(kv, kv_scale, D, q.dtype), decode_kv(kv2, kv2_scale, D, q.dtype)
    return BODIES["sparse_attention"](q, rows, idx, rows2, idx2, sink, scale)


@sparse_attention_fp8.register_fake
def _(q, kv, kv_scale, idx, kv2, kv2_scale, idx2, sink, scale):
    return torch.empty_like(q)

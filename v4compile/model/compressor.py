"""KV compressors and the lightning indexer (V4-SPEC sections 4 and 5).

Legend: B batch, T tokens of the call, d hidden, D compressed width (head_dim, or index_head_dim for the
indexer's compressor), m ratio, c = 2 for the overlapping ratio-4 compressor, Hi / Di indexer heads / width.
"""

from __future__ import annotations

from torch import Tensor, nn

from v4compile.model.cache import LayerCache
from v4compile.model.config import ModelConfig
from v4compile.model.layers import Linear, OpTable, RMSNorm, declare
from v4compile.model.ops import hadamard
from v4compile.model.rope import apply_rope_tail
from v4compile.model.schema import TensorSpec
from v4compile.quant.formats import fake_quant_fp4


class Compressor(nn.Module):
    """Gated pooling of m-token blocks into one entry (overlapping 2m slots when m == 4); see v4::compress."""

    def __init__(self, spec: dict[str, TensorSpec], prefix: str, cfg: ModelConfig, ratio: int, rotate: bool,
                 ops: OpTable, device=None) -> None:
        super().__init__()
        self.ops, self.ratio, self.rotate, self.eps = ops, ratio, rotate, cfg.norm_eps
        declare(self, "ape", spec, f"{prefix}.ape", device)  # f32 [m, c D]
        self.wkv = Linear(spec, f"{prefix}.wkv", ops, device)  # bf16 [c D, d], used in fp32
        self.wgate = Linear(spec, f"{prefix}.wgate", ops, device)
        self.norm = RMSNorm(spec, f"{prefix}.norm", cfg.norm_eps, ops, device)

    def forward(self, x: Tensor, start_pos: Tensor, inv_freq: Tensor, kv_state: Tensor, score_state: Tensor,
                cache: Tensor, cache_scale: Tensor | None = None) -> None:
        """x [B, T, d] act: projects in fp32 and advances the state; complete blocks land in `cache` (encoded
        into cache + cache_scale for a production-layout cache, v4::compress_packed)."""
        kv, gate = self.wkv.forward_fp32(x), self.wgate.forward_fp32(x)
        if cache_scale is None:
            self.ops.compress(kv, gate, self.ape, self.norm.weight, inv_freq, start_pos, kv_state, score_state, cache,
                              self.ratio, self.eps, self.rotate)
        else:
            self.ops.compress_packed(kv, gate, self.ape, self.norm.weight, inv_freq, start_pos, kv_state,
                                     score_state, cache, cache_scale, self.ratio, self.eps, self.rotate)


class Indexer(nn.Module):
    """Lightning indexer of a CSA layer: picks index_topk complete compressed blocks per query (section 4.3)."""

    def __init__(self, spec: dict[str, TensorSpec], prefix: str, cfg: ModelConfig, ops: OpTable,
                 device=None) -> None:
        super().__init__()
        self.ops = ops
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.wq_b = Linear(spec, f"{prefix}.wq_b", ops, device)  # FP8 [Hi Di, q_lora]
        self.weights_proj = Linear(spec, f"{prefix}.weights_proj", ops, device)  # bf16 [Hi, d]
        self.compressor = Compressor(spec, f"{prefix}.compressor", cfg, 4, True, ops, device)

    def forward(self, x: Tensor, c_q: Tensor, positions: Tensor, start_pos: Tensor, inv_freq: Tensor,
                lc: LayerCache) -> tuple[Tensor, Tensor]:
        """x [B, T, d], c_q [B, T, q_lora] -> (picks int32 [B, T, k] with -1 = none, scores f32 [B, T, N])."""
        Hi, Di = self.n_heads, self.head_dim
        q = self.wq_b(c_q).unflatten(-1, (Hi, Di))  # [B, T, Hi, Di]
        q = apply_rope_tail(q, positions, inv_freq)
        q = fake_quant_fp4(hadamard(q), 32)
        w = self.weights_proj(x) * (Di ** -0.5 * Hi ** -0.5)  # [B, T, Hi] act
        self.compressor(x, start_pos, inv_freq, lc.idx_kv_state, lc.idx_score_state, lc.idx_kv, lc.idx_kv_scale)
        n = lc.idx_kv.shape[1] - 1  # capacity; the scratch row is never scored
        if lc.packed:  # packed FP4 keys: codes [B, N, Di/2] + UE8M0 scales [B, N, Di/32]
            scores = self.ops.indexer_scores_fp4(q, w, lc.idx_kv[:, :n], lc.idx_kv_scale[:, :n], positions, 4)
        else:
            scores = self.ops.indexer_scores(q, w, lc.idx_kv[:, :n], positions, 4)
        return self.ops.topk_select(scores, min(self.topk, n)), scores

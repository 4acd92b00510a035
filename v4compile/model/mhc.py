"""mHC residual streams (V4-SPEC section 7): the sublayer wrapper pieces as v4 op calls.

The model calls the unfused vocabulary (hc_mix -> sinkhorn -> hc_collapse); the graph pass `fuse_mhc`
may rewrite that chain into one v4::hc_pre node.
"""

from __future__ import annotations

from torch import Tensor, nn

from v4compile.model.config import ModelConfig
from v4compile.model.layers import OpTable, declare
from v4compile.model.schema import TensorSpec


def declare_hc(module: nn.Module, spec: dict[str, TensorSpec], prefix: str, side: str, device=None) -> None:
    """Register `hc_{side}_fn`, `hc_{side}_base`, `hc_{side}_scale` (side: attn, ffn or head) on `module`."""
    for part in ("fn", "base", "scale"):
        attr = f"hc_{side}_{part}"
        declare(module, attr, spec, f"{prefix}{attr}", device)


def hc_pre(ops: OpTable, cfg: ModelConfig, x: Tensor, fn: Tensor, scale: Tensor,
           base: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Streams x [B, T, hc, d] -> (sublayer input u [B, T, d] act, post f32 [B, T, hc], comb f32 [B, T, hc, hc])."""
    pre, post, logits = ops.hc_mix(x, fn, scale, base, cfg.norm_eps, cfg.hc_eps)
    comb = ops.sinkhorn(logits, cfg.hc_sinkhorn_iters, cfg.hc_eps)
    return ops.hc_collapse(x, pre), post, comb


def hc_head(ops: OpTable, cfg: ModelConfig, x: Tensor, fn: Tensor, scale: Tensor, base: Tensor) -> Tensor:
    """Final collapse of the streams [B, T, hc, d] -> [B, T, d] act (no Sinkhorn, section 7.4)."""
    return ops.hc_head(x, fn, scale, base, cfg.norm_eps, cfg.hc_eps)

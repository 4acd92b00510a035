"""Rotary position embedding of V4 (V4-SPEC section 1.4): interleaved pairs on the LAST R channels, YaRN.

Angles are fp32(position) * fp32(inv_freq), rotated in fp32 and cast back to the input dtype, so the
same position gives bit-identical values whichever call (prefill chunk or decode step) computes it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from v4compile.model.config import ModelConfig
from v4compile.model.numerics import fn_acc


def rope_inv_freq(rope_dim: int, base: float, *, yarn: bool, factor: float = 1.0, original_seq_len: int = 0,
                  beta_fast: int = 32, beta_slow: int = 1, device: torch.device | str | None = None) -> Tensor:
    """Per-pair frequencies f_i = base^(-2i/R) (float32 [R/2]); with `yarn`, the section 1.4 ramp blend."""
    freqs = 1.0 / (base ** (torch.arange(0, rope_dim, 2, dtype=torch.float32, device=device) / rope_dim))
    if not yarn:
        return freqs

    def corr_dim(n_rot: float) -> float:
        return rope_dim * math.log(original_seq_len / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    lo = max(math.floor(corr_dim(beta_fast)), 0)
    hi = min(math.ceil(corr_dim(beta_slow)), rope_dim - 1)
    if lo == hi:
        hi += 0.001  # degenerate ramp: avoid 0/0 (same guard as DeepSeek's precompute)
    ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32, device=device) - lo) / (hi - lo)).clamp(0, 1)
    return freqs / factor * ramp + freqs * (1 - ramp)


def layer_inv_freq(cfg: ModelConfig, layer_id: int, device: torch.device | str | None = None) -> Tensor:
    """Frequencies of one block: window-only layers rope_theta without YaRN; CSA/HCA compress_rope_theta + YaRN."""
    if cfg.compress_ratios[layer_id] == 0:
        return rope_inv_freq(cfg.rope_head_dim, cfg.rope_theta, yarn=False, device=device)
    return rope_inv_freq(cfg.rope_head_dim, cfg.compress_rope_theta, yarn=True, factor=cfg.rope_factor,
                         original_seq_len=cfg.original_seq_len, beta_fast=cfg.beta_fast,
                         beta_slow=cfg.beta_slow, device=device)


def rope_angles(positions: Tensor, inv_freq: Tensor, act: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """positions [...] (int) -> (cos, sin) float32 [..., R/2] of the fp32 angle fp32(p) * fp32(f_i)
    (cos / sin evaluated in acc_dtype(act), see numerics)."""
    theta = positions.to(torch.float32).unsqueeze(-1) * inv_freq.to(torch.float32)
    return fn_acc(torch.cos, theta, act), fn_acc(torch.sin, theta, act)


def rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool = False) -> Tensor:
    """Rotate interleaved pairs (2i, 2i+1) of x [..., R] by angles (cos, sin) [..., R/2] (broadcast); x.dtype."""
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    if inverse:
        sin = -sin
    out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


def apply_rope_tail(x: Tensor, positions: Tensor, inv_freq: Tensor, inverse: bool = False) -> Tensor:
    """RoPE on the last R = 2 * len(inv_freq) channels of x [B, T, (heads,) C] at positions [B, T]; x.dtype."""
    rd = 2 * inv_freq.shape[-1]
    cos, sin = rope_angles(positions, inv_freq, x.dtype)  # [B, T, R/2]
    extra = x.dim() - positions.dim() - 1  # head dims between positions and channels
    for _ in range(extra):
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    tail = rotate_pairs(x[..., -rd:], cos, sin, inverse)
    return torch.cat((x[..., :-rd], tail), dim=-1)

"""Numerics policy of the reference: where it accumulates and evaluates transcendental functions.

With float32 activations ("exact mode") every matmul and sum accumulates in float64 and every
transcendental elementwise function (exp, sigmoid, softplus, silu, rsqrt, cos, sin) is evaluated in
float64, each rounded to float32 once. CPU kernels otherwise give a row a result that depends on how
many rows share the call (MKL GEMM blocking; SIMD body vs scalar tail of exp/sigmoid differ by one
ulp), and one ulp is enough for the FP8/FP4 fake-quant to round a value the other way in prefill
than in decode (measured: 3.2e-2 max relative logit error on `tiny` after one such flip). Rounded
once from float64, prefill, chunked prefill and decode agree bit for bit (but for the
~2^-29-per-element double-rounding chance). With bfloat16 activations the accumulation dtype is
float32, as deployed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def acc_dtype(act: torch.dtype) -> torch.dtype:
    """Accumulation / transcendental dtype for activation dtype `act`: float64 for float32, else float32."""
    return torch.float64 if act == torch.float32 else torch.float32


def linear_acc(x: Tensor, w: Tensor, act: torch.dtype) -> Tensor:
    """x [..., K] @ w [O, K]^T accumulated in acc_dtype(act) -> float32 [..., O]."""
    acc = acc_dtype(act)
    return F.linear(x.to(acc), w.to(acc)).float()


def fn_acc(fn: Callable[[Tensor], Tensor], x: Tensor, act: torch.dtype) -> Tensor:
    """Elementwise `fn` evaluated in acc_dtype(act), returned as float32."""
    return fn(x.to(acc_dtype(act))).float()


def rsqrt_mean_square(x: Tensor, eps: float, act: torch.dtype) -> Tensor:
    """float32 rsqrt(mean(x^2, last dim) + eps) [..., 1], the mean accumulated in acc_dtype(act)."""
    acc = acc_dtype(act)
    return torch.rsqrt(x.to(acc).square().mean(-1, keepdim=True) + eps).float()

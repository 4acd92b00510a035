"""Dense FP8 linear layers (V4-SPEC sections 0 and 14.4) on the GPU: `v4triton::fp8_linear`.

Legend: M rows (tokens), K input width (a multiple of 128), O output width, BM x BN output tile, BK = 128 (one
scale block of the reduction dim).

Same contract as `v4::fp8_linear` (v4compile/model/ops.py): x [..., K] act, weight e4m3 [O, K], scale
[ceil(O/128), K/128] (float32 here: GPU targets widen UE8M0 scales, targets/lower.py) -> y [..., O] act. Two
launches: the MoE kernels' activation quantisation (per row and 128 channels, power-of-two scales: the rule of
fake_quant_fp8), then a GEMM that multiplies e4m3 x e4m3 on the tensor cores and adds each 128-block's product
times its two scales in fp32, as DeepSeek's FP8 GEMMs do (the A tiles then go to the tensor cores as loaded,
like the weights). Lowered from the reference body instead, a GPU engine dequantised every
weight to float32 on every call (an Inductor kernel writing 4 B per weight) and ran an fp32 cuBLAS GEMV over it,
about 9 bytes of traffic per weight where this reads 1 (the profile in docs/perf/engines.md, session 10).

Decode (a few rows) is weight-bandwidth bound: BM 16 and a narrow BN spread the weight stream over many
programs. Numerics: products of e4m3 values are exact, Hopper accumulates each 128-wide block with reduced
precision before the fp32 promotion (calc_diff ~1e-5 against the fp32 reference, as the MoE kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from v4compile.plugins.registry import register_kernel
from v4compile.plugins.triton.launch import accepts, launcher
from v4compile.plugins.triton.moe_gemm import _quant_rows_fp8

BK = 128
_BK = tl.constexpr(BK)


@dataclass(frozen=True)
class LinearConfig:
    """Tile (rows x output columns) and launch parameters of the GEMM."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Untimed so far (no GPU when it was written): BM 16 / BN 64 for decode after the MoE route GEMMs (the same
# weight-streaming shape), 64 x 128 for prefill after the MoE grouped GEMM2; `v4compile bench kernels linear`
# times them against the reference body, eager and compiled (the engines' former fp32 path).
DECODE_CONFIG = LinearConfig(16, 64, 4, 4)
PREFILL_CONFIG = LinearConfig(64, 128, 4, 3)
DECODE_MAX_ROWS = 64


@triton.jit
def _fp8_linear_kernel(q_ptr, qs_ptr, w_ptr, s_ptr, o_ptr, M, O, K, stride_qm, stride_qsm, stride_wo, stride_so,
                       stride_om, BM: tl.constexpr, BN: tl.constexpr):
    """One BM x BN tile of y = act_fp8(x) W^T from the quantised rows (e4m3 + per-128 scales): per 128-block,
    e4m3 dot times (x scale x weight scale), accumulated in fp32."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, _BK)
    mm = rm < M
    nm = rn < O
    a_rows = q_ptr + rm.to(tl.int64)[:, None] * stride_qm + rk[None, :]
    sa_rows = qs_ptr + rm.to(tl.int64) * stride_qsm
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wo + rk[None, :]
    sw_rows = s_ptr + (rn // _BK).to(tl.int64) * stride_so
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for kb in range(0, K // _BK):
        a = tl.load(a_rows + kb * _BK, mask=mm[:, None], other=0.0)
        sa = tl.load(sa_rows + kb, mask=mm, other=0.0)
        w = tl.load(w_rows + kb * _BK, mask=nm[:, None], other=0.0)
        sw = tl.load(sw_rows + kb, mask=nm, other=0.0)
        acc += tl.dot(a, tl.trans(w)) * (sa[:, None] * sw[None, :])
    tl.store(o_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :], acc.to(o_ptr.dtype.element_ty),
             mask=mm[:, None] & nm[None, :])


def _check(x, weight, scale) -> tuple[int, int]:
    """(K, O); ValueError naming the bad argument."""
    if x.dim() < 1 or x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"x must be bf16 / fp16 [..., K], got {x.dtype} {list(x.shape)}")
    if weight.dim() != 2 or weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"weight must be float8_e4m3fn [O, K], got {weight.dtype} {list(weight.shape)}")
    O, K = weight.shape
    if x.shape[-1] != K or K % BK:
        raise ValueError(f"x [..., {x.shape[-1]}] and weight [{O}, {K}]: K must match and be a multiple of {BK}")
    if scale.dtype != torch.float32 or tuple(scale.shape) != (-(-O // BK), K // BK):
        raise ValueError(f"scale must be float32 [{-(-O // BK)}, {K // BK}] (128x128 blocks), got {scale.dtype} "
                         f"{list(scale.shape)}")
    if weight.stride(1) != 1 or scale.stride(1) != 1:
        raise ValueError(f"weight and scale need a contiguous last dim, got strides {weight.stride()}, "
                         f"{scale.stride()}")
    return K, O


def fp8_linear_launch(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                      config: LinearConfig | None = None) -> torch.Tensor:
    """Validate, then y [..., O] in x's dtype (two launches: the rows' quantisation, the GEMM)."""
    K, O = _check(x, weight, scale)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    q, qs = _quant_rows_fp8(x2)
    out = torch.empty((M, O), dtype=x.dtype, device=x.device)
    cfg = config or (DECODE_CONFIG if isinstance(M, int) and M <= DECODE_MAX_ROWS else PREFILL_CONFIG)
    grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(O, cfg.block_n))
    launcher(_fp8_linear_kernel, q, qs, weight, scale, out)[grid](
        q, qs, weight, scale, out, M, O, K, q.stride(0), qs.stride(0), weight.stride(0), scale.stride(0),
        out.stride(0), BM=cfg.block_m, BN=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out.reshape(*lead, O)


@torch.library.triton_op("v4triton::fp8_linear", mutates_args=())
def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Same contract as v4::fp8_linear (float32 weight scales)."""
    return fp8_linear_launch(x, weight, scale)


def supports_fp8_linear(x, weight, scale, *_rest, **_kw) -> bool:
    """Capability check: bf16 / fp16 activations, e4m3 weights with float32 128x128 scales, K % 128 == 0."""
    return accepts(_check, x, weight, scale)


register_kernel("v4::fp8_linear", ("h100", "h200"), supports_fp8_linear, priority=10,
                name="v4triton::fp8_linear")(torch.ops.v4triton.fp8_linear.default)

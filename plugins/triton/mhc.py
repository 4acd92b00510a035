"""mHC Sinkhorn normalisation (V4-SPEC section 7.2) on the GPU: `v4triton::sinkhorn`.

Legend: N matrices (every token of every mHC map: leading dims flattened), hc the hyper-connection count (4 at
V4), BLOCK matrices per program.

Same contract as `v4::sinkhorn` (v4compile/model/ops.py): logits f32 [..., hc, hc] -> comb f32, row softmax + eps,
a column normalisation, then iters - 1 (row, column) normalisation pairs, each `m / (sum + eps)`. One program
keeps BLOCK whole hc x hc matrices in registers through every step and writes each once. Lowered from the
reference body, Inductor launches one kernel per normalisation instead (each step reads other elements of the
previous step's matrix, so it cannot fuse them): 39 launches per mHC map at 20 iterations, measured as 312 of the
646 kernels of a tiny-model decode step on an H100 (docs/perf/engines.md, session 10).

Numerics: divisions are IEEE (div_rn), like torch's; exp and the 4-term sums may differ from torch's in the last
bits (calc_diff ~1e-14, far below the fp32 kernel tolerance).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from v4compile.plugins.registry import register_kernel
from v4compile.plugins.triton.launch import accepts, launcher

ELEMS_PER_PROGRAM = 4096  # matrix elements per program (BLOCK = ELEMS_PER_PROGRAM / hc^2 matrices)


@triton.jit
def _sinkhorn_kernel(x_ptr, o_ptr, N, eps, HC: tl.constexpr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    """Program i: matrices i * BLOCK .. i * BLOCK + BLOCK - 1, all ITERS steps in registers."""
    eps = tl.cast(eps, tl.float32)  # float arguments arrive as fp64 when AOTInductor launches the kernel
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = (rows < N)[:, None, None]
    j = tl.arange(0, HC)[None, :, None]
    k = tl.arange(0, HC)[None, None, :]
    offs = rows[:, None, None] * (HC * HC) + j * HC + k
    x = tl.load(x_ptr + offs, mask=ok, other=0.0)
    e = tl.exp(x - tl.max(x, axis=2)[:, :, None])
    m = tl.div_rn(e, tl.sum(e, axis=2)[:, :, None]) + eps  # softmax over k, + eps
    m = tl.div_rn(m, tl.sum(m, axis=1)[:, None, :] + eps)  # column step (sum over j)
    for _ in tl.static_range(ITERS - 1):
        m = tl.div_rn(m, tl.sum(m, axis=2)[:, :, None] + eps)  # row step
        m = tl.div_rn(m, tl.sum(m, axis=1)[:, None, :] + eps)  # column step
    tl.store(o_ptr + offs, m, mask=ok)


def _check(logits, iters, eps) -> int:
    """hc; ValueError naming the bad argument."""
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"logits must be [..., hc, hc], got {list(logits.shape)}")
    hc = logits.shape[-1]
    if not isinstance(hc, int) or hc < 1 or hc & (hc - 1) or hc > 32:
        raise ValueError(f"hc must be a power of two <= 32, got {hc}")
    if logits.dtype != torch.float32:
        raise ValueError(f"logits must be float32, got {logits.dtype}")
    if not isinstance(iters, int) or not 1 <= iters <= 64:
        raise ValueError(f"iters must be an int in [1, 64], got {iters!r}")
    if not isinstance(eps, float):
        raise ValueError(f"eps must be a float, got {eps!r}")
    return hc


def sinkhorn_launch(logits: torch.Tensor, iters: int, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Validate, then run every matrix's normalisation in one launch; float32 of logits' shape (`out`, contiguous,
    when given: tests pre-poison it)."""
    hc = _check(logits, iters, eps)
    x = logits.contiguous()
    if out is None:
        out = torch.empty_like(x)
    elif out.shape != x.shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be contiguous float32 {list(x.shape)}, got {out.dtype} {list(out.shape)}")
    n = x.numel() // (hc * hc)
    block = max(1, ELEMS_PER_PROGRAM // (hc * hc))
    launcher(_sinkhorn_kernel, x, out)[(triton.cdiv(n, block),)](x, out, n, float(eps), HC=hc, ITERS=iters,
                                                                    BLOCK=block, num_warps=4)
    return out


@torch.library.triton_op("v4triton::sinkhorn", mutates_args=())
def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Same contract as v4::sinkhorn."""
    return sinkhorn_launch(logits, iters, eps)


def supports_sinkhorn(logits, iters, eps, *_rest, **_kw) -> bool:
    """Capability check: the launcher's shape / dtype / argument conditions."""
    return accepts(_check, logits, iters, eps)


register_kernel("v4::sinkhorn", ("h100", "h200"), supports_sinkhorn, priority=10,
                name="v4triton::sinkhorn")(torch.ops.v4triton.sinkhorn.default)

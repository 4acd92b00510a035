"""Numeric parity: the one tolerance table (DESIGN.md section 8) and the comparison helpers built on it."""

from __future__ import annotations

import torch

# kernel vs its reference: DeepGEMM-style calc_diff bound, by the precision of the path.
TOLERANCES: dict[str, dict[str, float]] = {
    "kernel": {"fp32": 1e-5, "bf16": 1e-5, "fp8": 1e-3},
    # whole model, engine vs eager: logits calc_diff by build precision
    "model_logits": {"fp32": 1e-5, "bf16": 1e-2, "fp8": 1e-2},
}


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - 2<x,y> / (|x|^2 + |y|^2) in float64; 0 for identical tensors (both zero counts as identical)."""
    x64, y64 = x.detach().double().flatten(), y.detach().double().flatten()
    finite = torch.isfinite(x64) & torch.isfinite(y64)
    x64, y64 = x64[finite], y64[finite]
    denom = (x64 * x64 + y64 * y64).sum()
    if denom == 0:
        return 0.0
    return float(1 - 2 * (x64 * y64).sum() / denom)


def max_rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    """max|x - y| / max|y| (the reference is y): the decode-vs-prefill and pass-parity measure."""
    return float((x - y).abs().max() / y.abs().max().clamp_min(1e-30))


def nonfinite_mismatch(x: torch.Tensor, y: torch.Tensor) -> int:
    """Number of positions where inf/NaN patterns of x and y differ (NaN vs NaN, +inf vs +inf are equal)."""
    xn, yn = torch.isnan(x), torch.isnan(y)
    xi, yi = torch.isinf(x), torch.isinf(y)
    same_inf = ~(xi | yi) | (xi & yi & (torch.sign(x) == torch.sign(y)))
    return int(((xn != yn) | ~same_inf).sum())


def assert_kernel_close(out: torch.Tensor, ref: torch.Tensor, precision: str, what: str) -> float:
    """Raise AssertionError with the first mismatching coordinates unless `out` matches `ref` per the table."""
    if out.shape != ref.shape:
        raise AssertionError(f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    bad = nonfinite_mismatch(out, ref)
    if bad:
        pos = ((torch.isnan(out) != torch.isnan(ref)) | (torch.isinf(out) != torch.isinf(ref))).nonzero()[:3].tolist()
        raise AssertionError(f"{what}: {bad} inf/NaN positions differ, first at {pos}")
    tol = TOLERANCES["kernel"][precision]
    diff = calc_diff(out, ref)
    if not diff < tol:
        err = (out.double() - ref.double()).abs()
        err = torch.where(torch.isfinite(err), err, torch.zeros_like(err))
        i = int(err.flatten().argmax())
        coord = list(torch.unravel_index(torch.tensor(i), out.shape))
        raise AssertionError(f"{what}: calc_diff {diff:.3e} >= {tol:.0e} ({precision}); worst at "
                             f"{[int(c) for c in coord]}: {out.flatten()[i].item()} vs {ref.flatten()[i].item()}")
    return diff

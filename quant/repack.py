"""Re-encode weights between formats with a proof of what was lost: MXFP4 -> FP8 block, BF16 -> FP8 block.

MXFP4 -> FP8 (V4-SPEC 12.3, convert.py `--expert-dtype fp8`): every MXFP4 value is m * 2^E with
m in {1, 1.5}. The output block scale is the usual power-of-two rule, 2^ceil(log2(amax/448)), which for
such values puts the block maximum at exponent 8 exactly (<= 1.5 * 256 = 384 < 448), so the largest
values never round. A value of the block is exact in e4m3 iff it is at most 17 binades (m = 1) or 16
binades (m = 1.5) below the block's largest exponent (e4m3 subnormals reach 2^-9). With one output
scale per MXFP4 group (block (1, 32)) the spread is at most 3 binades: exact by construction. With
128x128 blocks it depends on how far apart the per-32 scales of the block are; `verify_repack`
dequantises both encodings and compares every element, and the repack raises `LossyRepackError`
naming the lossy blocks unless `allow_lossy=True`. (convert.py takes block-max of the per-32 scales
/ 2^6 instead; the two rules agree whenever the block's largest group holds a value >= 4 * its scale,
and ours never picks a larger scale, so it is exact at least as often.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from v4compile.errors import CheckpointError
from v4compile.quant.formats import _blocks_2d, dequant_fp4_block, dequant_fp8_block, e8m0_to_float, quant_fp8_block
from v4compile.validate import calc_diff

_TINY_AMAX = 2.0**-126  # repack keeps tiny blocks exact: no 1e-4 floor on the block maximum
_MAX_LISTED = 32  # lossy blocks listed in a report / error message


class LossyRepackError(CheckpointError):
    """A re-encoding would change values (names the blocks and the error); pass allow_lossy=True to accept."""


@dataclass
class BlockLoss:
    index: tuple[int, ...]  # block coordinates (leading dims..., block row, block col)
    mismatches: int  # elements whose value changed
    max_abs_err: float
    max_rel_err: float  # relative to the original element


@dataclass
class RepackReport:
    block: tuple[int, int]
    n_blocks: int
    mismatches: int  # total changed elements (0 = exact)
    max_abs_err: float
    calc_diff: float
    lossy_blocks: int
    worst: list[BlockLoss] = field(default_factory=list)  # up to _MAX_LISTED, largest error first

    @property
    def exact(self) -> bool:
        return self.mismatches == 0

    def summary(self) -> str:
        head = (f"{self.mismatches} of the values changed in {self.lossy_blocks}/{self.n_blocks} blocks "
                f"{self.block[0]}x{self.block[1]}, max abs error {self.max_abs_err:.3g}")
        if not self.worst:
            return head
        w = self.worst[0]
        return head + (f"; worst block {w.index}: {w.mismatches} values, max abs {w.max_abs_err:.3g}, "
                       f"max rel {w.max_rel_err:.3g}")


def _block_view(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float [..., O, I] -> [..., so, si, bo*bi] (zero padded)."""
    b = _blocks_2d(x, *block)  # [..., so, bo, si, bi]
    return b.transpose(-3, -2).flatten(-2)


def compare_blocks(ref: torch.Tensor, new: torch.Tensor, block: tuple[int, int]) -> RepackReport:
    """Element-wise comparison of two float [..., O, I] tensors, aggregated per block (NaN == NaN)."""
    if ref.shape != new.shape:
        raise ValueError(f"compare_blocks: shapes differ, {list(ref.shape)} vs {list(new.shape)}")
    r, n = _block_view(ref.float(), block), _block_view(new.float(), block)
    same = (r == n) | (torch.isnan(r) & torch.isnan(n))
    err = torch.where(same, torch.zeros_like(r), (r - n).abs().nan_to_num(float("inf")))
    rel = err / r.abs().clamp_min(torch.finfo(torch.float32).tiny)
    per_block = (~same).sum(-1)
    max_abs, max_rel = err.amax(-1), torch.where(same, torch.zeros_like(rel), rel).amax(-1)
    lossy = per_block.nonzero()
    order = max_abs[tuple(lossy.T)].argsort(descending=True)[:_MAX_LISTED] if len(lossy) else []
    worst = [BlockLoss(tuple(lossy[i].tolist()), int(per_block[tuple(lossy[i])]),
                       float(max_abs[tuple(lossy[i])]), float(max_rel[tuple(lossy[i])])) for i in order]
    return RepackReport(block=block, n_blocks=per_block.numel(), mismatches=int(per_block.sum()),
                        max_abs_err=float(max_abs.max()) if max_abs.numel() else 0.0,
                        calc_diff=calc_diff(ref, new), lossy_blocks=len(lossy), worst=worst)


def verify_repack(packed: torch.Tensor, scale: torch.Tensor, q: torch.Tensor, q_scale: torch.Tensor,
                  block: tuple[int, int]) -> RepackReport:
    """Dequantise the MXFP4 original and the FP8 re-encoding and count every changed value, per FP8 block."""
    return compare_blocks(dequant_fp4_block(packed, scale), dequant_fp8_block(q, q_scale, block), block)


def repack_mxfp4_to_fp8(packed: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = (128, 128), *,
                        scale_fmt: str = "ue8m0", allow_lossy: bool = False, name: str = "weight"
                        ) -> tuple[torch.Tensor, torch.Tensor, RepackReport]:
    """MXFP4 [..., O, I/2] + per-32 UE8M0 scales -> (e4m3 [..., O, I], block scales, verified report)."""
    if scale_fmt not in ("ue8m0", "fp32"):
        raise ValueError(f"scale_fmt must be 'ue8m0' or 'fp32', got {scale_fmt!r}")
    w = dequant_fp4_block(packed, scale)  # exact in fp32 (a e2m1 value times a power of two)
    q, s = quant_fp8_block(w, block, scale_fmt="ue8m0", min_amax=_TINY_AMAX)
    if scale_fmt == "fp32":  # -Base layout: the same power-of-two scales stored as float32
        s = e8m0_to_float(s)
    report = compare_blocks(w, dequant_fp8_block(q, s, block), block)
    if not report.exact and not allow_lossy:
        raise LossyRepackError(f"{name}: MXFP4 -> FP8 {block[0]}x{block[1]} is lossy: {report.summary()} "
                               f"(per-32 scales too far apart in one block; use a finer block or allow_lossy=True)")
    return q, s, report


@dataclass
class QuantReport:
    block: tuple[int, int]
    max_abs_err: torch.Tensor  # [..., so, si] per block
    rms_err: torch.Tensor  # [..., so, si] per block (over the block's real elements)
    calc_diff: float

    def summary(self) -> str:
        return (f"FP8 {self.block[0]}x{self.block[1]}: calc_diff {self.calc_diff:.3g}, max abs error "
                f"{float(self.max_abs_err.max()):.3g}, worst block RMS error {float(self.rms_err.max()):.3g}")


def quantize_bf16_to_fp8(w: torch.Tensor, block: tuple[int, int] = (128, 128), scale_fmt: str = "ue8m0"
                         ) -> tuple[torch.Tensor, torch.Tensor, QuantReport]:
    """Float weight [..., O, I] -> (e4m3, block scales, per-block max / RMS error and calc_diff)."""
    q, s = quant_fp8_block(w, block, scale_fmt=scale_fmt)
    ref = w.float()
    err = _block_view((dequant_fp8_block(q, s, block) - ref).abs(), block)
    O, I = w.shape[-2:]
    ones = _block_view(torch.ones(O, I, device=w.device), block).sum(-1)  # real (unpadded) elements per block
    rms = (err.double().square().sum(-1) / ones).sqrt().float()
    return q, s, QuantReport(block=block, max_abs_err=err.amax(-1), rms_err=rms,
                             calc_diff=calc_diff(ref, dequant_fp8_block(q, s, block)))


__all__ = ["LossyRepackError", "RepackReport", "BlockLoss", "QuantReport", "repack_mxfp4_to_fp8", "verify_repack",
           "compare_blocks", "quantize_bf16_to_fp8"]

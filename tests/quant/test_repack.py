"""MXFP4 -> FP8 repacking (exact where the docstring says, LossyRepackError elsewhere) and BF16 -> FP8 reports."""

from __future__ import annotations

import pytest
import torch

from v4compile.errors import CheckpointError
from v4compile.quant.formats import (
    dequant_fp4_block, dequant_fp8_block, e8m0_to_float, float_to_e8m0, pack_fp4, quant_fp4_block, quant_fp8_block,
)
from v4compile.quant.repack import LossyRepackError, quantize_bf16_to_fp8, repack_mxfp4_to_fp8, verify_repack
from v4compile.validate import calc_diff


def _mxfp4(codes: torch.Tensor, exps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """codes uint8 [O, I], per-32 exponents int [O, I/32] -> (packed, e8m0 scales)."""
    return pack_fp4(codes), float_to_e8m0(torch.exp2(exps.float()))


def _assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    assert bool(same.all()), f"{int((~same).sum())} mismatches, first at {(~same).nonzero()[0].tolist()}"


@pytest.mark.parametrize("shape", [(256, 512), (3, 130, 320)])
@pytest.mark.parametrize("block", [(1, 32), (128, 128), (1, 128)])
def test_random_mxfp4_repacks_exactly(shape, block):
    g = torch.Generator().manual_seed(0)
    packed, scale = quant_fp4_block(torch.randn(shape, generator=g) / 16)
    q, s, report = repack_mxfp4_to_fp8(packed, scale, block)
    assert q.dtype == torch.float8_e4m3fn and q.shape == shape and s.dtype == torch.float8_e8m0fnu
    assert report.exact and report.mismatches == 0 and report.lossy_blocks == 0 and report.calc_diff == 0.0
    _assert_bitwise_equal(dequant_fp8_block(q, s, block), dequant_fp4_block(packed, scale))
    assert verify_repack(packed, scale, q, s, block).mismatches == 0


def test_every_code_at_every_scale_is_exact_per_group():
    codes = torch.arange(16, dtype=torch.uint8).repeat(250, 2)  # [250, 32]: every nibble twice per group
    exps = torch.arange(-126, 124).unsqueeze(1)  # each row its own scale 2^-126 .. 2^123
    packed, scale = _mxfp4(codes, exps)
    for fmt in ("ue8m0", "fp32"):
        q, s, report = repack_mxfp4_to_fp8(packed, scale, (1, 32), scale_fmt=fmt)
        assert report.exact, report.summary()
        assert s.dtype == (torch.float8_e8m0fnu if fmt == "ue8m0" else torch.float32)


def _two_groups(a: int, b: int, small_code: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One 1x64 row: group 0 holds 4 (code 6) at scale 2^a, group 1 holds `small_code` at scale 2^b."""
    codes = torch.zeros(1, 64, dtype=torch.uint8)
    codes[0, 0], codes[0, 40] = 6, small_code
    return _mxfp4(codes, torch.tensor([[a, b]]))


@pytest.mark.parametrize("gap,small_code,exact", [
    (14, 1, True),  # 0.5 * 2^-14 is 17 binades below 4: the smallest e4m3 subnormal
    (15, 1, False),  # one binade further: below e4m3's range
    (15, 2, True),  # 1.0 (m = 1) may sit 17 binades below
    (14, 3, True),  # 1.5 (m = 1.5) may sit 16 binades below
    (15, 3, False),
])
def test_exactness_boundary_matches_the_binade_rule(gap, small_code, exact):
    packed, scale = _two_groups(0, -gap, small_code)
    if exact:
        assert repack_mxfp4_to_fp8(packed, scale, (1, 64))[2].exact
    else:
        with pytest.raises(LossyRepackError):
            repack_mxfp4_to_fp8(packed, scale, (1, 64))
        assert repack_mxfp4_to_fp8(packed, scale, (1, 32))[2].exact  # one scale per group: always exact


def test_adversarial_block_is_reported_and_refused():
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (256, 256), generator=g).to(torch.uint8)
    exps = torch.zeros(256, 8, dtype=torch.int64)
    exps[5, 1], exps[7, 0] = -20, 10  # 2^-20 next to 2^10 inside block (0, 0)
    exps[200, 6] = -40  # and block (1, 1) holds a group 40 binades below the rest
    packed, scale = _mxfp4(codes, exps)
    with pytest.raises(LossyRepackError, match=r"expert\.w1: MXFP4 -> FP8 128x128 is lossy: .* in 2/4 blocks") as e:
        repack_mxfp4_to_fp8(packed, scale, (128, 128), name="expert.w1")
    assert isinstance(e.value, CheckpointError)
    q, s, report = repack_mxfp4_to_fp8(packed, scale, (128, 128), allow_lossy=True)
    assert report.lossy_blocks == 2 and {b.index for b in report.worst} == {(0, 0), (1, 1)}
    worst = report.worst[0]
    assert worst.index == (0, 0) and 0 < worst.mismatches <= 32 and worst.max_rel_err == pytest.approx(1.0)
    # the loss is exactly the small group: everything else is bit-exact
    ref, new = dequant_fp4_block(packed, scale), dequant_fp8_block(q, s, (128, 128))
    changed = (ref != new).nonzero().tolist()
    assert {(r, c // 32) for r, c in changed} <= {(5, 1), (200, 6)}
    assert verify_repack(packed, scale, q, s, (128, 128)).mismatches == report.mismatches
    assert repack_mxfp4_to_fp8(packed, scale, (1, 32))[2].exact


def test_nan_scale_propagates_without_counting_as_loss():
    codes = torch.full((2, 64), 2, dtype=torch.uint8)
    packed, scale = _mxfp4(codes, torch.zeros(2, 2, dtype=torch.int64))
    scale.view(torch.uint8)[1, 1] = 255
    q, s, report = repack_mxfp4_to_fp8(packed, scale, (1, 32))
    out = dequant_fp8_block(q, s, (1, 32))
    assert torch.isnan(out[1, 32:]).all() and torch.isfinite(out[:, :32]).all() and report.exact


@pytest.mark.parametrize("block", [(128, 128), (1, 128), (32, 32)])
def test_quantize_bf16_to_fp8_report(block):
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(129, 257, generator=g) * 0.02).bfloat16()
    q, s, rep = quantize_bf16_to_fp8(w, block)
    so, si = -(-129 // block[0]), -(-257 // block[1])
    assert rep.max_abs_err.shape == rep.rms_err.shape == (so, si)
    d = dequant_fp8_block(q, s, block)
    err = (d - w.float()).abs()
    assert rep.calc_diff == pytest.approx(calc_diff(w.float(), d)) and 0 < rep.calc_diff < 1e-3
    for bo, bi in [(0, 0), (so - 1, si - 1)]:  # a full block and the ragged corner block
        e = err[bo * block[0]:(bo + 1) * block[0], bi * block[1]:(bi + 1) * block[1]]
        assert rep.max_abs_err[bo, bi].item() == e.max().item()
        assert rep.rms_err[bo, bi].item() == pytest.approx(e.double().square().mean().sqrt().item(), rel=1e-6)
    sf = e8m0_to_float(s).repeat_interleave(block[0], 0)[:129].repeat_interleave(block[1], 1)[:, :257]
    assert bool((err <= w.float().abs() / 16 + sf * 2.0**-10).all())
    assert "calc_diff" in rep.summary()


def test_quantize_representable_weight_is_lossless():
    q0, s0 = quant_fp8_block(torch.randn(64, 256))
    w = dequant_fp8_block(q0, s0).bfloat16()  # e4m3 * 2^k fits bf16 exactly
    _, _, rep = quantize_bf16_to_fp8(w)
    assert rep.calc_diff == 0.0 and float(rep.max_abs_err.max()) == 0.0

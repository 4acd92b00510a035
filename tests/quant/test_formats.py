"""Number formats: code points, rounding, UE8M0 scale rule, fake-quant, block codecs, reference linears."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from v4compile.quant.formats import (
    E2M1_GRID, decode_e2m1, dequant_fp4_block, dequant_fp8_block, e8m0_to_float, encode_e2m1,
    fake_quant_fp4, fake_quant_fp8, float_to_e8m0, fp4_linear_reference, fp8_linear_reference, infer_block,
    pack_fp4, quant_fp4_block, quant_fp8_act, quant_fp8_block, round_e2m1, round_e4m3, ue8m0_scale, unpack_fp4,
)
from v4compile.validate import calc_diff

E4M3_NAN_BYTES = (0x7F, 0xFF)


def _e4m3_bytes() -> torch.Tensor:
    b = torch.tensor([i for i in range(256) if i not in E4M3_NAN_BYTES], dtype=torch.uint8)
    return b


def _assert_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Bitwise-equal floats (NaN == NaN); on failure names the count, first coordinate and both values."""
    a, e = actual.float(), expected.float()
    same = (a == e) | (torch.isnan(a) & torch.isnan(e))
    if not bool(same.all()):
        bad = (~same).nonzero()
        i = tuple(bad[0].tolist())
        raise AssertionError(f"{what}: {len(bad)} mismatches, first at {i}: got {a[i].item()!r}, "
                             f"expected {e[i].item()!r}")


# ---------------------------------------------------------------------------------------------- e4m3


def test_every_e4m3_code_point_round_trips():
    b = _e4m3_bytes()
    v = b.view(torch.float8_e4m3fn).float()
    r = round_e4m3(v)
    _assert_equal(r, v, "round_e4m3 of code points")
    assert torch.equal(r.to(torch.float8_e4m3fn).view(torch.uint8), b)  # incl. the sign of zero
    # the whole codec path: one row holding every code point (amax 448 -> scale 1) keeps every byte
    q, s = quant_fp8_block(v[None, :], block=(1, v.numel()))
    assert e8m0_to_float(s).item() == 1.0
    assert torch.equal(q.view(torch.uint8)[0], b)
    _assert_equal(dequant_fp8_block(q, s)[0], v, "dequant of code points")
    _assert_equal(fake_quant_fp8(v, block=v.numel()), v, "fake_quant_fp8 of code points")


def test_round_e4m3_ties_to_even_and_saturates():
    v = torch.tensor(sorted(set(_e4m3_bytes().view(torch.float8_e4m3fn).float().tolist())))
    pos = v[v >= 0]
    mids = (pos[1:] + pos[:-1]) / 2  # exact in fp32
    r = round_e4m3(mids)
    lo_code = pos[:-1].to(torch.float8_e4m3fn).view(torch.uint8)
    want = torch.where(lo_code % 2 == 0, pos[:-1], pos[1:])
    _assert_equal(r, want, "e4m3 midpoints")
    _assert_equal(round_e4m3(-mids), -want, "negative e4m3 midpoints")
    sat = round_e4m3(torch.tensor([449.0, 1e30, float("inf"), -500.0, float("-inf"), float("nan")]))
    _assert_equal(sat, torch.tensor([448.0, 448.0, 448.0, -448.0, -448.0, float("nan")]), "e4m3 saturation")


# ---------------------------------------------------------------------------------------------- e2m1


def _e2m1_brute(x: float) -> float:
    """Nearest grid value, ties to the even code, saturating (independent of the implementation)."""
    a = min(abs(x), 6.0)
    best = min(range(8), key=lambda k: (abs(E2M1_GRID[k] - a), k % 2))
    return math.copysign(E2M1_GRID[best], x)


def test_every_e2m1_code_round_trips():
    codes = torch.arange(16, dtype=torch.uint8)
    v = decode_e2m1(codes)
    assert v.tolist() == [0, .5, 1, 1.5, 2, 3, 4, 6, -0.0, -.5, -1, -1.5, -2, -3, -4, -6]
    assert torch.signbit(v[8])
    assert torch.equal(encode_e2m1(v), codes)
    _assert_equal(round_e2m1(v), v, "round_e2m1 of code points")
    packed, s = quant_fp4_block(v[None, :].repeat(1, 2), block=32)  # amax 6 -> scale 1
    assert e8m0_to_float(s).item() == 1.0
    assert torch.equal(unpack_fp4(packed)[0], codes.repeat(2))


def test_round_e2m1_matches_brute_force_on_a_dense_sweep():
    grid = torch.tensor(E2M1_GRID)
    mids = (grid[1:] + grid[:-1]) / 2
    x = torch.cat([torch.linspace(-8, 8, 4001), mids, -mids, mids + 1e-6, mids - 1e-6, torch.tensor([7.0, -100.0])])
    want = torch.tensor([_e2m1_brute(t) for t in x.tolist()])
    _assert_equal(round_e2m1(x), want, "round_e2m1")
    nan = round_e2m1(torch.tensor([float("nan")]))
    assert torch.isnan(nan).all()


def test_pack_unpack_inverse_and_nibble_order():
    assert pack_fp4(torch.tensor([1, 2], dtype=torch.uint8)).view(torch.uint8).item() == 0x21
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (3, 5, 34), generator=g).to(torch.uint8)
    packed = pack_fp4(codes)
    assert packed.dtype == torch.int8 and packed.shape == (3, 5, 17)
    assert torch.equal(unpack_fp4(packed), codes)
    every_byte = torch.arange(256, dtype=torch.uint8).view(torch.int8)
    assert torch.equal(pack_fp4(unpack_fp4(every_byte)), every_byte)
    with pytest.raises(ValueError, match="even"):
        pack_fp4(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="0..15"):
        pack_fp4(torch.tensor([16, 0], dtype=torch.uint8))


# ---------------------------------------------------------------------------------------------- UE8M0


def _emulated_scale(amax: float, qmax: float, min_amax: float) -> float:
    """The section 14.4 rule through numpy float32 and math.frexp (no bit tricks)."""
    r = float(np.float32(max(np.float32(amax), np.float32(min_amax))) * np.float32(1.0 / qmax))
    m, e = math.frexp(r)  # r = m * 2^e, m in [0.5, 1)
    return 2.0 ** (e - 1) if m == 0.5 else 2.0**e


def _neighbourhood(center: float, n: int = 3) -> list[float]:
    c = np.float32(center)
    out = [c]
    up, dn = c, c
    for _ in range(n):
        up, dn = np.nextafter(up, np.float32(np.inf)), np.nextafter(dn, np.float32(0))
        out += [up, dn]
    return [float(v) for v in out]


@pytest.mark.parametrize("qmax,min_amax", [(448.0, 1e-4), (6.0, 6.0 * 2.0**-126), (7.0, 1e-4), (3.0, 1e-4)])
def test_ue8m0_scale_matches_the_float32_rule(qmax, min_amax):
    g = torch.Generator().manual_seed(1)
    rand = (torch.rand(2000, generator=g) * 60 - 30).exp2() * torch.rand(2000, generator=g)
    edges = [v for k in range(-20, 21) for v in _neighbourhood(qmax * 2.0**k)]
    amax = torch.cat([rand, torch.tensor(edges), torch.tensor([0.0, min_amax, 1e-30])])
    got = ue8m0_scale(amax, qmax, min_amax)
    want = torch.tensor([_emulated_scale(a, qmax, min_amax) for a in amax.tolist()])
    _assert_equal(got, want, f"ue8m0_scale qmax={qmax}")
    # exact rational ceil(log2(amax/qmax)) differs only within one ulp of qmax * 2^k
    for a, s in zip(amax.tolist(), got.tolist()):
        exact = Fraction(max(a, float(np.float32(min_amax)))) / Fraction(qmax)
        k = math.ceil(math.log2(exact))
        k = k - 1 if Fraction(2) ** (k - 1) >= exact else (k + 1 if Fraction(2) ** k < exact else k)
        if s != 2.0**k:
            ulp = float(np.spacing(np.float32(a)))
            assert min(abs(a - qmax * 2.0**j) for j in (k - 1, k)) <= ulp, (a, s, 2.0**k)


def test_ue8m0_scale_boundaries_zeros_and_non_finite():
    for k in (-10, 0, 3):
        below, at = np.nextafter(np.float32(448 * 2.0**k), np.float32(0)), np.float32(448 * 2.0**k)
        above = np.nextafter(at, np.float32(np.inf))
        got = ue8m0_scale(torch.tensor([below, at, above]), 448.0, 1e-4).tolist()
        assert got == [2.0**k, 2.0**k, 2.0 ** (k + 1)]
    assert ue8m0_scale(torch.zeros(1), 448.0, 1e-4).item() == 2.0**-22  # 1e-4/448 = 2.2e-7 <= 2^-22
    assert ue8m0_scale(torch.zeros(1), 6.0, 6.0 * 2.0**-126).item() == 2.0**-126
    assert torch.isnan(ue8m0_scale(torch.tensor([float("nan"), float("inf")]), 448.0, 1e-4)).all()
    with pytest.raises(ValueError, match="min_amax"):
        ue8m0_scale(torch.ones(1), 448.0, 0.0)


def test_e8m0_bytes_decode_and_encode():
    b = torch.arange(256, dtype=torch.uint8)
    f = e8m0_to_float(b.view(torch.float8_e8m0fnu))
    want = torch.tensor([2.0 ** (i - 127) for i in range(255)] + [float("nan")])
    _assert_equal(f, want, "e8m0 decode")
    _assert_equal(f, b.view(torch.float8_e8m0fnu).float(), "e8m0 decode vs torch's cast")
    assert torch.equal(float_to_e8m0(f).view(torch.uint8), b)  # NaN -> 255
    for bad in (0.0, 3.0, -2.0, float("inf"), 2.0**-128):
        with pytest.raises(ValueError, match="powers of two"):
            float_to_e8m0(torch.tensor([1.0, bad]))


# ---------------------------------------------------------------------------------------------- fake quant


def _fake_quant_loop(x: torch.Tensor, block: int, qmax: float, min_amax: float, rnd) -> torch.Tensor:
    """Block by block with Python scalars for the scale (checks the vectorised padding/reshape)."""
    out = torch.empty_like(x, dtype=torch.float32)
    rows = x.float().reshape(-1, x.shape[-1])
    flat = out.view(-1, x.shape[-1])
    for r in range(rows.shape[0]):
        for c in range(0, x.shape[-1], block):
            blk = rows[r, c:c + block]
            s = _emulated_scale(blk.abs().max().item(), qmax, min_amax)
            flat[r, c:c + block] = rnd(torch.clamp(blk / s, -qmax, qmax)) * s
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,block", [((3, 448), 64), ((2, 5, 100), 64), ((7, 130), 32), ((1, 1), 64)])
def test_fake_quant_fp8_against_loop_bounds_and_idempotence(shape, block, dtype):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) * 20 - 10).exp2()).to(dtype)
    y = fake_quant_fp8(x, block)
    assert y.dtype == dtype and y.shape == x.shape
    _assert_equal(y, _fake_quant_loop(x, block, 448.0, 1e-4, round_e4m3).to(dtype), "fake_quant_fp8 vs loop")
    _assert_equal(fake_quant_fp8(y, block), y, "fake_quant_fp8 idempotent")
    xf = x.float()
    s = ue8m0_scale(torch.ones(1) * xf.abs().max(), 448.0, 1e-4)  # largest scale of any block
    assert bool(((y.float() - xf).abs() <= xf.abs() * 2.0**-4 + s * 2.0**-10).all())


@pytest.mark.parametrize("shape,block", [((3, 128), 32), ((2, 4, 70), 32), ((5, 64), 16)])
def test_fake_quant_fp4_against_loop_bounds_and_idempotence(shape, block):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) * 10 - 5).exp2()
    y = fake_quant_fp4(x, block)
    _assert_equal(y, _fake_quant_loop(x, block, 6.0, 6.0 * 2.0**-126, round_e2m1), "fake_quant_fp4 vs loop")
    _assert_equal(fake_quant_fp4(y, block), y, "fake_quant_fp4 idempotent")
    s = ue8m0_scale(torch.ones(1) * x.abs().max(), 6.0, 6.0 * 2.0**-126)
    assert bool(((y - x).abs() <= x.abs() / 4 + s / 4).all())
    assert torch.all(fake_quant_fp4(torch.zeros(2, 32)) == 0)


def test_fake_quant_propagates_nan_to_its_block_only():
    x = torch.ones(2, 128)
    x[0, 5] = float("nan")
    y = fake_quant_fp8(x, 64)
    assert torch.isnan(y[0, :64]).all() and torch.isfinite(y[0, 64:]).all() and torch.isfinite(y[1]).all()


# ---------------------------------------------------------------------------------------------- block codecs


@pytest.mark.parametrize("shape", [(129, 257), (2, 129, 257), (1, 1), (256, 128)])
@pytest.mark.parametrize("block", [(128, 128), (1, 128), (32, 16)])
@pytest.mark.parametrize("fmt", ["ue8m0", "fp32"])
def test_fp8_block_quant_dequant(shape, block, fmt):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) * 8 - 4).exp2()
    q, s = quant_fp8_block(w, block, scale_fmt=fmt)
    O, I = shape[-2:]
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.shape == (*shape[:-2], -(-O // block[0]), -(-I // block[1]))
    assert s.dtype == (torch.float8_e8m0fnu if fmt == "ue8m0" else torch.float32)
    d = dequant_fp8_block(q, s, block)
    sf = e8m0_to_float(s) if fmt == "ue8m0" else s
    s_el = sf.repeat_interleave(block[0], -2)[..., :O, :].repeat_interleave(block[1], -1)[..., :I]
    err_bound = w.abs() * 2.0**-4 * (1 + 1e-6) + s_el * 2.0**-10
    assert bool(((d - w).abs() <= err_bound).all()), (d - w).abs().max()
    # every block's largest code is at the top of the e4m3 range: ue8m0 in [224, 448] (amax/s > 224 may round down to 224), fp32 exactly 448
    qa = q.float().abs().reshape(-1, O, I)
    for b in range(qa.shape[0]):
        for r in range(0, O, block[0]):
            for c in range(0, I, block[1]):
                top = qa[b, r:r + block[0], c:c + block[1]].max().item()
                assert (top == 448.0) if fmt == "fp32" else (224.0 <= top <= 448.0), (b, r, c, top)
    # re-quantising the dequantised weight reproduces its values (ue8m0: a block whose top rounded
    # down to 224 gets half the scale, so bytes may differ while values cannot)
    if fmt == "ue8m0":
        _assert_equal(dequant_fp8_block(*quant_fp8_block(d, block), block), d, "re-quantisation")
    if block == (128, 128) and fmt == "ue8m0":
        _assert_equal(dequant_fp8_block(q, s), d, "dequant with the block inferred")


def test_fp8_block_scales_match_per_block_loop():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(129, 257, generator=g) * 3
    q, s = quant_fp8_block(w, (128, 128))
    sf = e8m0_to_float(s)
    for bo in range(2):
        for bi in range(3):
            blk = w[bo * 128:(bo + 1) * 128, bi * 128:(bi + 1) * 128]
            assert sf[bo, bi].item() == _emulated_scale(blk.abs().max().item(), 448.0, 1e-4)
            want = round_e4m3(blk / sf[bo, bi])
            _assert_equal(q[bo * 128:(bo + 1) * 128, bi * 128:(bi + 1) * 128].float(), want, f"block {bo},{bi}")


def test_e8m0_nan_scale_poisons_exactly_its_block():
    w = torch.randn(200, 300)
    q, s = quant_fp8_block(w)
    s.view(torch.uint8)[1, 0] = 255
    d = dequant_fp8_block(q, s)
    assert torch.isnan(d[128:, :128]).all()
    assert torch.isfinite(d[:128]).all() and torch.isfinite(d[128:, 128:]).all()
    w[3, 250] = float("nan")  # NaN weight -> NaN scale byte in its block
    _, s2 = quant_fp8_block(w)
    assert s2.view(torch.uint8)[0, 1].item() == 255 and (s2.view(torch.uint8) != 255).sum() == 5


@pytest.mark.parametrize("shape", [(129, 256), (3, 7, 258), (1, 32)])
def test_fp4_block_quant_dequant(shape):
    g = torch.Generator().manual_seed(6)
    w = torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) * 6 - 3).exp2()
    packed, s = quant_fp4_block(w, 32)
    O, I = shape[-2:]
    assert packed.dtype == torch.int8 and packed.shape == (*shape[:-1], I // 2)
    assert s.dtype == torch.float8_e8m0fnu and s.shape == (*shape[:-1], -(-I // 32))
    d = dequant_fp4_block(packed, s)
    s_el = e8m0_to_float(s).repeat_interleave(32, -1)[..., :I]
    assert bool(((d - w).abs() <= w.abs() / 4 + s_el / 4).all())
    _assert_equal(d, fake_quant_fp4(w, 32), "MXFP4 dequant == fake-quant FP4")
    p2, s2 = quant_fp4_block(d, 32)
    _assert_equal(dequant_fp4_block(p2, s2), d, "MXFP4 re-quantisation")
    # spot-check the V4-SPEC 12.3 decoding formula on raw bytes
    raw, sb = packed.view(torch.uint8).reshape(-1, I // 2), s.view(torch.uint8).reshape(-1, s.shape[-1])
    for o, i in [(0, 0), (0, 1), (raw.shape[0] - 1, I - 1), (0, I // 2 + 1)]:
        byte = raw[o, i // 2].item()
        nib = byte & 0xF if i % 2 == 0 else byte >> 4
        val = (-1) ** (nib >> 3) * E2M1_GRID[nib & 7] * 2.0 ** (sb[o, i // 32].item() - 127)
        assert d.reshape(-1, I)[o, i].item() == val


def test_infer_block_and_shape_errors():
    assert infer_block(129, 2) == 128 and infer_block(256, 2) == 128 and infer_block(100, 1) == 100
    assert infer_block(258, 9) == 32 and infer_block(5, 5) == 1
    with pytest.raises(ValueError, match="power-of-two"):
        infer_block(300, 7)
    q, s = quant_fp8_block(torch.randn(129, 257))
    with pytest.raises(ValueError, match="does not fit"):
        dequant_fp8_block(q, s, block=(64, 128))
    with pytest.raises(ValueError, match="scale_fmt"):
        quant_fp8_block(torch.randn(4, 4), scale_fmt="e5m6")
    with pytest.raises(ValueError, match="even"):
        quant_fp4_block(torch.randn(4, 31))


def test_quant_fp8_act():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 300, generator=g).bfloat16()
    q, s = quant_fp8_act(x, 128)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (2, 3, 3)
    deq = q.float() * s.repeat_interleave(128, -1)[..., :300]
    _assert_equal(deq, fake_quant_fp8(x.float(), 128), "activation quant == fake-quant FP8(128)")


# ---------------------------------------------------------------------------------------------- linears


def test_fp8_linear_reference_equals_block_formulation():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(5, 384, generator=g).bfloat16()
    w = torch.randn(200, 384, generator=g) / 20
    wq, ws = quant_fp8_block(w)
    y = fp8_linear_reference(x, wq, ws)
    assert y.dtype == torch.bfloat16 and y.shape == (5, 200)
    xq, xs = quant_fp8_act(x, 128)
    wsf = e8m0_to_float(ws)
    acc = torch.zeros(5, 200, dtype=torch.float64)
    for k in range(3):  # sum over K blocks of (q_x . q_w) * act_scale * w_scale
        part = xq[:, k * 128:(k + 1) * 128].double() @ wq[:, k * 128:(k + 1) * 128].double().T
        acc += part * xs[:, k:k + 1].double() * wsf[:, k].repeat_interleave(128)[:200].double()[None, :]
    y32 = fp8_linear_reference(x, wq, ws, out_dtype=torch.float32)
    assert torch.allclose(y32.double(), acc, rtol=1e-5, atol=1e-5)
    assert calc_diff(y32, x.float() @ w.T) < 1e-3


def test_fp4_linear_reference():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(4, 256, generator=g)
    w = torch.randn(96, 256, generator=g) / 16
    wp, ws = quant_fp4_block(w)
    y = fp4_linear_reference(x, wp, ws)
    assert y.dtype == torch.float32 and y.shape == (4, 96)
    want = fake_quant_fp8(x, 128).double() @ dequant_fp4_block(wp, ws).double().T
    assert torch.allclose(y.double(), want, rtol=1e-5, atol=1e-5)
    assert calc_diff(y, x @ w.T) < 2e-2  # e2m1 weights: ~1% relative error
    with pytest.raises(ValueError, match="does not fit"):
        fp4_linear_reference(x[:, :128], wp, ws)

"""The graph-safe KV codecs (quant/kv_layout.py pack_kv_rows / pack_index_rows and their inverses) give the
bytes and values of the strict reference encoders, also for zero blocks, signed zeros and tiny scales, and
survive torch.export with symbolic sizes."""

import pytest
import torch

from v4compile.quant.formats import fake_quant_fp4, fake_quant_fp8
from v4compile.quant.kv_layout import (pack_index_keys, pack_index_rows, pack_kv_cache, pack_kv_rows,
                                       unpack_index_keys, unpack_index_rows, unpack_kv_cache, unpack_kv_rows)


def kv_rows(shape, rope_dim, seed=0):
    """bf16 rows as the reference stores them, magnitudes 1e-9 .. 1e4 by row, with awkward blocks."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * torch.logspace(-9, 4, shape[-2]).view(-1, 1)
    nope = shape[-1] - rope_dim
    x = torch.cat((fake_quant_fp8(x[..., :nope], 64), x[..., nope:]), -1).to(torch.bfloat16)
    x[0, :64] = 0.0  # all-zero block: the amax floor's scale
    x[1, :nope] = -0.0  # negative zeros in every nope block
    x[1, nope:] = -0.0  # and in the RoPE part
    x[2, :64] = fake_quant_fp8(torch.linspace(-2e-3, 2e-3, 64) * 2.0 ** -12, 64).to(torch.bfloat16)  # e4m3 subnormals
    return x


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16) if x.dtype == torch.bfloat16 else x.view(torch.int32)


@pytest.mark.parametrize("shape", [(9, 512), (5, 192)])
def test_kv_rows_equal_the_strict_encoder_at_rope_64(shape):
    x = kv_rows(shape, 64)
    data, scales = pack_kv_rows(x)
    want_data, want_scales = pack_kv_cache(x)  # strict: x is exactly representable
    assert data.dtype == scales.dtype == torch.uint8
    assert torch.equal(data, want_data) and torch.equal(scales, want_scales)
    for dtype in (torch.bfloat16, torch.float32):
        got, want = unpack_kv_rows(data, scales, dtype=dtype), unpack_kv_cache(data, scales, dtype)
        assert torch.equal(bits(got), bits(want)) and torch.equal(bits(got.to(torch.bfloat16)), bits(x))


def test_kv_rows_of_values_off_the_grid_equal_the_lossy_encoder():
    x = torch.randn(7, 512, generator=torch.Generator().manual_seed(1)) * 37.0
    assert all(torch.equal(a, b) for a, b in zip(pack_kv_rows(x), pack_kv_cache(x, strict=False)))


@pytest.mark.parametrize("width,rope_dim", [(96, 32), (160, 32), (136, 8)])
def test_kv_rows_of_other_rope_widths_round_trip_bit_exactly(width, rope_dim):
    x = kv_rows((6, width), rope_dim, seed=2)
    data, scales = pack_kv_rows(x, rope_dim)
    nope = width - rope_dim
    assert data.shape == (6, nope + 2 * rope_dim) and scales.shape == (6, 8)
    assert torch.equal(scales[:, nope // 64:], torch.zeros(6, 8 - nope // 64, dtype=torch.uint8))
    assert torch.equal(data[:, nope:].contiguous().view(torch.bfloat16), x[:, nope:])  # bf16, little-endian
    assert torch.equal(bits(unpack_kv_rows(data, scales, rope_dim)), bits(x))


@pytest.mark.parametrize("width,rope_dim", [(96, 64), (64, 64), (640, 64), (96, 0)])
def test_kv_rows_refuse_widths_the_layout_cannot_hold(width, rope_dim):
    with pytest.raises(ValueError, match="kv layout"):
        pack_kv_rows(torch.zeros(2, width), rope_dim)


def index_keys(n, di, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n, di, generator=g) * torch.logspace(-6, 6, n).view(-1, 1)
    k = fake_quant_fp4(k, 32)
    k[0, :32] = 0.0
    k[1, :] = -0.0
    k[2, :32] = torch.tensor([6.0, -0.5] * 16) * 2.0 ** -126  # smallest scale: values 2^-127 are fp32 subnormals
    return k


@pytest.mark.parametrize("di", [64, 128])
def test_index_rows_equal_the_strict_encoder(di):
    k = index_keys(11, di)
    codes, scales = pack_index_rows(k)
    want_codes, want_scales = pack_index_keys(k)
    assert torch.equal(codes, want_codes) and torch.equal(scales, want_scales)
    assert int(scales.min()) == 1  # the 2^-126 block is there
    for dtype in (torch.float32, torch.bfloat16):
        got = unpack_index_rows(codes, scales, dtype)
        assert torch.equal(bits(got), bits(unpack_index_keys(codes, scales, dtype)))
    assert torch.equal(bits(unpack_index_rows(codes, scales, torch.float32)), bits(k))


def test_index_rows_off_the_grid_and_non_finite_equal_the_lossy_encoder():
    k = torch.randn(5, 128, generator=torch.Generator().manual_seed(3))
    k[4, 3] = float("nan")
    got, want = pack_index_rows(k), pack_index_keys(k, strict=False)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and int(got[1][4, 0]) == 255


def test_codecs_export_with_symbolic_rows_and_match_eager():
    class RoundTrip(torch.nn.Module):
        def forward(self, kv, k):
            data, sc = pack_kv_rows(kv, 32)
            codes, ks = pack_index_rows(k)
            return data, sc, unpack_kv_rows(data, sc, 32), codes, ks, unpack_index_rows(codes, ks, torch.float32)

    kv, k = kv_rows((6, 96), 32, seed=4), index_keys(6, 64, seed=4)
    n = torch.export.Dim("n", min=2, max=64)
    ep = torch.export.export(RoundTrip(), (kv, k), dynamic_shapes=({0: n}, {0: n}))
    kv2, k2 = kv_rows((9, 96), 32, seed=5), index_keys(9, 64, seed=5)
    for got, want in zip(ep.module()(kv2, k2), RoundTrip()(kv2, k2)):
        if got.is_floating_point():
            got, want = bits(got), bits(want)
        assert torch.equal(got, want)

"""Packed FP4 indexer keys (V4-SPEC 6.2: 68 B per key) are an exact re-encoding of the reference's keys."""

import math

import pytest
import torch

from v4compile.model.config import ModelConfig
from v4compile.model.kv_bytes import index_entry_bytes
from v4compile.quant.formats import E2M1_GRID, fake_quant_fp4, quant_fp4_block
from v4compile.quant.kv_layout import index_key_bytes, pack_index_keys, unpack_index_keys

SCALE_BYTES = (1, 2, 60, 126, 127, 128, 129, 200, 252)  # 2^-126 (the rule's floor) .. 2^125


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16) if x.dtype == torch.bfloat16 else x.view(torch.int32)


def _every_byte(scale_byte: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys of one 32-dim block each covering all 256 code bytes, each block holding a +-6 (so the
    re-encoded scale is the given one): 18 keys x 16 bytes, byte 0 = 0x77 (6, 6)."""
    vals = torch.arange(256, dtype=torch.uint8)
    rows = []
    for r in range(0, 256, 15):
        chunk = vals[r:r + 15]
        rows.append(torch.cat((torch.tensor([0x77], dtype=torch.uint8), chunk,
                               torch.zeros(15 - chunk.numel(), dtype=torch.uint8))))
    codes = torch.stack(rows)
    return codes, torch.full((codes.shape[0], 1), scale_byte, dtype=torch.uint8)


def test_bytes_per_key_match_the_spec():
    assert index_key_bytes(128) == 68
    flash = ModelConfig.preset("flash")
    assert index_key_bytes(flash.index_head_dim) == index_entry_bytes(flash, "production") == 68
    c, s = pack_index_keys(torch.zeros(2, 3, 128))
    assert c.shape == (2, 3, 64) and s.shape == (2, 3, 4) and c.dtype == s.dtype == torch.uint8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sb", SCALE_BYTES)
def test_every_code_point_round_trips_bit_exactly(sb, dtype):
    codes, scales = _every_byte(sb)
    x = unpack_index_keys(codes, scales, dtype)
    assert x.dtype == dtype and bool(torch.isfinite(x).all())
    # the decoded values are the grid points times the scale, signed zeros included
    mag = torch.tensor(E2M1_GRID)[(codes[:, 1:] & 7).long()] * 2.0 ** (sb - 127)
    lo = x.float().unflatten(-1, (16, 2))[:, 1:, 0]
    assert torch.equal(lo.abs(), mag) and torch.equal(torch.signbit(lo), (codes[:, 1:] & 8) != 0)
    c2, s2 = pack_index_keys(x)
    assert torch.equal(c2, codes) and torch.equal(s2, scales)  # same bytes back
    assert torch.equal(_bits(unpack_index_keys(c2, s2, dtype)), _bits(x))


@pytest.mark.parametrize("sb", [1, 127, 200])
def test_blocks_below_full_range_rescale_exactly(sb):
    """A block whose largest code is < 6 gets a smaller scale on re-encoding; the values stay bit-exact."""
    codes, scales = _every_byte(sb)
    codes = codes & 0x33  # magnitudes <= 1.5: amax 1.5 s -> scale s / 4
    x = unpack_index_keys(codes, scales, torch.float32)
    c2, s2 = pack_index_keys(x)
    assert int(s2.max()) <= max(sb - 2, 1)
    assert torch.equal(_bits(unpack_index_keys(c2, s2, torch.float32)), _bits(x))


def test_same_bytes_as_the_mxfp4_weight_codec():
    """Indexer keys and MXFP4 weights share the block rule and the nibble order (low nibble = even dim)."""
    x = fake_quant_fp4(torch.randn(7, 128) * torch.logspace(-6, 3, 7).unsqueeze(-1), 32)
    c, s = pack_index_keys(x)
    wc, ws = quant_fp4_block(x, 32)
    assert torch.equal(c, wc.view(torch.uint8)) and torch.equal(s, ws.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gain", [2.0**-40, 1.0, 2.0**40])
def test_real_keys_of_the_tiny_models_indexer_compressor(dtype, gain):
    """Keys as the reference writes them: v4::compress with rotate=True (RMSNorm, RoPE, Hadamard, FP4) at the
    tiny preset's indexer widths, a prefill then decode steps; norm weights x gain reach tiny and huge scales."""
    from v4compile.model.ops import BODIES
    from v4compile.model.rope import layer_inv_freq

    cfg = ModelConfig.preset("tiny")
    Di, B, T = cfg.index_head_dim, 2, 41
    g = torch.Generator().manual_seed(0)
    norm_w = ((1 + 0.1 * torch.randn(Di, generator=g)) * gain).to(dtype)
    inv_freq = layer_inv_freq(cfg, cfg.compress_ratios.index(4))  # a CSA layer's frequencies
    state = [torch.zeros(B, 8, 2 * Di), torch.full((B, 8, 2 * Di), float("-inf"))]
    cache = torch.zeros(B, T // 4 + 2, Di, dtype=dtype)
    ape = torch.randn(4, 2 * Di, generator=g)
    for start, n in ((0, T - 3), (T - 3, 1), (T - 2, 1), (T - 1, 1)):  # prefill, then three decode steps
        kv, gate = torch.randn(B, n, 2 * Di, generator=g), torch.randn(B, n, 2 * Di, generator=g)
        BODIES["compress"](kv, gate, ape, norm_w, inv_freq, torch.full((B,), start), *state, cache, 4,
                           cfg.norm_eps, True)
    keys = cache[:, :-1]
    assert bool(keys[:, :10].abs().sum(-1).gt(0).all())  # 41 tokens: 10 complete blocks written
    c, s = pack_index_keys(keys)
    assert c.shape[-1] == Di // 2 and s.shape[-1] == Di // 32
    assert abs(int(s[:, :10].float().mean()) - (127 + round(math.log2(gain)))) <= 3  # the gain moved the scales
    assert torch.equal(_bits(unpack_index_keys(c, s, dtype)), _bits(keys))


def test_strict_rejects_off_grid_and_non_finite_values():
    x = fake_quant_fp4(torch.randn(4, 64), 32)
    x[1, 5] = 0.3 * x[1].abs().max()  # between grid points of its block
    with pytest.raises(ValueError, match="1 values are not e2m1"):
        pack_index_keys(x)
    y = fake_quant_fp4(torch.randn(2, 64), 32)
    y[0, 40] = float("nan")
    with pytest.raises(ValueError, match="not e2m1"):
        pack_index_keys(y)
    c, s = pack_index_keys(y, strict=False)  # NaN poisons exactly its block (scale byte 255)
    assert s[0, 1] == 255 and s[0, 0] != 255
    back = unpack_index_keys(c, s, torch.float32)
    assert bool(back[0, 32:].isnan().all()) and torch.equal(back[0, :32], y[0, :32]) and torch.equal(back[1], y[1])


@pytest.mark.parametrize("bad,match", [
    (lambda: pack_index_keys(torch.zeros(3, 48)), "multiple of 32"),
    (lambda: unpack_index_keys(torch.zeros(3, 64, dtype=torch.int8), torch.zeros(3, 4, dtype=torch.uint8)),
     "uint8"),
    (lambda: unpack_index_keys(torch.zeros(3, 64, dtype=torch.uint8), torch.zeros(3, 2, dtype=torch.uint8)),
     "do not fit"),
    (lambda: unpack_index_keys(torch.zeros(3, 8, dtype=torch.uint8), torch.zeros(3, 1, dtype=torch.uint8)),
     "multiple of 32"),
])
def test_shape_and_dtype_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()

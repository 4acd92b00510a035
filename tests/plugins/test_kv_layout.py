"""The 584-byte production KV entry (V4-SPEC 6.2) is an exact re-encoding of the reference's KV rows."""

import pytest
import torch

from v4compile.quant.formats import fake_quant_fp8
from v4compile.quant.kv_layout import (decode_kv_entries, encode_kv_entries, entry_bytes, pack_kv_cache,
                                       unpack_kv_cache)


def model_kv(shape, seed=0, dtype=torch.bfloat16):
    """Rows as the reference stores them: FP8 fake-quantised nope part (block 64), RoPE part in bf16."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x = x * torch.logspace(-7, 4, shape[-2]).view(*([1] * (len(shape) - 2)), -1, 1)  # tiny .. huge rows
    nope = shape[-1] - 64
    return torch.cat((fake_quant_fp8(x[..., :nope], 64), x[..., nope:].to(torch.bfloat16).float()), -1).to(dtype)


def test_entry_is_584_bytes_at_v4():
    assert entry_bytes(512) == 584
    assert encode_kv_entries(model_kv((3, 512))).shape == (3, 584)


@pytest.mark.parametrize("shape", [(2, 7, 512), (1, 33, 128), (5, 192)])
def test_decode_encode_is_bit_exact(shape):
    x = model_kv(shape)
    x[..., 0, :64] = 0.0  # an all-zero block (amax floor)
    x[..., 0, 64] = -0.0
    y = decode_kv_entries(encode_kv_entries(x), shape[-1])
    assert y.dtype == torch.bfloat16
    assert torch.equal(y.view(torch.int16), x.view(torch.int16))  # bit-exact, signed zeros included


def test_float32_rows_round_trip_exactly():
    x = model_kv((4, 512), dtype=torch.float32)
    assert torch.equal(decode_kv_entries(encode_kv_entries(x), 512, torch.float32), x)


def test_byte_layout_matches_spec():
    x = model_kv((6, 512))
    e = encode_kv_entries(x)
    nope = x[:, :448].float().unflatten(-1, (7, 64))
    s = 2.0 ** (e[:, 576:583].float() - 127)  # UE8M0 exponents, one per 64 nope channels
    assert torch.equal(e[:, :448].view(torch.float8_e4m3fn).float().unflatten(-1, (7, 64)) * s[..., None], nope)
    assert torch.equal(e[:, 448:576].contiguous().view(torch.bfloat16), x[:, 448:])  # RoPE dims, bf16 LE
    assert torch.equal(e[:, 583], torch.zeros(6, dtype=torch.uint8))  # pad byte
    assert (e[:, 448:576].contiguous().view(torch.int16) == x[:, 448:].view(torch.int16)).all()


def test_pack_unpack_split_form():
    x = model_kv((2, 9, 512))
    data, scales = pack_kv_cache(x)
    assert data.shape == (2, 9, 576) and scales.shape == (2, 9, 8) and data.is_contiguous()
    assert torch.equal(torch.cat((data, scales), -1), encode_kv_entries(x))
    assert torch.equal(unpack_kv_cache(data, scales).view(torch.int16), x.view(torch.int16))


def test_strict_rejects_rows_that_are_not_fake_quantised():
    x = torch.randn(3, 512)
    with pytest.raises(ValueError, match="not on the e4m3 grid"):
        encode_kv_entries(x)
    encode_kv_entries(x, strict=False)  # lossy on purpose when asked


@pytest.mark.parametrize("bad", [(100,), (64,), (640,)])
def test_unsupported_head_dims(bad):
    with pytest.raises(ValueError, match="head_dim"):
        entry_bytes(bad[0])

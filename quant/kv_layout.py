"""Production KV layout (V4-SPEC section 6.2): an exact re-encoding of the reference's fake-quantised KV rows.

One entry of head dim D = nope + 64 (512 at V4: nope 448) is stored in  nope + 128 + 8  bytes (584 at V4):

    bytes [0, nope)             e4m3 codes of the nope channels (one UE8M0 scale per 64 channels)
    bytes [nope, nope + 128)    the 64 RoPE channels as bf16 (little-endian), unquantised
    bytes [nope + 128, +nope/64) UE8M0 scale exponents (2^(byte - 127)), then zero padding to 8 bytes

`encode_kv_entries` / `decode_kv_entries` work on that interleaved entry. The attention kernel reads the same
bytes split in two arrays (`pack_kv_cache`): the 576-byte data parts (64-byte aligned rows, as FlashMLA's paged
blocks keep them) and the 8 scale bytes per entry. Encoding is exact only for rows that are already
fake-quantised (`fake_quant_fp8(x[..., :nope], 64)` with bf16 RoPE values): `strict=True` checks it.
Indexer keys have their own packed layout (`pack_index_keys` / `unpack_index_keys`, at the end of this file).
"""

from __future__ import annotations

import torch

from v4compile.quant.formats import (E2M1_MAX, E4M3_MAX, FP4_MIN_AMAX, decode_e2m1, e8m0_to_float, encode_e2m1,
                                     pack_fp4, ue8m0_scale, unpack_fp4)

BLOCK = 64  # nope channels per UE8M0 scale (the reference's fake-quant block)
ROPE_DIM = 64
SCALE_BYTES = 8  # 7 scales + 1 pad at V4; this layout supports up to 8 nope blocks (D <= 576)
MIN_AMAX = 1e-4  # the fake-quant rule's amax floor (V4-SPEC section 0)


def entry_bytes(head_dim: int) -> int:
    """Bytes per entry: 584 for head_dim 512."""
    nope = _nope(head_dim)
    return nope + 2 * ROPE_DIM + SCALE_BYTES


def row_bytes(width: int, rope_dim: int = ROPE_DIM, index_key: bool = False) -> tuple[int, int]:
    """(data bytes, scale bytes) of one row of the split production layout (model/cache.py): a KV entry of `width`
    dims = e4m3 nope + bf16 RoPE (width + rope_dim bytes) and SCALE_BYTES; an indexer key = packed e2m1 (width / 2)
    and one UE8M0 byte per INDEX_BLOCK dims."""
    return (width // 2, width // INDEX_BLOCK) if index_key else (width + rope_dim, SCALE_BYTES)


def _nope(head_dim: int) -> int:
    nope = head_dim - ROPE_DIM
    if nope <= 0 or nope % BLOCK != 0 or nope // BLOCK > SCALE_BYTES:
        raise ValueError(f"kv layout: head_dim must be 64 * n + 64 with 1 <= n <= {SCALE_BYTES}, got {head_dim}")
    return nope


def encode_kv_entries(x: torch.Tensor, strict: bool = True) -> torch.Tensor:
    """x [..., D] (fake-quantised nope, bf16-representable RoPE) -> uint8 [..., entry_bytes(D)]."""
    D = x.shape[-1]
    nope = _nope(D)
    nb = nope // BLOCK
    xf = x.float()
    blocks = xf[..., :nope].unflatten(-1, (nb, BLOCK))  # [..., nb, 64]
    s = ue8m0_scale(blocks.abs().amax(-1), E4M3_MAX, MIN_AMAX)  # [..., nb] powers of two
    v = blocks / s.unsqueeze(-1)
    codes = v.to(torch.float8_e4m3fn)
    rope = xf[..., nope:].to(torch.bfloat16)
    if strict:
        bad = (codes.float() != v) | ~torch.isfinite(v)
        bad_rope = rope.float() != xf[..., nope:]
        if bool(bad.any()) or bool(bad_rope.any()):
            raise ValueError(f"encode_kv_entries: {int(bad.sum())} nope values are not on the e4m3 grid of their "
                             f"block scale and {int(bad_rope.sum())} RoPE values are not bf16 (fake-quantise first)")
    exps = ((s.view(torch.int32) >> 23) & 0xFF).to(torch.uint8)  # normal powers of two: the exponent byte
    pad = torch.zeros(*exps.shape[:-1], SCALE_BYTES - nb, dtype=torch.uint8, device=x.device)
    return torch.cat((codes.flatten(-2).view(torch.uint8), rope.contiguous().view(torch.uint8), exps, pad), -1)


def decode_kv_entries(entries: torch.Tensor, head_dim: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """uint8 [..., entry_bytes(head_dim)] -> [..., head_dim] in `dtype` (exact for bf16 and float32)."""
    nope = _nope(head_dim)
    if entries.dtype != torch.uint8 or entries.shape[-1] != entry_bytes(head_dim):
        raise ValueError(f"decode_kv_entries: expected uint8 [..., {entry_bytes(head_dim)}], "
                         f"got {entries.dtype} {tuple(entries.shape)}")
    data, scales = entries[..., : nope + 2 * ROPE_DIM], entries[..., nope + 2 * ROPE_DIM:]
    return unpack_kv_cache(data, scales, dtype)


def pack_kv_cache(x: torch.Tensor, strict: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (data uint8 [..., nope + 128], scales uint8 [..., 8]): the split form the kernel reads."""
    e = encode_kv_entries(x, strict)
    n = e.shape[-1] - SCALE_BYTES
    return e[..., :n].contiguous(), e[..., n:].contiguous()


def unpack_kv_cache(data: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Inverse of `pack_kv_cache`: (data [..., nope + 128], scales [..., 8]) -> [..., nope + 64] in `dtype`."""
    nope = data.shape[-1] - 2 * ROPE_DIM
    nb = nope // BLOCK
    if data.dtype != torch.uint8 or scales.dtype != torch.uint8 or nope <= 0 or nope % BLOCK:
        raise ValueError(f"unpack_kv_cache: expected uint8 data [..., 64n + 128] and uint8 scales, got "
                         f"{data.dtype} {tuple(data.shape)}, {scales.dtype} {tuple(scales.shape)}")
    if scales.shape[:-1] != data.shape[:-1] or scales.shape[-1] < nb:
        raise ValueError(f"unpack_kv_cache: scales {tuple(scales.shape)} do not match data {tuple(data.shape)}")
    codes = data[..., :nope].contiguous().view(torch.float8_e4m3fn).float().unflatten(-1, (nb, BLOCK))
    s = (scales[..., :nb].to(torch.int32) << 23).view(torch.float32)  # 2^(byte - 127)
    rope = data[..., nope:].contiguous().view(torch.bfloat16).float()
    return torch.cat(((codes * s.unsqueeze(-1)).flatten(-2), rope), -1).to(dtype)


# ---------------------------------------------------------------------------------------------
# Indexer keys (V4-SPEC 4.2 / 6.2): packed e2m1 + one UE8M0 scale per 32 dims, 68 bytes at Di = 128.
#
# The reference stores each key already fake-quantised with `fake_quant_fp4(x, 32)`: per 32-dim block,
# scale s = 2^ceil(log2(max(amax, 6 * 2^-126) / 6)) and values e2m1 * s. `pack_index_keys` recomputes the
# block scale with the same rule from the stored values; the values then divide exactly onto the e2m1 grid
# (a block whose largest code is below 6 gets a smaller scale, and doubling grid values that stay <= 6 lands
# on the grid again), so decoding restores every value, signed zeros included. Codes pack two per byte, dim
# 2i in the low nibble of byte i (quant.formats.pack_fp4, the MXFP4 weight convention).

INDEX_BLOCK = 32  # indexer-key dims per UE8M0 scale (the reference's fake-quant FP4 block)


def index_key_bytes(index_head_dim: int) -> int:
    """Bytes per packed indexer key: Di/2 code bytes + Di/32 scale bytes (68 at Di = 128)."""
    _index_blocks(index_head_dim)
    return index_head_dim // 2 + index_head_dim // INDEX_BLOCK


def _index_blocks(di: int) -> int:
    if di < INDEX_BLOCK or di % INDEX_BLOCK:
        raise ValueError(f"indexer keys: head dim must be a positive multiple of {INDEX_BLOCK}, got {di}")
    return di // INDEX_BLOCK


def pack_index_keys(k: torch.Tensor, strict: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys [..., Di] on the FP4 grid -> (codes uint8 [..., Di/2], UE8M0 scales uint8 [..., Di/32]).

    strict: raise ValueError when a value is not exactly e2m1 x its block scale (or is not finite); else
    values round to the nearest grid point and a block holding NaN / inf gets the NaN scale byte 255."""
    nb = _index_blocks(k.shape[-1])
    blocks = k.float().unflatten(-1, (nb, INDEX_BLOCK))  # [..., nb, 32]
    s = ue8m0_scale(blocks.abs().amax(-1), E2M1_MAX, FP4_MIN_AMAX)  # [..., nb]; NaN for non-finite blocks
    v = blocks / s.unsqueeze(-1)
    codes = encode_e2m1(v)
    if strict:
        bad = (decode_e2m1(codes) != v) | ~torch.isfinite(v)
        if bool(bad.any()):
            first = blocks[bad].flatten()[0].item()
            raise ValueError(f"pack_index_keys: {int(bad.sum())} values are not e2m1 x their block's power-of-two "
                             f"scale (first: {first!r}); fake-quantise first (quant.formats.fake_quant_fp4(k, 32))")
    exps = ((s.view(torch.int32) >> 23) & 0xFF).to(torch.uint8)  # the exponent byte; NaN -> 255
    return pack_fp4(codes.flatten(-2)).view(torch.uint8), exps


def unpack_index_keys(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Inverse of `pack_index_keys`: [..., Di] in `dtype` (exact for bf16 and float32); scale byte 255 -> NaN."""
    if codes.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"unpack_index_keys: expected uint8 codes and scales, got {codes.dtype}, {scales.dtype}")
    di = 2 * codes.shape[-1]
    nb = _index_blocks(di)
    if scales.shape[:-1] != codes.shape[:-1] or scales.shape[-1] != nb:
        raise ValueError(f"unpack_index_keys: scales {tuple(scales.shape)} do not fit codes {tuple(codes.shape)} "
                         f"(one scale per {INDEX_BLOCK} dims)")
    v = decode_e2m1(unpack_fp4(codes)).unflatten(-1, (nb, INDEX_BLOCK))
    return (v * e8m0_to_float(scales).unsqueeze(-1)).flatten(-2).to(dtype)


# ---------------------------------------------------------------------------------------------
# Graph-safe codecs: what the model runs inside exported programs (torch.export, Inductor, AOTInductor).
#
# Same bytes as pack_kv_cache / pack_index_keys with strict=False and the same values as their unpack
# functions, but written for tracing: no data-dependent Python (no strict check, no `.item()`), and only
# same-size bitcasts (bf16 <-> int16, f32 <-> int32, e4m3 <-> uint8): the bf16 RoPE values are split into
# their two little-endian bytes with shifts and masks instead of a `.view(torch.uint8)` that halves the
# element size. Any RoPE width: the row is  nope e4m3 | rope_dim bf16 (2 rope_dim bytes)  plus 8 scale bytes
# (V4: rope_dim 64, 576 + 8 bytes); the tiny test presets use narrower RoPE parts.


def _split_dims(width: int, rope_dim: int) -> tuple[int, int]:
    """(nope, nope blocks) of a head width; ValueError outside what the 8 scale bytes can describe."""
    nope = width - rope_dim
    if rope_dim < 1 or nope < BLOCK or nope % BLOCK or nope // BLOCK > SCALE_BYTES:
        raise ValueError(f"kv layout: head width {width} with {rope_dim} RoPE dims; need nope = width - rope_dim "
                         f"a multiple of {BLOCK} with 1..{SCALE_BYTES} blocks")
    return nope, nope // BLOCK


def _exponent_bytes(s: torch.Tensor) -> torch.Tensor:
    """Power-of-two float32 scales -> their UE8M0 byte (the float32 exponent field; NaN -> 255)."""
    return ((s.view(torch.int32) >> 23) & 0xFF).to(torch.uint8)


def pack_kv_rows(x: torch.Tensor, rope_dim: int = ROPE_DIM) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] (FP8 fake-quantised nope, bf16 RoPE) -> (data uint8 [..., nope + 2 rope_dim], scales uint8
    [..., 8]); graph-safe, equal to pack_kv_cache(x, strict=False) at rope_dim 64."""
    nope, nb = _split_dims(x.shape[-1], rope_dim)
    xf = x.float()
    blocks = xf[..., :nope].unflatten(-1, (nb, BLOCK))  # [..., nb, 64]
    s = ue8m0_scale(blocks.abs().amax(-1), E4M3_MAX, MIN_AMAX)  # [..., nb] powers of two
    codes = (blocks / s.unsqueeze(-1)).to(torch.float8_e4m3fn).view(torch.uint8).flatten(-2)
    half = xf[..., nope:].to(torch.bfloat16).view(torch.int16).to(torch.int32)  # [..., R] bf16 bit patterns
    rope = torch.stack(((half & 0xFF).to(torch.uint8), ((half >> 8) & 0xFF).to(torch.uint8)), -1).flatten(-2)
    scales = torch.nn.functional.pad(_exponent_bytes(s), (0, SCALE_BYTES - nb))  # zero pad bytes
    return torch.cat((codes, rope), -1), scales


def unpack_kv_rows(data: torch.Tensor, scales: torch.Tensor, rope_dim: int = ROPE_DIM,
                   dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Inverse of pack_kv_rows: [..., nope + rope_dim] in `dtype` (exact for bf16 and float32); graph-safe,
    equal to unpack_kv_cache at rope_dim 64."""
    nope, nb = _split_dims(data.shape[-1] - rope_dim, rope_dim)
    codes = data[..., :nope].view(torch.float8_e4m3fn).float().unflatten(-1, (nb, BLOCK))
    s = (scales[..., :nb].to(torch.int32) << 23).view(torch.float32)  # 2^(byte - 127)
    pair = data[..., nope:].unflatten(-1, (rope_dim, 2)).to(torch.int32)
    bits = pair[..., 0] | (pair[..., 1] << 8)  # 0 .. 65535: the bf16 bit pattern as unsigned
    rope = torch.where(bits >= 1 << 15, bits - (1 << 16), bits).to(torch.int16).view(torch.bfloat16)
    return torch.cat(((codes * s.unsqueeze(-1)).flatten(-2), rope.float()), -1).to(dtype)


def pack_index_rows(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indexer keys [..., Di] on the FP4 grid -> (codes uint8 [..., Di/2], scales uint8 [..., Di/32]); graph-safe,
    equal to pack_index_keys(k, strict=False)."""
    nb = _index_blocks(k.shape[-1])
    blocks = k.float().unflatten(-1, (nb, INDEX_BLOCK))  # [..., nb, 32]
    s = ue8m0_scale(blocks.abs().amax(-1), E2M1_MAX, FP4_MIN_AMAX)
    c = encode_e2m1(blocks / s.unsqueeze(-1)).flatten(-2)  # uint8 nibbles [..., Di]
    return c[..., 0::2] | (c[..., 1::2] << 4), _exponent_bytes(s)  # dim 2i in the low nibble of byte i


def unpack_index_rows(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Inverse of pack_index_rows: [..., Di] in `dtype`; graph-safe, equal to unpack_index_keys."""
    nb = _index_blocks(2 * codes.shape[-1])
    nibbles = torch.stack((codes & 0xF, codes >> 4), -1).flatten(-2)
    v = decode_e2m1(nibbles).unflatten(-1, (nb, INDEX_BLOCK))
    return (v * e8m0_to_float(scales).unsqueeze(-1)).flatten(-2).to(dtype)

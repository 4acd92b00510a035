"""Production KV layout (V4-SPEC section 6.2): an exact re-encoding of the reference's fake-quantised KV rows.

One entry of head dim D = nope + 64 (512 at V4: nope 448) is stored in  nope + 128 + 8  bytes (584 at V4):

    bytes [0, nope)             e4m3 codes of the nope channels (one UE8M0 scale per 64 channels)
    bytes [nope, nope + 128)    the 64 RoPE channels as bf16 (little-endian), unquantised
    bytes [nope + 128, +nope/64) UE8M0 scale exponents (2^(byte - 127)), then zero padding to 8 bytes

`encode_kv_entries` / `decode_kv_entries` work on that interleaved entry. The attention kernel reads the same
bytes split in two arrays (`pack_kv_cache`): the 576-byte data parts (64-byte aligned rows, as FlashMLA's paged
blocks keep them) and the 8 scale bytes per entry. Encoding is exact only for rows that are already
fake-quantised (`fake_quant_fp8(x[..., :nope], 64)` with bf16 RoPE values): `strict=True` checks it.
"""

from __future__ import annotations

import torch

from v4compile.quant.formats import E4M3_MAX, ue8m0_scale

BLOCK = 64  # nope channels per UE8M0 scale (the reference's fake-quant block)
ROPE_DIM = 64
SCALE_BYTES = 8  # 7 scales + 1 pad at V4; this layout supports up to 8 nope blocks (D <= 576)
MIN_AMAX = 1e-4  # the fake-quant rule's amax floor (V4-SPEC section 0)


def entry_bytes(head_dim: int) -> int:
    """Bytes per entry: 584 for head_dim 512."""
    nope = _nope(head_dim)
    return nope + 2 * ROPE_DIM + SCALE_BYTES


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

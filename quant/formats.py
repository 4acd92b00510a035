"""Number formats of V4 checkpoints and kernels: e4m3 (FP8), e2m1 (FP4), UE8M0 scales, block scaling.

Plain torch, CPU or GPU; the reference every kernel and the checkpoint loader are checked against
(V4-SPEC sections 0, 6.2, 12.3, 14.4).

Conventions:
- Power-of-two scales follow DeepSeek's kernels bit for bit: `s = 2^ceil(log2(max(amax, min_amax) * fp32(1/qmax)))`
  with the exponent read from the float32 bits of the product (rounded up unless the mantissa is 0).
- Quantisation clamps to +-qmax before the cast (saturating, like PTX `cvt.satfinite`), so a value
  just past the range never becomes NaN. NaN inputs propagate: a block containing NaN gets a NaN
  scale (UE8M0 byte 255) and dequantises to NaN over the whole block.
- UE8M0 byte 255 is NaN: `e8m0_to_float` returns NaN for it (propagate, never raise), so a corrupt
  scale poisons exactly its block instead of silently decoding to 2^128.
- e2m1 nibble: bit 3 = sign, bits 0-2 index E2M1_GRID; packed two per byte along the last dim,
  element 2k in the low nibble.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

E4M3_MAX = 448.0
E2M1_MAX = 6.0
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP8_MIN_AMAX = 1e-4  # V4-SPEC section 0, fake-quant FP8 and activation quantisation
FP4_MIN_AMAX = 6.0 * 2.0**-126  # V4-SPEC section 0, fake-quant FP4
E8M0_NAN_BYTE = 255

# Midpoints of E2M1_GRID; True where a tie rounds up (the upper neighbour has an even code).
_E2M1_MIDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


# ---------------------------------------------------------------------------------------------
# scales


def ue8m0_scale(amax: torch.Tensor, qmax: float, min_amax: float) -> torch.Tensor:
    """Power-of-two float32 scale 2^ceil(log2(max(amax, min_amax) * fp32(1/qmax))), from the float bits."""
    if not min_amax > 0:
        raise ValueError(f"min_amax must be > 0 (a zero scale cannot divide), got {min_amax}")
    a = torch.clamp(amax.float(), min=min_amax)  # NaN stays NaN
    r = a * torch.tensor(1.0 / qmax, dtype=torch.float32, device=a.device)  # fp32(1/qmax), fp32 product
    bits = r.view(torch.int32)
    exp = (bits >> 23) & 0xFF
    exp = exp + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    # finite r has exp <= 254 (amax <= fp32 max, qmax >= 1); inf / NaN amax -> NaN scale
    s = (exp.clamp(max=255) << 23).view(torch.float32)
    return torch.where(torch.isfinite(r), s, torch.full_like(s, float("nan")))


def e8m0_to_float(s: torch.Tensor) -> torch.Tensor:
    """UE8M0 bytes (float8_e8m0fnu or uint8) -> float32 2^(byte-127); byte 255 -> NaN."""
    if s.dtype not in (torch.float8_e8m0fnu, torch.uint8):
        raise ValueError(f"e8m0_to_float expects float8_e8m0fnu or uint8, got {s.dtype}")
    b = s.view(torch.uint8).to(torch.int32)
    f = (b << 23).view(torch.float32)
    f = torch.where(b == 0, torch.full_like(f, 2.0**-127), f)  # exponent field 0 is subnormal in fp32
    return torch.where(b == E8M0_NAN_BYTE, torch.full_like(f, float("nan")), f)


def float_to_e8m0(s: torch.Tensor) -> torch.Tensor:
    """Exact powers of two in [2^-127, 2^127] (float) -> float8_e8m0fnu; NaN -> byte 255; else ValueError."""
    f = s.float()
    bits = f.view(torch.int32)
    exp = (bits >> 23) & 0xFF
    mant = bits & 0x7FFFFF
    nan = torch.isnan(f)
    normal_pow2 = (mant == 0) & (exp > 0) & (exp < 255) & (bits >= 0)
    sub_pow2 = bits == 0x00400000  # 2^-127
    bad = ~(normal_pow2 | sub_pow2 | nan)
    if bool(bad.any()):
        v = f[bad].flatten()[0].item()
        raise ValueError(f"UE8M0 holds only powers of two in [2^-127, 2^127] or NaN; found {v!r} "
                         f"({int(bad.sum())} such values)")
    byte = torch.where(nan, torch.full_like(exp, E8M0_NAN_BYTE), torch.where(sub_pow2, torch.zeros_like(exp), exp))
    return byte.to(torch.uint8).view(torch.float8_e8m0fnu)


def scale_to_float(scale: torch.Tensor) -> torch.Tensor:
    """A block-scale tensor as float32, whether stored as UE8M0 bytes or as float."""
    if scale.dtype == torch.float8_e8m0fnu:
        return e8m0_to_float(scale)
    if scale.dtype.is_floating_point and scale.dtype.itemsize >= 2:
        return scale.float()
    raise ValueError(f"block scale must be float8_e8m0fnu, bfloat16, float16 or float32, got {scale.dtype}")


# ---------------------------------------------------------------------------------------------
# element formats


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round to the e4m3fn grid (nearest-even, torch's cast), saturating at +-448; float32; NaN stays NaN."""
    return torch.clamp(x.float(), -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()


def _e2m1_index(a: torch.Tensor) -> torch.Tensor:
    """Magnitudes (float32, >= 0) -> grid index 0..7, round-to-nearest-even, saturating at 6."""
    idx = torch.zeros(a.shape, dtype=torch.uint8, device=a.device)
    for mid, tie_up in _E2M1_MIDS:
        idx += (a >= mid if tie_up else a > mid).to(torch.uint8)
    return idx


def encode_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Values -> e2m1 nibble codes (uint8 0..15), nearest-even onto the grid, saturating; NaN -> +0 (code 0)."""
    xf = x.float()
    code = _e2m1_index(xf.abs().nan_to_num(0.0))
    sign = torch.signbit(xf) & ~torch.isnan(xf)
    return code | (sign.to(torch.uint8) << 3)


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """e2m1 nibble codes (uint8 0..15) -> float32 values (nibble 8 is -0.0)."""
    c = codes.to(torch.int64)
    grid = torch.tensor(E2M1_GRID, dtype=torch.float32, device=codes.device)
    mag = grid[c & 7]
    return torch.where((c & 8) != 0, -mag, mag)


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round to the e2m1 grid (nearest-even, saturating at +-6), float32; NaN stays NaN."""
    xf = x.float()
    v = decode_e2m1(encode_e2m1(xf))
    return torch.where(torch.isnan(xf), xf, v)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 nibble codes [..., I] -> int8 [..., I/2]; element 2k in the low nibble, 2k+1 in the high one."""
    if codes.dtype != torch.uint8:
        raise ValueError(f"pack_fp4 expects uint8 codes, got {codes.dtype}")
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_fp4 needs an even last dim, got shape {list(codes.shape)}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError(f"pack_fp4: codes must be 0..15, found {int(codes.max())}")
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).view(torch.int8)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """int8/uint8 [..., I/2] -> uint8 nibble codes [..., I] (inverse of pack_fp4)."""
    if packed.dtype not in (torch.int8, torch.uint8):
        raise ValueError(f"unpack_fp4 expects int8 or uint8, got {packed.dtype}")
    b = packed.view(torch.uint8)
    return torch.stack((b & 0xF, b >> 4), dim=-1).flatten(-2)


# ---------------------------------------------------------------------------------------------
# block helpers


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _blocks_2d(x: torch.Tensor, bo: int, bi: int) -> torch.Tensor:
    """float [..., O, I] -> zero-padded view [..., O/bo, bo, I/bi, bi]."""
    O, I = x.shape[-2], x.shape[-1]
    xp = F.pad(x, (0, (-I) % bi, 0, (-O) % bo))
    return xp.reshape(*x.shape[:-2], _cdiv(O, bo), bo, _cdiv(I, bi), bi)


def _unblock_2d(xb: torch.Tensor, O: int, I: int) -> torch.Tensor:
    so, bo, si, bi = xb.shape[-4:]
    return xb.reshape(*xb.shape[:-4], so * bo, si * bi)[..., :O, :I]


def _check_block(block: tuple[int, int]) -> tuple[int, int]:
    if len(block) != 2 or any(not isinstance(b, int) or b < 1 for b in block):
        raise ValueError(f"block must be two positive ints (rows, cols), got {block!r}")
    return block[0], block[1]


def infer_block(n: int, n_scales: int) -> int:
    """The power-of-two block b with ceil(n / b) == n_scales (unique whenever it matters); else ValueError."""
    if n_scales < 1 or n_scales > max(n, 1):
        raise ValueError(f"cannot infer a block: {n} elements, {n_scales} scales")
    if n_scales == 1:
        return max(n, 1)
    b = 1
    while b < n:
        if _cdiv(n, b) == n_scales:
            return b
        b *= 2
    raise ValueError(f"no power-of-two block splits {n} elements into {n_scales} scales; pass block= explicitly")


def _expand_scale(scale_f: torch.Tensor, O: int, I: int, bo: int, bi: int) -> torch.Tensor:
    """float scales [..., O/bo, I/bi] -> per-element [..., O, I]."""
    return scale_f.repeat_interleave(bo, dim=-2)[..., :O, :].repeat_interleave(bi, dim=-1)[..., :I]


# ---------------------------------------------------------------------------------------------
# fake quantisation and activation quantisation (per row, blocks along the last dim)


def _fake_quant_last(x: torch.Tensor, block: int, qmax: float, min_amax: float, rnd) -> torch.Tensor:
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    if x.dim() == 0:
        raise ValueError("fake-quant needs at least one dim")
    xf = x.float().unsqueeze(-2)  # [..., 1, K]: one row of 1 x block tiles
    xb = _blocks_2d(xf, 1, block)  # [..., 1, 1, K/b, b]
    s = ue8m0_scale(xb.abs().amax(dim=-1, keepdim=True).amax(dim=-3, keepdim=True), qmax, min_amax)
    q = rnd(torch.clamp(xb / s, -qmax, qmax)) * s
    return _unblock_2d(q, 1, x.shape[-1]).squeeze(-2).to(x.dtype)


def fake_quant_fp8(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """V4-SPEC section 0 fake-quant FP8(block): e4m3 round trip per `block` channels of the last dim; x.dtype."""
    return _fake_quant_last(x, block, E4M3_MAX, FP8_MIN_AMAX, round_e4m3)


def fake_quant_fp4(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """V4-SPEC section 0 fake-quant FP4(block): e2m1 round trip per `block` channels of the last dim; x.dtype."""
    return _fake_quant_last(x, block, E2M1_MAX, FP4_MIN_AMAX, round_e2m1)


def quant_fp8_act(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row activation quantisation: (e4m3 [..., K], float32 power-of-two scales [..., ceil(K/block)])."""
    if x.dim() == 0:
        raise ValueError("quant_fp8_act needs at least one dim")
    q, s = quant_fp8_block(x.unsqueeze(-2), (1, block), scale_fmt="ue8m0", min_amax=FP8_MIN_AMAX)
    return q.squeeze(-2), e8m0_to_float(s).squeeze(-2)


# ---------------------------------------------------------------------------------------------
# block quantisation of weights


def quant_fp8_block(w: torch.Tensor, block: tuple[int, int] = (128, 128), scale_fmt: str = "ue8m0",
                    min_amax: float = FP8_MIN_AMAX) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., O, I] -> (e4m3 [..., O, I], scale [..., ceil(O/bo), ceil(I/bi)]) as float8_e8m0fnu or float32.

    ue8m0: power-of-two scales (section 0 rule); fp32: scale = max(amax, min_amax) / 448.
    """
    if w.dim() < 2:
        raise ValueError(f"quant_fp8_block needs [..., O, I], got shape {list(w.shape)}")
    bo, bi = _check_block(block)
    O, I = w.shape[-2:]
    wb = _blocks_2d(w.float(), bo, bi)
    amax = wb.abs().amax(dim=-1, keepdim=True).amax(dim=-3, keepdim=True)  # [..., so, 1, si, 1]
    if scale_fmt == "ue8m0":
        s = ue8m0_scale(amax, E4M3_MAX, min_amax)
    elif scale_fmt == "fp32":
        s = torch.clamp(amax, min=min_amax) / E4M3_MAX
    else:
        raise ValueError(f"scale_fmt must be 'ue8m0' or 'fp32', got {scale_fmt!r}")
    q = torch.clamp(wb / s, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    q = _unblock_2d(q.view(torch.uint8), O, I).contiguous().view(torch.float8_e4m3fn)
    s = s.squeeze(-1).squeeze(-2)
    return q, (float_to_e8m0(s) if scale_fmt == "ue8m0" else s.contiguous())


def dequant_fp8_block(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None = None) -> torch.Tensor:
    """e4m3 [..., O, I] with scales [..., O/bo, I/bi] (e8m0 or float) -> float32; block inferred when None."""
    if q.dtype != torch.float8_e4m3fn:
        raise ValueError(f"dequant_fp8_block expects float8_e4m3fn, got {q.dtype}")
    if q.dim() < 2 or scale.dim() != q.dim() or scale.shape[:-2] != q.shape[:-2]:
        raise ValueError(f"shape mismatch: weight {list(q.shape)}, scale {list(scale.shape)}")
    O, I = q.shape[-2:]
    so, si = scale.shape[-2:]
    bo, bi = _check_block(block) if block is not None else (infer_block(O, so), infer_block(I, si))
    if (_cdiv(O, bo), _cdiv(I, bi)) != (so, si):
        raise ValueError(f"scale {list(scale.shape)} does not fit weight {list(q.shape)} with block {(bo, bi)}")
    return q.float() * _expand_scale(scale_to_float(scale), O, I, bo, bi)


def quant_fp4_block(w: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4: [..., O, I] -> (packed e2m1 int8 [..., O, I/2], UE8M0 scales float8_e8m0fnu [..., O, ceil(I/block)])."""
    if w.dim() < 2:
        raise ValueError(f"quant_fp4_block needs [..., O, I], got shape {list(w.shape)}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    O, I = w.shape[-2:]
    if I % 2:
        raise ValueError(f"FP4 packs two values per byte: input dim must be even, got {I}")
    wb = _blocks_2d(w.float(), 1, block)
    s = ue8m0_scale(wb.abs().amax(dim=-1, keepdim=True).amax(dim=-3, keepdim=True), E2M1_MAX, FP4_MIN_AMAX)
    codes = encode_e2m1(torch.clamp(wb / s, -E2M1_MAX, E2M1_MAX))
    packed = pack_fp4(_unblock_2d(codes, O, I).contiguous())
    return packed, float_to_e8m0(s.squeeze(-1).squeeze(-2))


def dequant_fp4_block(packed: torch.Tensor, scale: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """Packed e2m1 [..., O, I/2] with scales [..., O, I/block] (e8m0 or float) -> float32 [..., O, I]."""
    if packed.dim() < 2 or scale.dim() != packed.dim() or scale.shape[:-1] != packed.shape[:-1]:
        raise ValueError(f"shape mismatch: packed weight {list(packed.shape)}, scale {list(scale.shape)}")
    O, I = packed.shape[-2], 2 * packed.shape[-1]
    bi = block if block is not None else infer_block(I, scale.shape[-1])
    if _cdiv(I, bi) != scale.shape[-1]:
        raise ValueError(f"scale {list(scale.shape)} does not fit FP4 weight [.., {O}, {I}] with block {bi}")
    return decode_e2m1(unpack_fp4(packed)) * _expand_scale(scale_to_float(scale), O, I, 1, bi)


# ---------------------------------------------------------------------------------------------
# linear layers (V4-SPEC section 0)


def _act_dequant(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    q, s = quant_fp8_act(x, block)
    return q.float() * s.repeat_interleave(block, dim=-1)[..., : x.shape[-1]]


def fp8_linear_reference(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
                         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y = act_fp8(x) @ W^T, W e4m3 [O, K] with 128x128 block scales; FP32 accumulate; out x.dtype.

    Dequantising both operands to fp32 and doing one matmul equals the kernel's block formulation
    (sum over K blocks of (q_x . q_w) * act_scale * w_scale) up to fp32 summation order: with UE8M0
    scales every product is exact in fp32; with float32 weight scales the per-element product
    q_w * s_w adds one fp32 rounding.
    """
    K = x.shape[-1]
    if w_fp8.dim() != 2 or w_fp8.shape[1] != K:
        raise ValueError(f"fp8 linear: x [..., {K}] does not fit weight {list(w_fp8.shape)}")
    w = dequant_fp8_block(w_fp8, w_scale, block=(128, 128))
    return (_act_dequant(x) @ w.T).to(out_dtype or x.dtype)


def fp4_linear_reference(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
                         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y = act_fp8(x) @ W^T, W packed e2m1 [O, K/2] with per-32 UE8M0 scales; FP32 accumulate; out x.dtype.

    Same fp32-dequantise formulation as fp8_linear_reference (exact products, order may differ).
    """
    K = x.shape[-1]
    if w_packed.dim() != 2 or 2 * w_packed.shape[1] != K:
        raise ValueError(f"fp4 linear: x [..., {K}] does not fit packed weight {list(w_packed.shape)}")
    w = dequant_fp4_block(w_packed, w_scale, block=32)
    return (_act_dequant(x) @ w.T).to(out_dtype or x.dtype)

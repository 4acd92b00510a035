"""Compressor (V4-SPEC sections 4.1, 4.2, 5, 6.4, 6.5) on the GPU: `v4triton::compress` and, for the production
KV layout, `v4triton::compress_packed`.

Legend: B batch, T tokens of this call, m compress ratio, c = 2 for the overlapping CSA compressor (m = 4) else
1, D entry width (512 main, 128 indexer), R rope channels, S = c m state rows, J = T // m + 1 candidate blocks.

Same contract as `v4::compress` (v4compile/model/ops.py): one call advances the compressor state machine of
every sequence over a chunk of T tokens starting at its own start_pos. Two kernels:
  1. `_pool_kernel`, one program per (sequence, candidate block): a block that completes in this chunk pools
     its slots (CSA: the previous block's A halves + its own B halves) from the state rows and the chunk's
     projections with a per-channel online softmax in fp32, then act cast, RMSNorm, RoPE at the block start,
     and FP8 fake-quant of the nope channels (or Hadamard + FP4 fake-quant of all channels), and writes the
     cache row. Blocks that do not complete, or lie past the cache (j >= n_blocks), write nothing.
  2. `_state_kernel`, one program per (sequence, channel block): rewrites the S state rows (previous block and
     the incomplete block's tokens; rows of absent tokens get kv 0 and score -inf); when the chunk crosses no
     block boundary only its own tokens' rows (the others already hold what they would be rewritten with).
     It runs after the pool kernel, which reads the old rows; inside a program all reads precede a barrier
     before the writes.
`_pool_packed_kernel` replaces pass 1 for production-layout caches (v4::compress_packed): the same bf16 entry,
stored as the bytes quant/kv_layout.py's pack_kv_rows / pack_index_rows give it (e4m3 nope codes + bf16 RoPE
bytes + UE8M0 scale bytes, or packed e2m1 indexer keys + their scales).
e4m3 / e2m1 rounding is done on the fp32 bits (round to nearest even), not by a cast: exact on the GPU and
under the interpreter alike (the interpreter's fp32 -> fp8 cast is wrong near powers of two, ENVIRONMENT.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from v4compile.plugins.registry import register_kernel
from v4compile.plugins.triton.launch import accepts, launcher  # eager: direct launch; tracing: wrap_triton
from v4compile.quant.kv_layout import SCALE_BYTES, row_bytes

SLOTS_PER_STEP = 16  # slots pooled per step of the online softmax (HCA has m = 128 slots)
STATE_ELEMS = 2048  # state rows x channels per program of the state update


@triton.jit
def _act_round(x, act: tl.constexpr):
    """fp32 -> nearest-even value of the activation dtype, kept in fp32.

    Workaround: triton 3.6's interpreter casts fp32 -> bf16 by truncation (the GPU's cvt rounds to nearest
    even); rounding the bits first makes the cast exact in both, so this is safe on the GPU. Remove when the
    interpreter rounds (then `x.to(act).to(tl.float32)` is enough).
    """
    if act == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        x = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return x.to(act).to(tl.float32)


@triton.jit
def _with_sign_of(r, v):
    """r >= 0 with v's sign bit (a negative value that rounds to zero gives -0.0, as torch's casts do; Triton's
    unary minus is 0 - r, which would give +0.0)."""
    sign = v.to(tl.uint32, bitcast=True) & 0x80000000
    return (r.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _round_e4m3(v):
    """|v| <= 448 -> nearest-even e4m3 value (normal: 3 mantissa bits; subnormal step 2^-9)."""
    a = tl.abs(v)
    bits = a.to(tl.uint32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
    sub = (a + 24576.0) - 24576.0  # 1.5 * 2^14: fp32 ulp there is 2^-9
    r = tl.where(a >= 0.015625, normal, sub)
    return _with_sign_of(r, v)


@triton.jit
def _round_e2m1(v):
    """|v| <= 6 -> nearest-even e2m1 value (normal: 1 mantissa bit; subnormal step 0.5)."""
    a = tl.abs(v)
    bits = a.to(tl.uint32, bitcast=True)
    normal = ((bits + 0x1FFFFF + ((bits >> 22) & 1)) & 0xFFC00000).to(tl.float32, bitcast=True)
    sub = (a + 6291456.0) - 6291456.0  # 1.5 * 2^22: fp32 ulp there is 0.5
    r = tl.where(a >= 1.0, normal, sub)
    return _with_sign_of(r, v)


@triton.jit
def _block_exponent(xb, QMAX: tl.constexpr, MIN_AMAX: tl.constexpr):
    """Rows of blocks [nb, BLK] -> (UE8M0 exponent byte of each block's scale as int32, exact 1 / scale):
    quant.formats.ue8m0_scale of the block's amax, from the float bits."""
    amax = tl.maximum(tl.max(tl.abs(xb), axis=1), MIN_AMAX)
    bits = (amax * (1.0 / QMAX)).to(tl.uint32, bitcast=True)
    e = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.uint32)
    return e.to(tl.int32), ((254 - e) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _fake_quant(x, DP: tl.constexpr, BLK: tl.constexpr, QMAX: tl.constexpr, MIN_AMAX: tl.constexpr,
                FP4: tl.constexpr):
    """Per-BLK-channel power-of-two scale 2^ceil(log2(amax * fp32(1/QMAX))) (exponent from the fp32 bits),
    round x / s to e4m3 (or e2m1), times s; x fp32 [DP] -> fp32 [DP]."""
    xb = tl.reshape(x, (DP // BLK, BLK))
    e, inv = _block_exponent(xb, QMAX, MIN_AMAX)
    scale = (e << 23).to(tl.float32, bitcast=True)
    v = tl.minimum(tl.maximum(xb * inv[:, None], -QMAX), QMAX)
    if FP4:
        v = _round_e2m1(v)
    else:
        v = _round_e4m3(v)
    return tl.reshape(v * scale[:, None], (DP,))


@triton.jit
def _butterfly(x, DP: tl.constexpr, H: tl.constexpr):
    """One Hadamard stage: pairs (i, i + H) inside groups of 2H become (a + b, a - b)."""
    y = tl.permute(tl.reshape(x, (DP // (2 * H), 2, H)), (0, 2, 1))
    a, b = tl.split(y)
    return tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), (DP,))


@triton.jit
def _hadamard(x, DP: tl.constexpr):
    """Unnormalised Walsh-Hadamard transform (Sylvester order) of x fp32 [DP <= 1024], the reference's stages."""
    if DP > 1:
        x = _butterfly(x, DP, 1)
    if DP > 2:
        x = _butterfly(x, DP, 2)
    if DP > 4:
        x = _butterfly(x, DP, 4)
    if DP > 8:
        x = _butterfly(x, DP, 8)
    if DP > 16:
        x = _butterfly(x, DP, 16)
    if DP > 32:
        x = _butterfly(x, DP, 32)
    if DP > 64:
        x = _butterfly(x, DP, 64)
    if DP > 128:
        x = _butterfly(x, DP, 128)
    if DP > 256:
        x = _butterfly(x, DP, 256)
    if DP > 512:
        x = _butterfly(x, DP, 512)
    return x


@triton.jit
def _program_block(start_ptr, T, n_blocks, M: tl.constexpr):
    """Pool program (b, i) -> (b, the chunk's start s, block j = s // m + i, whether j completes in this chunk and
    has a cache row)."""
    b = tl.program_id(0).to(tl.int64)
    s = tl.load(start_ptr + b).to(tl.int64)
    j = s // M + tl.program_id(1)
    return b, s, j, (M * (j + 1) <= s + T) & (j < n_blocks)


@triton.jit
def _pool_entry(kvp_ptr, gp_ptr, ape_ptr, nw_ptr, invf_ptr, kvs_ptr, scs_ptr, b, s, j, T, eps, hd_scale,
                sk_b, sk_t, sg_b, sg_t, ss_b,
                M: tl.constexpr, C: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, R: tl.constexpr,
                SB: tl.constexpr, ROTATE: tl.constexpr, act: tl.constexpr):
    """Cache entry of block j of sequence b (chunk start s): pool, normalise, rotate, quantise; fp32 [DP] holding
    act values (channels >= D are 0)."""
    eps = tl.cast(eps, tl.float32)  # float arguments arrive as fp64 when AOTInductor launches the kernel
    hd_scale = tl.cast(hd_scale, tl.float32)
    CW: tl.constexpr = C * D
    q0 = s - s % M
    offs_d = tl.arange(0, DP)
    dm = offs_d < D
    m_run = tl.full((DP,), float("-inf"), tl.float32)
    l_run = tl.zeros((DP,), tl.float32)
    acc = tl.zeros((DP,), tl.float32)
    # CSA: g = 1 is block j with the B halves, g = 0 the previous block with the A halves; the current
    # block goes first so the running max is finite before the (possibly empty) previous block.
    for gg in tl.static_range(C):
        g = C - 1 - gg
        for r0 in range(0, M, SB):
            t = M * (j - (C - 1) + g) + r0 + tl.arange(0, SB)  # token positions of these slots
            ok = (t >= 0) & (r0 + tl.arange(0, SB) < M)
            in_chunk = t >= s
            crow = tl.where(in_chunk, t - s, 0)
            srow = tl.where(in_chunk, 0, t - q0 + (C - 1) * M)
            ch = g * D + offs_d
            cm = (ok & in_chunk)[:, None] & dm[None, :]
            sm = (ok & ~in_chunk)[:, None] & dm[None, :]
            kv = tl.load(kvp_ptr + b * sk_b + crow[:, None] * sk_t + ch[None, :], mask=cm, other=0.0)
            sc = tl.load(gp_ptr + b * sg_b + crow[:, None] * sg_t + ch[None, :], mask=cm, other=0.0)
            sc += tl.load(ape_ptr + (t % M)[:, None] * CW + ch[None, :], mask=cm, other=0.0)
            kv += tl.load(kvs_ptr + b * ss_b + srow[:, None] * CW + ch[None, :], mask=sm, other=0.0)
            sc += tl.load(scs_ptr + b * ss_b + srow[:, None] * CW + ch[None, :], mask=sm, other=0.0)
            sc = tl.where(ok[:, None] & dm[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_run, tl.max(sc, axis=0))
            m_new = tl.where(dm, m_new, 0.0)  # padded channels stay finite
            alpha = tl.exp(m_run - m_new)
            p = tl.exp(sc - m_new[None, :])
            l_run = l_run * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p * kv, axis=0)
            m_run = m_new
    pooled = tl.where(dm, tl.div_rn(acc, tl.where(dm, l_run, 1.0)), 0.0)
    x = _act_round(pooled, act)
    rs = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(x * x, axis=0) / D + eps))
    w = tl.load(nw_ptr + offs_d, mask=dm, other=0.0).to(tl.float32)
    x = _act_round(w * (x * rs), act)
    # RoPE on the last R channels at the block start: interleaved pairs (2i, 2i+1)
    pa, pb = tl.split(tl.reshape(x, (DP // 2, 2)))
    pi = tl.arange(0, DP // 2) - (D - R) // 2
    is_rope = (pi >= 0) & (pi < R // 2)
    theta = (M * j).to(tl.float32) * tl.load(invf_ptr + pi, mask=is_rope, other=0.0)
    cs = tl.where(is_rope, tl.cos(theta), 1.0)
    sn = tl.where(is_rope, tl.sin(theta), 0.0)
    ra = tl.where(is_rope, pa * cs - pb * sn, pa)
    rb = tl.where(is_rope, pa * sn + pb * cs, pb)
    x = _act_round(tl.reshape(tl.join(ra, rb), (DP,)), act)
    if ROTATE:
        x = _act_round(_hadamard(x, DP) * hd_scale, act)
        x = _act_round(_fake_quant(x, DP, 32, 6.0, 6.0 * 2.0**-126, True), act)
    else:
        q = _fake_quant(tl.where(offs_d < D - R, x, 0.0), DP, 64, 448.0, 1e-4, False)
        x = tl.where(offs_d < D - R, _act_round(q, act), x)
    return x


@triton.jit
def _pool_kernel(kvp_ptr, gp_ptr, ape_ptr, nw_ptr, invf_ptr, start_ptr, kvs_ptr, scs_ptr, cache_ptr,
                 T, n_blocks, eps, hd_scale,
                 sk_b, sk_t, sg_b, sg_t, ss_b, sc_b, sc_n,
                 M: tl.constexpr, C: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, R: tl.constexpr,
                 SB: tl.constexpr, ROTATE: tl.constexpr):
    """Program (b, i): block j = start // m + i; pool, normalise, rotate, quantise, write if complete."""
    b, s, j, complete = _program_block(start_ptr, T, n_blocks, M)
    if complete:
        act = cache_ptr.dtype.element_ty
        x = _pool_entry(kvp_ptr, gp_ptr, ape_ptr, nw_ptr, invf_ptr, kvs_ptr, scs_ptr, b, s, j, T, eps, hd_scale,
                        sk_b, sk_t, sg_b, sg_t, ss_b, M, C, D, DP, R, SB, ROTATE, act)
        offs_d = tl.arange(0, DP)
        tl.store(cache_ptr + b * sc_b + j * sc_n + offs_d, x.to(act), mask=offs_d < D)


@triton.jit
def _e4m3_bits(v):
    """Values exactly on the e4m3 grid (|v| <= 448) -> their e4m3fn byte; the sign comes from the float's sign
    bit (-0.0 -> 0x80). Built from the fp32 fields, as quant.formats' codecs define them (no fp8 cast)."""
    bits = v.to(tl.uint32, bitcast=True)
    a = bits & 0x7FFFFFFF
    ex = (a >> 23).to(tl.int32)
    normal = ((ex - 120) << 3) | ((a >> 20) & 7).to(tl.int32)  # exponent bias 7: fp32 exponent - 127 + 7
    sub = (tl.abs(v) * 512.0).to(tl.int32)  # below 2^-6: multiples of 2^-9
    code = tl.where(ex >= 121, normal, sub) | ((bits >> 31).to(tl.int32) << 7)
    return code.to(tl.uint8)


@triton.jit
def _e2m1_code(v):
    """Values exactly on the e2m1 grid (0, 0.5, 1, 1.5, 2, 3, 4, 6 and negatives) -> 4-bit codes (sign bit 8)."""
    bits = v.to(tl.uint32, bitcast=True)
    a = tl.abs(v)
    big = (((bits >> 23) & 0xFF).to(tl.int32) - 126) * 2 + ((bits >> 22) & 1).to(tl.int32)  # 1 -> 2 .. 6 -> 7
    code = tl.where(a >= 1.0, big, (a * 2.0).to(tl.int32))
    return code | ((bits >> 31).to(tl.int32) << 3)


@triton.jit
def _pool_packed_kernel(kvp_ptr, gp_ptr, ape_ptr, nw_ptr, invf_ptr, start_ptr, kvs_ptr, scs_ptr, data_ptr, scale_ptr,
                        T, n_blocks, eps, hd_scale,
                        sk_b, sk_t, sg_b, sg_t, ss_b, sd_b, sd_n, sx_b, sx_n,
                        M: tl.constexpr, C: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, R: tl.constexpr,
                        SB: tl.constexpr, ROTATE: tl.constexpr, SW: tl.constexpr):
    """_pool_kernel writing production-layout bytes (V4-SPEC 6.2, quant/kv_layout.py pack_kv_rows /
    pack_index_rows) of the bf16 entry: data row (e4m3 nope | bf16 RoPE little-endian, or packed e2m1 pairs) and
    its SW scale bytes (UE8M0 exponents re-derived from the stored values, as the encoders do; zero padded)."""
    b, s, j, complete = _program_block(start_ptr, T, n_blocks, M)
    if complete:
        x = _pool_entry(kvp_ptr, gp_ptr, ape_ptr, nw_ptr, invf_ptr, kvs_ptr, scs_ptr, b, s, j, T, eps, hd_scale,
                        sk_b, sk_t, sg_b, sg_t, ss_b, M, C, D, DP, R, SB, ROTATE, tl.bfloat16)
        row = data_ptr + b * sd_b + j * sd_n
        srow = scale_ptr + b * sx_b + j * sx_n
        offs_d = tl.arange(0, DP)
        if ROTATE:  # indexer key: D = DP, e2m1 codes two per byte (dim 2i low nibble), one scale per 32 dims
            xb = tl.reshape(x, (DP // 32, 32))
            e, inv = _block_exponent(xb, 6.0, 6.0 * 2.0**-126)
            v = tl.reshape(xb * inv[:, None], (DP,))
            lo, hi = tl.split(tl.reshape(_e2m1_code(v), (DP // 2, 2)))
            tl.store(row + tl.arange(0, DP // 2), (lo | (hi << 4)).to(tl.uint8))
            tl.store(srow + tl.arange(0, DP // 32), e.to(tl.uint8))
        else:  # KV entry: nope e4m3 codes | RoPE bf16 bytes; one scale per 64 nope dims, bytes past them 0
            NOPE: tl.constexpr = D - R
            is_nope = offs_d < NOPE
            xb = tl.reshape(tl.where(is_nope, x, 0.0), (DP // 64, 64))
            e, inv = _block_exponent(xb, 448.0, 1e-4)
            tl.store(row + offs_d, _e4m3_bits(tl.reshape(xb * inv[:, None], (DP,))), mask=is_nope)
            half = x.to(tl.bfloat16).to(tl.uint16, bitcast=True).to(tl.int32)  # exact: x holds bf16 values
            is_rope = (offs_d >= NOPE) & (offs_d < D)
            at = NOPE + 2 * (offs_d - NOPE)
            tl.store(row + at, (half & 0xFF).to(tl.uint8), mask=is_rope)
            tl.store(row + at + 1, ((half >> 8) & 0xFF).to(tl.uint8), mask=is_rope)
            nb = tl.arange(0, SW)
            blk = tl.arange(0, DP // 64)
            tl.store(srow + blk, tl.where(blk < NOPE // 64, e, 0).to(tl.uint8), mask=blk < SW)
            tl.store(srow + nb, tl.zeros((SW,), tl.uint8), mask=nb >= DP // 64)


@triton.jit
def _state_kernel(kvp_ptr, gp_ptr, ape_ptr, start_ptr, kvs_ptr, scs_ptr, T,
                  sk_b, sk_t, sg_b, sg_t, ss_b,
                  M: tl.constexpr, C: tl.constexpr, CW: tl.constexpr, SP: tl.constexpr, CB: tl.constexpr):
    """Program (b, channel block): state rows <- positions q0' - lag .. q0' - lag + S - 1 of the call's end."""
    b = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * CB + tl.arange(0, CB)
    cmask = offs_c < CW
    S: tl.constexpr = C * M
    LAG: tl.constexpr = (C - 1) * M
    s = tl.load(start_ptr + b).to(tl.int64)
    e = s + T
    q0 = s - s % M
    i = tl.arange(0, SP)
    t = e - e % M - LAG + i
    in_chunk = t >= s
    srow = t - q0 + LAG
    ok = (i < S) & (t >= 0) & (t < e) & (in_chunk | (srow >= 0))
    crow = tl.where(in_chunk, t - s, 0)
    srow = tl.where(in_chunk, 0, srow)
    # No block boundary crossed (q0' == q0): every row keeps its position, so only the rows of this chunk's tokens
    # change; the others (earlier tokens, or absent: already kv 0 / score -inf) are neither read nor rewritten.
    # A decode step that completes no block writes one row instead of S (HCA: 1 of 128).
    keep = (e - e % M == q0) & ~(ok & in_chunk)
    cm = (ok & in_chunk)[:, None] & cmask[None, :]
    sm = (ok & ~in_chunk & ~keep)[:, None] & cmask[None, :]
    kv = tl.load(kvp_ptr + b * sk_b + crow[:, None] * sk_t + offs_c[None, :], mask=cm, other=0.0)
    sc = tl.load(gp_ptr + b * sg_b + crow[:, None] * sg_t + offs_c[None, :], mask=cm, other=0.0)
    sc += tl.load(ape_ptr + (t % M)[:, None] * CW + offs_c[None, :], mask=cm, other=0.0)
    kv += tl.load(kvs_ptr + b * ss_b + srow[:, None] * CW + offs_c[None, :], mask=sm, other=0.0)
    sc += tl.load(scs_ptr + b * ss_b + srow[:, None] * CW + offs_c[None, :], mask=sm, other=0.0)
    sc = tl.where(ok[:, None], sc, float("-inf"))
    tl.debug_barrier()  # every old row of this channel block is read before any is overwritten
    dst = b * ss_b + i[:, None] * CW + offs_c[None, :]
    wm = ((i < S) & ~keep)[:, None] & cmask[None, :]
    tl.store(kvs_ptr + dst, kv, mask=wm)
    tl.store(scs_ptr + dst, sc, mask=wm)


def _check_inputs(kv_proj, gate_proj, ape, norm_weight, inv_freq, start_pos, kv_state, score_state, ratio, rotate):
    """Everything but the cache: (B, T, CW, c, D, R); ValueError naming the first bad argument."""
    if kv_proj.dim() != 3 or gate_proj.shape != kv_proj.shape:
        raise ValueError(f"kv_proj and gate_proj must be [B, T, c*D] of one shape, got {list(kv_proj.shape)} "
                         f"and {list(gate_proj.shape)}")
    B, T, CW = kv_proj.shape
    if not isinstance(ratio, int) or ratio < 1:
        raise ValueError(f"ratio must be a positive int, got {ratio!r}")
    c = 2 if ratio == 4 else 1
    D = CW // c
    if CW % c:
        raise ValueError(f"projections of width {CW} at ratio {ratio}: expected a multiple of {c}")
    S = c * ratio
    for name, st in (("kv_state", kv_state), ("score_state", score_state)):
        if tuple(st.shape) != (B, S, CW) or st.dtype != torch.float32 or not st.is_contiguous():
            raise ValueError(f"{name} must be contiguous float32 {[B, S, CW]}, got {st.dtype} {list(st.shape)}")
    if tuple(ape.shape) != (ratio, CW) or ape.dtype != torch.float32 or not ape.is_contiguous():
        raise ValueError(f"ape must be contiguous float32 [{ratio}, {CW}], got {ape.dtype} {list(ape.shape)}")
    if kv_proj.dtype != torch.float32 or gate_proj.dtype != torch.float32:
        raise ValueError(f"kv_proj / gate_proj must be float32, got {kv_proj.dtype} / {gate_proj.dtype}")
    if kv_proj.stride(2) != 1 or gate_proj.stride(2) != 1:
        raise ValueError(f"kv_proj and gate_proj need a contiguous last dim, got strides {kv_proj.stride()}, "
                         f"{gate_proj.stride()}")
    if tuple(norm_weight.shape) != (D,) or tuple(start_pos.shape) != (B,) or start_pos.dtype.is_floating_point:
        raise ValueError(f"norm_weight must be [{D}] and start_pos int [{B}], got {list(norm_weight.shape)}, "
                         f"{start_pos.dtype} {list(start_pos.shape)}")
    R = 2 * inv_freq.shape[-1]
    if inv_freq.dim() != 1 or not 0 < R <= D or inv_freq.dtype != torch.float32:
        raise ValueError(f"inv_freq must be float32 [R/2] with 0 < R <= D={D}, got {inv_freq.dtype} "
                         f"{list(inv_freq.shape)}")
    if rotate and (D & (D - 1) or not 32 <= D <= 1024):
        raise ValueError(f"rotate (Hadamard + FP4) needs a power-of-two D in [32, 1024], got {D}")
    if not rotate and (D - R) % 64:
        raise ValueError(f"FP8 fake-quant of the nope channels needs (D - R) % 64 == 0, got D={D}, R={R}")
    return B, T, CW, c, D, R


def _check(kv_proj, gate_proj, ape, norm_weight, inv_freq, start_pos, kv_state, score_state, cache, ratio, rotate):
    B, T, CW, c, D, R = _check_inputs(kv_proj, gate_proj, ape, norm_weight, inv_freq, start_pos, kv_state,
                                      score_state, ratio, rotate)
    if cache.dim() != 3 or cache.shape[0] != B or cache.shape[2] != D or cache.shape[1] < 1:
        raise ValueError(f"cache must be [B={B}, n_blocks + 1, D={D}] for projections of width {CW} at ratio "
                         f"{ratio}, got {list(cache.shape)}")
    if cache.stride(2) != 1:
        raise ValueError(f"cache needs a contiguous last dim, got strides {cache.stride()}")
    if cache.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"cache must be bf16/fp16/fp32 (the activation dtype), got {cache.dtype}")
    return B, T, CW, c, D, R


def _check_packed(kv_proj, gate_proj, ape, norm_weight, inv_freq, start_pos, kv_state, score_state, cache,
                  cache_scale, ratio, rotate):
    """_check_inputs plus the production-layout cache pair; returns (B, T, CW, c, D, R, scale bytes per row)."""
    B, T, CW, c, D, R = _check_inputs(kv_proj, gate_proj, ape, norm_weight, inv_freq, start_pos, kv_state,
                                      score_state, ratio, rotate)
    width, sw = row_bytes(D, R, index_key=rotate)
    if not rotate and (D - R) // 64 > SCALE_BYTES:
        raise ValueError(f"{(D - R) // 64} nope blocks do not fit the {SCALE_BYTES} scale bytes of a row")
    for name, t, w in (("cache", cache, width), ("cache_scale", cache_scale, sw)):
        if t.dim() != 3 or t.dtype != torch.uint8 or t.shape[0] != B or t.shape[2] != w or t.shape[1] < 1 \
                or t.stride(2) != 1:
            raise ValueError(f"{name} must be uint8 [B={B}, n_blocks + 1, {w}] with a contiguous last dim for "
                             f"{'indexer keys' if rotate else 'KV entries'} of width {D}, got {t.dtype} "
                             f"{list(t.shape)} strides {t.stride()}")
    if cache_scale.shape[1] != cache.shape[1]:
        raise ValueError(f"cache {list(cache.shape)} and cache_scale {list(cache_scale.shape)} need the same rows")
    return B, T, CW, c, D, R, sw


def compress_launch(kv_proj: torch.Tensor, gate_proj: torch.Tensor, ape: torch.Tensor, norm_weight: torch.Tensor,
                    inv_freq: torch.Tensor, start_pos: torch.Tensor, kv_state: torch.Tensor,
                    score_state: torch.Tensor, cache: torch.Tensor, ratio: int, norm_eps: float,
                    rotate: bool) -> None:
    """Validate, then pool the completed blocks into `cache` and rewrite the state rows (both in place)."""
    B, T, CW, c, D, R = _check(kv_proj, gate_proj, ape, norm_weight, inv_freq, start_pos, kv_state, score_state,
                               cache, ratio, rotate)
    if isinstance(B, int) and isinstance(T, int) and B * T == 0:  # eager only: no guard on symbolic sizes
        return
    DP = D if rotate else max(triton.next_power_of_2(D), 64)  # FP8 blocks of 64 tile the padded width
    n_blocks = cache.shape[1] - 1  # the last row is the reference's scratch row: never written here
    launcher(_pool_kernel, kv_proj, gate_proj, kv_state, cache)[(B, T // ratio + 1)](
        kv_proj, gate_proj, ape, norm_weight, inv_freq, start_pos, kv_state, score_state, cache,
        T, n_blocks, float(norm_eps), float(D ** -0.5),
        kv_proj.stride(0), kv_proj.stride(1), gate_proj.stride(0), gate_proj.stride(1), kv_state.stride(0),
        cache.stride(0), cache.stride(1),
        M=ratio, C=c, D=D, DP=DP, R=R, SB=min(SLOTS_PER_STEP, triton.next_power_of_2(ratio)), ROTATE=bool(rotate),
        num_warps=4 if DP <= 256 else 8)
    _launch_state(kv_proj, gate_proj, ape, start_pos, kv_state, score_state, ratio)


def _launch_state(kv_proj, gate_proj, ape, start_pos, kv_state, score_state, ratio: int) -> None:
    """The state pass (after the pool pass, which reads the old rows)."""
    B, T, CW = kv_proj.shape
    c = 2 if ratio == 4 else 1
    sp = triton.next_power_of_2(c * ratio)
    cb = min(triton.next_power_of_2(CW), max(16, STATE_ELEMS // sp))
    launcher(_state_kernel, kv_proj, gate_proj, kv_state)[(B, triton.cdiv(CW, cb))](
        kv_proj, gate_proj, ape, start_pos, kv_state, score_state, T,
        kv_proj.stride(0), kv_proj.stride(1), gate_proj.stride(0), gate_proj.stride(1), kv_state.stride(0),
        M=ratio, C=c, CW=CW, SP=sp, CB=cb, num_warps=4)


def compress_packed_launch(kv_proj: torch.Tensor, gate_proj: torch.Tensor, ape: torch.Tensor,
                           norm_weight: torch.Tensor, inv_freq: torch.Tensor, start_pos: torch.Tensor,
                           kv_state: torch.Tensor, score_state: torch.Tensor, cache: torch.Tensor,
                           cache_scale: torch.Tensor, ratio: int, norm_eps: float, rotate: bool) -> None:
    """compress_launch for production-layout caches (uint8 data + scale rows, model/cache.py): the entries are
    computed in bf16 (v4::compress_packed's PACKED_ACT) and stored as their exact encodings."""
    B, T, CW, c, D, R, sw = _check_packed(kv_proj, gate_proj, ape, norm_weight, inv_freq, start_pos, kv_state,
                                          score_state, cache, cache_scale, ratio, rotate)
    if isinstance(B, int) and isinstance(T, int) and B * T == 0:  # eager only: no guard on symbolic sizes
        return
    DP = D if rotate else max(triton.next_power_of_2(D), 64)
    launcher(_pool_packed_kernel, kv_proj, gate_proj, kv_state, cache, cache_scale)[(B, T // ratio + 1)](
        kv_proj, gate_proj, ape, norm_weight, inv_freq, start_pos, kv_state, score_state, cache, cache_scale,
        T, cache.shape[1] - 1, float(norm_eps), float(D ** -0.5),
        kv_proj.stride(0), kv_proj.stride(1), gate_proj.stride(0), gate_proj.stride(1), kv_state.stride(0),
        cache.stride(0), cache.stride(1), cache_scale.stride(0), cache_scale.stride(1),
        M=ratio, C=c, D=D, DP=DP, R=R, SB=min(SLOTS_PER_STEP, triton.next_power_of_2(ratio)), ROTATE=bool(rotate),
        SW=sw, num_warps=4 if DP <= 256 else 8)
    _launch_state(kv_proj, gate_proj, ape, start_pos, kv_state, score_state, ratio)


@torch.library.triton_op("v4triton::compress", mutates_args=("kv_state", "score_state", "cache"))
def compress(kv_proj: torch.Tensor, gate_proj: torch.Tensor, ape: torch.Tensor, norm_weight: torch.Tensor,
             inv_freq: torch.Tensor, start_pos: torch.Tensor, kv_state: torch.Tensor, score_state: torch.Tensor,
             cache: torch.Tensor, ratio: int, norm_eps: float, rotate: bool) -> None:
    """Same contract as v4::compress; the cache's scratch row (the last) is left untouched."""
    compress_launch(kv_proj, gate_proj, ape, norm_weight, inv_freq, start_pos, kv_state, score_state, cache,
                    ratio, norm_eps, rotate)


def supports_compress(kv_proj, gate_proj, ape, norm_weight, inv_freq, start_pos, kv_state, score_state, cache,
                      ratio, norm_eps=1e-6, rotate=False, *_rest, **_kw) -> bool:
    """Capability check: the launcher's shape / dtype / layout conditions."""
    return accepts(_check, kv_proj, gate_proj, ape, norm_weight, inv_freq, start_pos, kv_state, score_state, cache,
                   ratio, rotate)


register_kernel("v4::compress", ("h100", "h200"), supports_compress, priority=10,
                name="v4triton::compress")(compress)


@torch.library.triton_op("v4triton::compress_packed", mutates_args=("kv_state", "score_state", "cache", "cache_scale"))
def compress_packed(kv_proj: torch.Tensor, gate_proj: torch.Tensor, ape: torch.Tensor, norm_weight: torch.Tensor,
                    inv_freq: torch.Tensor, start_pos: torch.Tensor, kv_state: torch.Tensor,
                    score_state: torch.Tensor, cache: torch.Tensor, cache_scale: torch.Tensor, ratio: int,
                    norm_eps: float, rotate: bool) -> None:
    """Same contract as v4::compress_packed; the scratch rows (the last) of both caches are left untouched."""
    compress_packed_launch(kv_proj, gate_proj, ape, norm_weight, inv_freq, start_pos, kv_state, score_state, cache,
                           cache_scale, ratio, norm_eps, rotate)


def supports_compress_packed(kv_proj, gate_proj, ape, norm_weight, inv_freq, start_pos, kv_state, score_state,
                             cache, cache_scale, ratio, norm_eps=1e-6, rotate=False, *_rest, **_kw) -> bool:
    """Capability check: the packed launcher's shape / dtype / layout conditions."""
    return accepts(_check_packed, kv_proj, gate_proj, ape, norm_weight, inv_freq, start_pos, kv_state, score_state,
                   cache, cache_scale, ratio, rotate)


register_kernel("v4::compress_packed", ("h100", "h200"), supports_compress_packed, priority=10,
                name="v4triton::compress_packed")(torch.ops.v4triton.compress_packed.default)

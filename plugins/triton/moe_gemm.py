"""Routed (and optionally shared) experts in FP8 (V4-SPEC sections 0, 8.2, 14.3) as `v4triton::moe_experts_fp8`
and the drop-in `v4triton::moe_experts` (same signature as v4::moe_experts, FP8 expert weights).

Legend: N tokens, d hidden, I expert intermediate width, E experts in the weight stack (routed, then the
shared ones), k routed picks per token, kt = k + n_shared slots per token, R = N * kt routes (route r =
token r // kt, slot r % kt), BM x BN output tile, BK = 128 (one scale block of the reduction dim).

Math per route (token n, expert e, weight w): g/u = act_fp8(x_n) @ W1_e^T / W3_e^T with 128x128 block scales
and fp32 accumulation, rounded to the act dtype; h = silu(min(g, L)) * clamp(u, -L, L) * w in fp32; then
act_fp8(h in act dtype) @ W2_e^T rounded to the act dtype; y_n = sum over the routes of n in fp32.
Shared experts are stacked after the routed ones and applied to every token with weight 1.

Two paths:
- grouped (prefill): quantise x once; count routes per expert (atomics) and scatter route ids into
  per-expert groups padded to BM rows; GEMM1 (gate and up accumulators, SwiGLU, routing weight and the
  per-128 FP8 quantisation of h fused in the epilogue); GEMM2 writes each route's output row; a combine
  kernel sums a token's rows in slot order (deterministic, no atomics on the output).
- route (decode, one token): one tile per route in both GEMMs (no sort, no padding), small BN so that
  hundreds of programs stream the 7 experts' weights; h is quantised by the same small kernel as x when
  BN < 128; then the same combine. Both GEMMs are weight-bandwidth bound there.
Weight scales: [E, O/b, K/c], b = 128 (128x128 blocks) or any power of two below (finer rows), c = 128, 64 or
32 (the K loop then steps by c: finer is exact for an MXFP4 repack but costs MMA efficiency); e8m0 or f32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from v4compile.plugins.triton.launch import launcher, unused_arg

BK = 128  # reduction step = the scale block of x, h and the weights along K
_BK = tl.constexpr(BK)  # the same, as kernels see it
E4M3_MAX = 448.0


@dataclass(frozen=True)
class GemmConfig:
    """Tile and launch parameters of one expert GEMM."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Candidate configs; the first of each list is the default (the winner of the H200 sweep recorded in
# docs/perf/moe.md: v4compile/bench/moe.py --sweep times every one); pick_configs chooses BM by group size.
GROUPED_GEMM1_CONFIGS: list[GemmConfig] = [  # BN 128 / 256: h is quantised in the epilogue
    GemmConfig(64, 256, 8, 3),  # best at 512, 4096 and 16384 tokens (halves the A re-reads of BN 128)
    GemmConfig(64, 128, 8, 3),
    GemmConfig(64, 128, 4, 2),  # 2 CTAs per SM (a small spill)
    GemmConfig(64, 128, 8, 4),
    GemmConfig(64, 64, 4, 4),  # BN < 128: h in the act dtype, quantised by a separate small kernel
    GemmConfig(16, 128, 4, 4),  # few rows per expert (8 - 64 tokens)
]
GROUPED_GEMM2_CONFIGS: list[GemmConfig] = [
    GemmConfig(64, 128, 4, 4),
    GemmConfig(64, 128, 4, 3),
    GemmConfig(64, 256, 8, 3),
    GemmConfig(64, 128, 8, 4),
    GemmConfig(16, 128, 4, 4),
]
ROUTE_GEMM1_CONFIGS: list[GemmConfig] = [  # BN < 128: h is quantised by a separate small kernel
    GemmConfig(16, 64, 4, 4),
    GemmConfig(16, 32, 4, 6),
    GemmConfig(16, 32, 4, 4),
    GemmConfig(16, 64, 4, 6),
    GemmConfig(16, 128, 4, 3),
]
ROUTE_GEMM2_CONFIGS: list[GemmConfig] = [
    GemmConfig(16, 32, 4, 6),
    GemmConfig(16, 64, 4, 4),
    GemmConfig(16, 64, 4, 6),
    GemmConfig(16, 128, 4, 4),
]
ROUTE_PATH_MAX_TOKENS = 1  # more tokens share experts (the shared one always): the grouped path reads each once
GROUPED_SMALL_BM_ROWS = 8  # average routes per expert below which the grouped path uses BM = 16 (8, 64 tokens)


# ============================================================================ jit helpers


@triton.jit
def _e8m0_to_f32(b):
    """UE8M0 bytes -> 2^(b - 127) (byte 0 -> 2^-127, byte 255 -> NaN)."""
    b = b.to(tl.int32)
    f = (b << 23).to(tl.float32, bitcast=True)
    f = tl.where(b == 0, 5.877471754111438e-39, f)
    return tl.where(b == 255, float("nan"), f)


@triton.jit
def _pow2_scale(amax):
    """V4-SPEC 14.4: s = 2^ceil(log2(max(amax, 1e-4) * fp32(1/448))) from the float bits; also 1/s (exact)."""
    r = tl.maximum(amax, 1e-4, propagate_nan=tl.PropagateNan.ALL) * (1.0 / 448.0)
    bits = r.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    s = (e << 23).to(tl.float32, bitcast=True)
    inv = ((254 - tl.minimum(e, 254)) << 23).to(tl.float32, bitcast=True)
    return tl.where(e > 254, float("nan"), s), inv


@triton.jit
def _quant_rows(xf):
    """fp32 [BM, 128] -> (e4m3 [BM, 128], fp32 power-of-two scales [BM]) per row."""
    s, inv = _pow2_scale(tl.max(tl.abs(xf), axis=1))
    q = tl.clamp(xf * inv[:, None], -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
    return q.to(tl.float8e4nv), s


@triton.jit
def _expert_of(route, ids_ptr, K_ROUTED, K_TOTAL, E_ROUTED, E_TOTAL, mask):
    """Expert of each route (routed slot: ids[n, j]; shared slot j >= k: E_ROUTED + j - k) and its validity."""
    n = route // K_TOTAL
    j = route - n * K_TOTAL
    routed = j < K_ROUTED
    e = tl.load(ids_ptr + n.to(tl.int64) * K_ROUTED + j, mask=mask & routed, other=-1).to(tl.int32)
    e = tl.where(routed, e, E_ROUTED + j - K_ROUTED)
    ok = mask & (e >= 0) & (e < E_TOTAL)
    return tl.where(ok, e, 0), ok


@triton.jit
def _group_tile(t, counts_ptr, E_TOTAL, BM: tl.constexpr, EP: tl.constexpr):
    """Tile t of the padded expert groups -> (expert, first row of the tile inside the group, group size)."""
    ar = tl.arange(0, EP)
    c = tl.load(counts_ptr + ar, mask=ar < E_TOTAL, other=0)
    tiles = (c + BM - 1) // BM
    cum = tl.cumsum(tiles, 0)
    e = tl.sum((cum <= t).to(tl.int32), 0)  # >= E_TOTAL when t is past the last tile
    first = tl.sum(tl.where(ar == e, cum - tiles, 0), 0)
    cnt = tl.sum(tl.where(ar == e, c, 0), 0)
    return e, (t - first) * BM, cnt


@triton.jit
def _weight_tile(w_ptr, s_ptr, rn, kb, stride_wn, stride_sn, rk, SCALE_BN: tl.constexpr, E8M0: tl.constexpr):
    """One [BN, SK] e4m3 weight tile at reduction step kb (SK = len(rk) = the scales' K block) and its scale:
    a scalar when the tile lies inside one scale block along N (SCALE_BN >= BN), else one per column [BN]."""
    b = tl.load(w_ptr + rn.to(tl.int64)[:, None] * stride_wn + (rk + kb * rk.shape[0])[None, :])
    if SCALE_BN >= rn.shape[0]:
        sp = s_ptr + (tl.min(rn, 0) // SCALE_BN) * stride_sn + kb
    else:
        sp = s_ptr + (rn // SCALE_BN) * stride_sn + kb
    if E8M0:
        sb = _e8m0_to_f32(tl.load(sp))
    else:
        sb = tl.load(sp)
    return b, sb


@triton.jit
def _tile_scale(sa, sb, SCALAR: tl.constexpr):
    """act scale [BM] x weight scale (scalar or [BN]) -> broadcastable [BM, 1] or [BM, BN] (exact: powers of 2)."""
    if SCALAR:
        return (sa * sb)[:, None]
    else:
        return sa[:, None] * sb[None, :]


# ============================================================================ kernels


@triton.jit
def _quant_act_kernel(x_ptr, q_ptr, s_ptr, N, stride_xn, stride_qn, stride_sn, BR: tl.constexpr):
    """x [N, d] -> e4m3 [N, d] and fp32 scales [N, d/128], one (BR rows, 128 channels) block per program."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    kb = tl.program_id(1)
    rk = tl.arange(0, _BK)
    m = (rows < N)[:, None]
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + r64 * stride_xn + (rk + kb * _BK)[None, :], mask=m, other=0.0).to(tl.float32)
    q, s = _quant_rows(x)
    tl.store(q_ptr + r64 * stride_qn + (rk + kb * _BK)[None, :], q, mask=m)
    tl.store(s_ptr + rows.to(tl.int64) * stride_sn + kb, s, mask=rows < N)


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, rank_ptr, R, K_ROUTED, K_TOTAL, E_ROUTED, E_TOTAL, BLOCK: tl.constexpr):
    """counts[e] += 1 per route; rank[r] = the route's row inside its expert group (arrival order)."""
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    e, ok = _expert_of(r, ids_ptr, K_ROUTED, K_TOTAL, E_ROUTED, E_TOTAL, r < R)
    rank = tl.atomic_add(counts_ptr + e, 1, mask=ok, sem="relaxed")
    tl.store(rank_ptr + r, rank, mask=r < R)


@triton.jit
def _scatter_kernel(ids_ptr, counts_ptr, rank_ptr, sroute_ptr, R, K_ROUTED, K_TOTAL, E_ROUTED, E_TOTAL,
                    BM: tl.constexpr, EP: tl.constexpr, BLOCK: tl.constexpr):
    """sroute[first_tile(e) * BM + rank[r]] = r: route ids grouped by expert, groups padded to BM rows."""
    ar = tl.arange(0, EP)
    c = tl.load(counts_ptr + ar, mask=ar < E_TOTAL, other=0)
    tiles = (c + BM - 1) // BM
    first = tl.cumsum(tiles, 0) - tiles
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    e, ok = _expert_of(r, ids_ptr, K_ROUTED, K_TOTAL, E_ROUTED, E_TOTAL, r < R)
    rank = tl.load(rank_ptr + r, mask=ok, other=0)
    pos = tl.gather(first, e, 0) * BM + rank
    tl.store(sroute_ptr + pos, r, mask=ok)


@triton.jit
def _gemm1_kernel(a_ptr, as_ptr, wg_ptr, wu_ptr, sg_ptr, su_ptr, rw_ptr, ids_ptr, counts_ptr, sroute_ptr,
                  h_ptr, hs_ptr, limit, I, D, K_ROUTED, K_TOTAL, E_ROUTED, E_TOTAL,
                  stride_an, stride_asn, stride_we, stride_wn, stride_se, stride_sn, stride_hp, stride_hsp,
                  BM: tl.constexpr, BN: tl.constexpr, EP: tl.constexpr, SCALE_BN: tl.constexpr, SK: tl.constexpr,
                  ROUTE_TILES: tl.constexpr, H_FP8: tl.constexpr, E8M0: tl.constexpr, ROUND: tl.constexpr):
    """h = SwiGLU(x W1^T, x W3^T) * w for one BM x BN tile (gate and up accumulators side by side)."""
    limit = tl.cast(limit, tl.float32)  # float arguments arrive as fp64 when AOTInductor launches the kernel
    pid = tl.program_id(0)
    n_tiles_n = I // BN
    pn = pid % n_tiles_n
    t = pid // n_tiles_n
    offs_m = tl.arange(0, BM)
    if ROUTE_TILES:  # tile t is route t: one valid row
        e, ok = _expert_of(t, ids_ptr, K_ROUTED, K_TOTAL, E_ROUTED, E_TOTAL, t >= 0)
        valid = (offs_m == 0) & ok
        route = t + offs_m * 0
        pos = route
    else:
        e, row0, cnt = _group_tile(t, counts_ptr, E_TOTAL, BM, EP)
        if e >= E_TOTAL:
            return
        valid = row0 + offs_m < cnt
        pos = t * BM + offs_m
        route = tl.load(sroute_ptr + pos, mask=valid, other=0)
    tok = route // K_TOTAL
    slot = route - tok * K_TOTAL
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, SK)  # reduction step = the weight scales' K block (128, or finer)
    e64 = e.to(tl.int64)
    wg_e, wu_e = wg_ptr + e64 * stride_we, wu_ptr + e64 * stride_we
    sg_e, su_e = sg_ptr + e64 * stride_se, su_ptr + e64 * stride_se
    a_rows = a_ptr + tok.to(tl.int64)[:, None] * stride_an + rk[None, :]
    acc_g = tl.zeros([BM, BN], dtype=tl.float32)
    acc_u = tl.zeros([BM, BN], dtype=tl.float32)
    for kb in range(0, D // SK):
        a = tl.load(a_rows + kb * SK, mask=valid[:, None], other=0.0)
        sa = tl.load(as_ptr + tok.to(tl.int64) * stride_asn + kb * SK // _BK, mask=valid, other=0.0)
        bg, sbg = _weight_tile(wg_e, sg_e, rn, kb, stride_wn, stride_sn, rk, SCALE_BN, E8M0)
        bu, sbu = _weight_tile(wu_e, su_e, rn, kb, stride_wn, stride_sn, rk, SCALE_BN, E8M0)
        acc_g += tl.dot(a, tl.trans(bg)) * _tile_scale(sa, sbg, SCALE_BN >= BN)
        acc_u += tl.dot(a, tl.trans(bu)) * _tile_scale(sa, sbu, SCALE_BN >= BN)
    g, u = acc_g, acc_u
    if ROUND:  # the expert GEMMs return the act dtype (V4-SPEC 14.3)
        g = g.to(tl.bfloat16).to(tl.float32)
        u = u.to(tl.bfloat16).to(tl.float32)
    if limit > 0:
        u = tl.minimum(tl.maximum(u, -limit), limit)
        g = tl.minimum(g, limit)
    rw = tl.load(rw_ptr + tok.to(tl.int64) * K_ROUTED + slot, mask=valid & (slot < K_ROUTED), other=1.0)
    h = g / (1.0 + tl.exp(-g)) * u * rw[:, None]
    if ROUND:
        h = h.to(tl.bfloat16).to(tl.float32)
    p64 = pos.to(tl.int64)
    if H_FP8:  # per-128 FP8 quantisation of h for GEMM2, fused here (BN is a multiple of 128)
        h3 = tl.reshape(h, [BM, BN // _BK, _BK])
        s, inv = _pow2_scale(tl.max(tl.abs(h3), axis=2))
        q = tl.clamp(h3 * inv[:, :, None], -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
        q = tl.reshape(q, [BM, BN]).to(tl.float8e4nv)
        tl.store(h_ptr + p64[:, None] * stride_hp + rn[None, :], q, mask=valid[:, None])
        sc = pn * (BN // _BK) + tl.arange(0, BN // _BK)
        tl.store(hs_ptr + p64[:, None] * stride_hsp + sc[None, :], s, mask=valid[:, None])
    else:
        tl.store(h_ptr + p64[:, None] * stride_hp + rn[None, :], h, mask=valid[:, None])


@triton.jit
def _gemm2_kernel(a_ptr, as_ptr, w_ptr, s_ptr, ids_ptr, counts_ptr, sroute_ptr, o_ptr,
                  D, I, K_ROUTED, K_TOTAL, E_ROUTED, E_TOTAL,
                  stride_ap, stride_asp, stride_we, stride_wn, stride_se, stride_sn, stride_op,
                  BM: tl.constexpr, BN: tl.constexpr, EP: tl.constexpr, SCALE_BN: tl.constexpr, SK: tl.constexpr,
                  ROUTE_TILES: tl.constexpr, E8M0: tl.constexpr):
    """o[route] = act_fp8(h) W2^T for one BM x BN tile (grouped rows, or one route per tile)."""
    pid = tl.program_id(0)
    n_tiles_n = D // BN
    pn = pid % n_tiles_n
    t = pid // n_tiles_n
    offs_m = tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, SK)
    n_kb = I // SK
    if ROUTE_TILES:  # tile t is route t: one valid row, h indexed by route
        e, ok = _expert_of(t, ids_ptr, K_ROUTED, K_TOTAL, E_ROUTED, E_TOTAL, t >= 0)
        valid = (offs_m == 0) & ok
        p64 = (t + offs_m * 0).to(tl.int64)
        route = t + offs_m * 0
    else:
        e, row0, cnt = _group_tile(t, counts_ptr, E_TOTAL, BM, EP)
        if e >= E_TOTAL:
            return
        valid = row0 + offs_m < cnt
        p64 = (t * BM + offs_m).to(tl.int64)
        route = tl.load(sroute_ptr + p64, mask=valid, other=0)
    e64 = e.to(tl.int64)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for kb in range(0, n_kb):
        a = tl.load(a_ptr + p64[:, None] * stride_ap + (rk + kb * SK)[None, :], mask=valid[:, None], other=0.0)
        sa = tl.load(as_ptr + p64 * stride_asp + kb * SK // _BK, mask=valid, other=0.0)
        b, sb = _weight_tile(w_ptr + e64 * stride_we, s_ptr + e64 * stride_se, rn, kb, stride_wn,
                             stride_sn, rk, SCALE_BN, E8M0)
        acc += tl.dot(a, tl.trans(b)) * _tile_scale(sa, sb, SCALE_BN >= BN)
    # the store rounds to the act dtype of o (each expert's output is rounded before the sum)
    tl.store(o_ptr + route.to(tl.int64)[:, None] * stride_op + rn[None, :], acc, mask=valid[:, None])


@triton.jit
def _combine_kernel(o_ptr, ids_ptr, y_ptr, D, K_ROUTED, K_TOTAL, E_ROUTED, E_TOTAL, stride_op, stride_yn,
                    BD: tl.constexpr):
    """y[n] = sum over the token's slots of the route rows, fp32, in slot order (invalid ids add nothing)."""
    n = tl.program_id(0)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    cm = cols < D
    y = tl.zeros([BD], dtype=tl.float32)
    for j in range(0, K_TOTAL):
        r = n * K_TOTAL + j
        _, ok = _expert_of(r, ids_ptr, K_ROUTED, K_TOTAL, E_ROUTED, E_TOTAL, r >= 0)
        y += tl.load(o_ptr + r.to(tl.int64) * stride_op + cols, mask=cm & ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + n.to(tl.int64) * stride_yn + cols, y, mask=cm)


# ============================================================================ launchers


@dataclass(frozen=True)
class _Problem:
    """Validated sizes and formats of one call."""

    N: int
    d: int
    I: int
    E: int
    k: int
    kt: int
    scale_bn1: int  # output rows per weight-scale row of W1/W3 (128: 128x128 blocks; 1: per row)
    scale_bn2: int  # same for W2
    scale_bk1: int  # reduction channels per weight-scale column of W1/W3 (128, 64 or 32)
    scale_bk2: int  # same for W2
    e8m0: bool
    act: torch.dtype  # activation dtype: expert outputs and h are rounded to it

    @property
    def round_bf16(self) -> bool:
        return self.act == torch.bfloat16


def _fail(msg: str) -> None:
    raise ValueError(f"moe_experts_fp8: {msg}")


def _scale_block(s: torch.Tensor, w: torch.Tensor, name: str) -> tuple[int, int]:
    """(rows, channels) per scale of weight w [E, O, K] with scales s [E, O/b, K/c]: b a power of two <= 128,
    c in (32, 64, 128) (128x128 blocks, or the finer layouts an exact MXFP4 repack produces)."""
    E, O, K = w.shape
    if s.dim() != 3 or s.shape[0] != E or s.stride(-1) != 1 or not s.shape[1] or not s.shape[2]:
        _fail(f"{name} scale must be [{E}, O/b, K/c] with unit last stride, got {list(s.shape)} "
              f"strides {list(s.stride())}")
    b, c = O // s.shape[1], K // s.shape[2]
    if b < 1 or b * s.shape[1] != O or b > BK or b & (b - 1):
        _fail(f"{name} scale rows {s.shape[1]} do not split {O} rows into power-of-two blocks <= 128")
    if c * s.shape[2] != K or c not in (32, 64, 128):
        _fail(f"{name} scale columns {s.shape[2]} do not split {K} channels into blocks of 32, 64 or 128")
    return b, c


def _check(x, weights, ids, w_gate, w_up, s_gate, s_up, w2, s2, n_shared) -> _Problem:
    if x.dim() != 2 or x.stride(-1) != 1 or x.dtype not in (torch.bfloat16, torch.float32):
        _fail(f"x must be bfloat16/float32 [N, d] with unit last stride, got {x.dtype} {list(x.shape)}")
    N, d = x.shape
    if ids.dim() != 2 or ids.shape[0] != N or ids.dtype not in (torch.int32, torch.int64):
        _fail(f"ids must be int32/int64 [{N}, k], got {ids.dtype} {list(ids.shape)}")
    if weights.shape != ids.shape or weights.dtype != torch.float32:
        _fail(f"weights must be float32 {list(ids.shape)}, got {weights.dtype} {list(weights.shape)}")
    for name, w in (("w1", w_gate), ("w3", w_up), ("w2", w2)):
        if w.dtype != torch.float8_e4m3fn or w.dim() != 3 or w.stride(-1) != 1:
            _fail(f"{name} must be float8_e4m3fn [E, O, K] with unit last stride, got {w.dtype} {list(w.shape)}")
    E, I, dk = w_gate.shape
    if dk != d or w_up.shape != w_gate.shape or w_up.stride() != w_gate.stride():
        _fail(f"w1/w3 must both be [E, I, {d}] with equal strides, got {list(w_gate.shape)} and {list(w_up.shape)}")
    if tuple(w2.shape) != (E, d, I):
        _fail(f"w2 must be [{E}, {d}, {I}], got {list(w2.shape)}")
    if d % BK or I % BK:
        _fail(f"d and the expert width must be multiples of {BK}, got d={d}, I={I}")
    if not 0 <= n_shared <= E or E > 4096:
        _fail(f"n_shared must be in [0, {E}] and at most 4096 experts, got n_shared={n_shared}, E={E}")
    dtypes = {s.dtype for s in (s_gate, s_up, s2)}
    if len(dtypes) != 1 or dtypes.pop() not in (torch.float8_e8m0fnu, torch.float32):
        _fail(f"scales must all be float8_e8m0fnu or all float32, got {s_gate.dtype}, {s_up.dtype}, {s2.dtype}")
    sb1 = _scale_block(s_gate, w_gate, "w1")
    if _scale_block(s_up, w_up, "w3") != sb1 or s_up.stride() != s_gate.stride():
        _fail(f"w1 and w3 scales must have the same shape and strides, got {list(s_gate.shape)}, {list(s_up.shape)}")
    sb2 = _scale_block(s2, w2, "w2")
    k = ids.shape[1]
    return _Problem(N, d, I, E, k, k + n_shared, sb1[0], sb2[0], sb1[1], sb2[1], s_gate.dtype == torch.float8_e8m0fnu,
                    x.dtype)


def pick_path(n_tokens: int) -> str:
    """'route' for decode-sized calls (weights read once per route, no sort), 'grouped' otherwise."""
    return "route" if n_tokens <= ROUTE_PATH_MAX_TOKENS else "grouped"


def pick_configs(path: str, n_tokens: int | None, kt: int, n_experts: int, inter: int = 2048,
                 dim: int = 4096) -> tuple[GemmConfig, GemmConfig]:
    """(GEMM1, GEMM2): the first candidates whose BN divides the widths (I for GEMM1, d for GEMM2); grouped
    GEMMs share BM: 16 when experts average fewer than GROUPED_SMALL_BM_ROWS routes, else 64 (also when
    n_tokens is None: unknown at export time)."""
    if path == "route":
        c1s, c2s, bm = ROUTE_GEMM1_CONFIGS, ROUTE_GEMM2_CONFIGS, 16
    elif path == "grouped":
        c1s, c2s = GROUPED_GEMM1_CONFIGS, GROUPED_GEMM2_CONFIGS
        bm = 16 if n_tokens is not None and n_tokens * kt < GROUPED_SMALL_BM_ROWS * n_experts else 64
    else:
        raise ValueError(f"moe_experts_fp8: path must be 'route' or 'grouped', got {path!r}")
    c1 = next((c for c in c1s if c.block_m == bm and inter % c.block_n == 0), None)
    c2 = next((c for c in c2s if c.block_m == bm and dim % c.block_n == 0), None)
    if c1 is None or c2 is None:
        _fail(f"no {path} config with BM={bm} divides I={inter} and d={dim}")
    return c1, c2


def _scale_arg(s: torch.Tensor) -> torch.Tensor:
    return s.view(torch.uint8) if s.dtype == torch.float8_e8m0fnu else s


def _new(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, poison: bool) -> torch.Tensor:
    """Output buffer; poisoned with NaN (e4m3 byte 0x7F) when testing that every element gets written."""
    if not poison:
        return torch.empty(shape, dtype=dtype, device=device)
    if dtype == torch.float8_e4m3fn:
        return torch.full(shape, 0x7F, dtype=torch.uint8, device=device).view(dtype)
    return torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype, device=device)


def _quant_rows_fp8(x: torch.Tensor, poison: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row, per-128 activation quantisation: x [M, K] -> (e4m3 [M, K], fp32 scales [M, K/128])."""
    M, K = x.shape
    q = _new((M, K), torch.float8_e4m3fn, x.device, poison)
    s = _new((M, K // BK), torch.float32, x.device, poison)
    launcher(_quant_act_kernel)[(triton.cdiv(M, 16), K // BK)](
        x, q, s, M, x.stride(0), q.stride(0), s.stride(0), BR=16, num_warps=4)
    return q, s


def _gemm1(p: _Problem, rows: int, grid_tiles: int, xq, xs, w_gate, w_up, s_gate, s_up, weights, ids, counts,
           sroute, limit, cfg: GemmConfig, route_tiles: bool, ep: int,
           poison: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """GEMM1 + SwiGLU into h [rows, I]; h is FP8 + scales when BN is a multiple of 128, else quantised after."""
    if p.I % cfg.block_n:
        _fail(f"GEMM1 BN={cfg.block_n} must divide the expert width {p.I}")
    h_fp8 = cfg.block_n % BK == 0
    h = _new((rows, p.I), torch.float8_e4m3fn if h_fp8 else p.act, xq.device, poison)
    hs = _new((rows, p.I // BK) if h_fp8 else (1, 1), torch.float32, xq.device, poison)
    launcher(_gemm1_kernel)[(grid_tiles * (p.I // cfg.block_n),)](
        xq, xs, w_gate, w_up, s_gate, s_up, weights, ids, counts, sroute, h, hs, float(limit), p.I, p.d,
        p.k, p.kt, p.E - (p.kt - p.k), p.E, xq.stride(0), xs.stride(0), w_gate.stride(0), w_gate.stride(1),
        s_gate.stride(0), s_gate.stride(1), h.stride(0), hs.stride(0),
        BM=cfg.block_m, BN=cfg.block_n, EP=ep, SCALE_BN=p.scale_bn1, SK=p.scale_bk1, ROUTE_TILES=route_tiles,
        H_FP8=h_fp8,
        E8M0=p.e8m0, ROUND=p.round_bf16, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return (h, hs) if h_fp8 else _quant_rows_fp8(h, poison)


def _gemm2(p: _Problem, grid_tiles: int, hq, hs, w2, s2, ids, counts, sroute, out, cfg: GemmConfig,
           route_tiles: bool, ep: int) -> None:
    if p.d % cfg.block_n:
        _fail(f"GEMM2 BN={cfg.block_n} must divide d={p.d}")
    launcher(_gemm2_kernel)[(grid_tiles * (p.d // cfg.block_n),)](
        hq, hs, w2, s2, ids, counts, sroute, out, p.d, p.I, p.k, p.kt, p.E - (p.kt - p.k), p.E,
        hq.stride(0), hs.stride(0), w2.stride(0), w2.stride(1), s2.stride(0), s2.stride(1), out.stride(0),
        BM=cfg.block_m, BN=cfg.block_n, EP=ep, SCALE_BN=p.scale_bn2, SK=p.scale_bk2, ROUTE_TILES=route_tiles,
        E8M0=p.e8m0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _combine(p: _Problem, o: torch.Tensor, ids: torch.Tensor, poison: bool) -> torch.Tensor:
    y = _new((p.N, p.d), torch.float32, o.device, poison)
    bd = min(1024, triton.next_power_of_2(p.d))
    launcher(_combine_kernel)[(p.N, triton.cdiv(p.d, bd))](
        o, ids, y, p.d, p.k, p.kt, p.E - (p.kt - p.k), p.E, o.stride(0), y.stride(0), BD=bd, num_warps=4)
    return y


def _launch_route(p: _Problem, x, weights, ids, w_gate, w_up, s_gate, s_up, w2, s2, limit, cfg1, cfg2, poison):
    """Decode path: one tile per route in both GEMMs (no sort; weights read once per route), then combine."""
    R = p.N * p.kt
    xq, xs = _quant_rows_fp8(x, poison)
    # counts / sroute are not read with ROUTE_TILES: distinct dummies, never `ids` again (launch._check_distinct)
    counts, sroute = unused_arg(x.device), unused_arg(x.device)
    hq, hs = _gemm1(p, R, R, xq, xs, w_gate, w_up, s_gate, s_up, weights, ids, counts, sroute, limit, cfg1, True,
                    16, poison)
    o = _new((R, p.d), x.dtype, x.device, poison)
    _gemm2(p, R, hq, hs, w2, s2, ids, counts, sroute, o, cfg2, True, 16)
    return _combine(p, o, ids, poison)


def sort_routes(ids: torch.Tensor, n_experts: int, n_shared: int, block_m: int,
                ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Group the routes by expert: (counts int32 [E], sroute int32 [t_max * BM], t_max). Tile t holds the
    routes sroute[t*BM : (t+1)*BM] of one expert (groups padded to BM; unused slots are never read)."""
    N, k = ids.shape
    kt = k + n_shared
    R = N * kt
    counts = torch.zeros((n_experts,), dtype=torch.int32, device=ids.device)
    rank = torch.empty((R,), dtype=torch.int32, device=ids.device)
    blk = 1024
    launcher(_count_kernel)[(triton.cdiv(R, blk),)](
        ids, counts, rank, R, k, kt, n_experts - n_shared, n_experts, BLOCK=blk, num_warps=4)
    t_max = torch.sym_min(R, triton.cdiv(R, block_m) + n_experts)  # each tile >= 1 route; < 1 padding tile each
    sroute = torch.empty((t_max * block_m,), dtype=torch.int32, device=ids.device)
    launcher(_scatter_kernel)[(triton.cdiv(R, blk),)](
        ids, counts, rank, sroute, R, k, kt, n_experts - n_shared, n_experts, BM=block_m,
        EP=triton.next_power_of_2(n_experts), BLOCK=blk, num_warps=4)
    return counts, sroute, t_max


def _launch_grouped(p: _Problem, x, weights, ids, w_gate, w_up, s_gate, s_up, w2, s2, limit, cfg1, cfg2, poison):
    """Prefill path: sort routes into per-expert groups padded to BM, grouped GEMMs, deterministic combine."""
    if cfg2.block_m != cfg1.block_m:
        _fail(f"grouped GEMM1 and GEMM2 must share BM (the group padding), got {cfg1.block_m} and {cfg2.block_m}")
    ep = triton.next_power_of_2(p.E)
    xq, xs = _quant_rows_fp8(x, poison)
    counts, sroute, t_max = sort_routes(ids, p.E, p.kt - p.k, cfg1.block_m)
    hq, hs = _gemm1(p, t_max * cfg1.block_m, t_max, xq, xs, w_gate, w_up, s_gate, s_up, weights, ids, counts,
                    sroute, limit, cfg1, False, ep, poison)
    o = _new((p.N * p.kt, p.d), x.dtype, x.device, poison)
    _gemm2(p, t_max, hq, hs, w2, s2, ids, counts, sroute, o, cfg2, False, ep)
    return _combine(p, o, ids, poison)


def moe_experts_launch(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w_gate: torch.Tensor,
                       w_up: torch.Tensor, s_gate: torch.Tensor, s_up: torch.Tensor, w2: torch.Tensor,
                       s2: torch.Tensor, limit: float, n_shared: int = 0, path: str = "auto",
                       configs: tuple[GemmConfig, GemmConfig] | None = None, poison: bool = False) -> torch.Tensor:
    """Validate, pick the path and configs (overridable for tests / the bench sweep), launch; y f32 [N, d].
    poison: fill outputs and intermediates with NaN first (tests: an unwritten element shows)."""
    ids, weights = ids.contiguous(), weights.contiguous()
    p = _check(x, weights, ids, w_gate, w_up, s_gate, s_up, w2, s2, n_shared)
    if isinstance(p.N, int) and p.N == 0:
        return torch.empty((0, p.d), dtype=torch.float32, device=x.device)
    concrete = isinstance(p.N, int)  # under torch.export N is symbolic: no branch on it (grouped, BM 64)
    if path == "auto":
        path = pick_path(p.N) if concrete else "grouped"
    cfg1, cfg2 = configs or pick_configs(path, p.N if concrete else None, p.kt, p.E, p.I, p.d)
    args = (p, x, weights, ids, w_gate, w_up, _scale_arg(s_gate), _scale_arg(s_up), w2, _scale_arg(s2), limit,
            cfg1, cfg2, poison)
    if path == "route":
        return _launch_route(*args)
    if path == "grouped":
        return _launch_grouped(*args)
    raise ValueError(f"moe_experts_fp8: path must be 'auto', 'route' or 'grouped', got {path!r}")


@torch.library.triton_op("v4triton::moe_experts_fp8", mutates_args=())
def moe_experts_fp8(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor,
                    s13: torch.Tensor, w2: torch.Tensor, s2: torch.Tensor, limit: float,
                    n_shared: int = 0) -> torch.Tensor:
    """y f32 [N, d] = sum of the routed experts (and of the last n_shared stacked experts, weight 1);
    w13 [E, 2I, d] = W1 rows then W3 rows per expert, s13 [E, 2I/b, d/128]; see the module docstring."""
    I, si = w13.shape[1] // 2, s13.shape[1] // 2
    return moe_experts_launch(x, weights, ids, w13[:, :I], w13[:, I:], s13[:, :si], s13[:, si:], w2, s2, limit,
                              n_shared)


@torch.library.triton_op("v4triton::moe_experts", mutates_args=())
def moe_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w1: torch.Tensor, s1: torch.Tensor,
                w3: torch.Tensor, s3: torch.Tensor, w2: torch.Tensor, s2: torch.Tensor,
                swiglu_limit: float) -> torch.Tensor:
    """Drop-in for v4::moe_experts with FP8 expert weights (128x128 or finer scales): y f32 [N, d]."""
    return moe_experts_launch(x, weights, ids, w1, w3, s1, s3, w2, s2, swiglu_limit, 0)


def pack_experts_fp8(w1: torch.Tensor, s1: torch.Tensor, w3: torch.Tensor, s3: torch.Tensor, w2: torch.Tensor,
                     s2: torch.Tensor, shared: tuple[torch.Tensor, ...] | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Build-time layout for moe_experts_fp8: (w13, s13, w2, s2, n_shared), the shared expert's
    (w1, s1, w3, s3, w2, s2) appended as the last expert (its e8m0 scales converted when the stack is f32)."""
    if shared is not None:
        if len(shared) != 6:
            raise ValueError(f"pack_experts_fp8: shared must be (w1, s1, w3, s3, w2, s2), got {len(shared)} items")
        parts = [w1, s1, w3, s3, w2, s2]
        for i, t in enumerate(shared):
            t = t.unsqueeze(0)
            if parts[i].dtype == torch.float32 and t.dtype == torch.float8_e8m0fnu:
                t = t.float()  # exact: every e8m0 value is a float32
            if t.dtype != parts[i].dtype or t.shape[1:] != parts[i].shape[1:]:
                raise ValueError(f"pack_experts_fp8: shared tensor {i} is {t.dtype} {list(t.shape[1:])}, the "
                                 f"stack holds {parts[i].dtype} {list(parts[i].shape[1:])}")
            parts[i] = torch.cat([parts[i], t])
        w1, s1, w3, s3, w2, s2 = parts
    return torch.cat([w1, w3], dim=1), torch.cat([s1, s3], dim=1), w2, s2, 0 if shared is None else 1


def supports_moe_experts(x, weights, ids, w1, s1, w3, s3, w2, s2, swiglu_limit) -> bool:
    """Capability check for v4::moe_experts: FP8 e4m3 experts, e8m0/f32 scales, widths multiples of 128."""
    return (w1.dtype == torch.float8_e4m3fn and w3.dtype == w1.dtype and w2.dtype == w1.dtype
            and x.dtype in (torch.bfloat16, torch.float32) and x.dim() == 2
            and s1.dtype in (torch.float8_e8m0fnu, torch.float32)
            and x.shape[1] % BK == 0 and w1.dim() == 3 and w1.shape[1] % BK == 0)


def _register() -> None:
    from v4compile.plugins.registry import register_kernel

    register_kernel("v4::moe_experts", ("h100", "h200"), supports=supports_moe_experts, priority=10,
                    name="v4triton::moe_experts")(torch.ops.v4triton.moe_experts)


_register()

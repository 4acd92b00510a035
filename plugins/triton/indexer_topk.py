"""Lightning indexer (V4-SPEC section 4.3) with an exact radix top-k: `v4triton::indexer_scores`,
`v4triton::topk_select` and the fused `v4triton::indexer_topk`, plus `v4triton::indexer_scores_fp4` /
`v4triton::indexer_topk_fp4` over the packed FP4 key layout (quant.kv_layout.pack_index_keys: 68 B per key).

Legend: B batch, T queries per sequence, R = B*T score rows, Hi index heads, Di index head dim, N key rows
(compressed blocks), k picks per row, BT queries per score program.

score[b,t,j] = sum_h w[b,t,h] * ReLU(q[b,t,h] . k[b,j])  for j < min(N, (pos[b,t]+1) // ratio), else -inf.
Products accumulate in fp32 on tensor cores (bf16/fp16 inputs) or in IEEE fp32 (float32 inputs); the
reference op v4::indexer_scores also computes in fp32, so scores agree up to summation order (bit-equal at the
benchmarked shapes on the H200). DeepSeek's own reference einsum runs in bf16 (V4-SPEC 4.3): against that,
picks differ at near-ties only (docs/perf/indexer_topk.md quantifies a plain bf16 implementation).
The FP4 kernel decodes each key exactly to q's dtype (e2m1 nibble x UE8M0 scale, in registers) and sums the
even dims, then the odd dims (score_h = q_even . k_lo + q_odd . k_hi): the bf16-layout kernel's products, in
another summation order.

Top-k (plugins/triton/radix_topk.py): a score's fp32 bits map to an order-preserving uint32 key; two histogram
passes over its top two bytes (a third where that 16-bit bin is crowded), one compaction of the few keys at or
above the prefix, and one finish program per row resolve the exact k-th largest and write the picks.
Output order (deterministic): indices with a score strictly above the k-th largest, ascending; then the
chosen ties (score equal to the k-th largest), ascending; then -1 (fewer than k visible blocks).
torch.topk returns the same SET whenever the k-th largest score is not tied (its tie order is unspecified).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.fx.experimental.symbolic_shapes import statically_known_true

from v4compile.plugins.registry import register_kernel
from v4compile.plugins.triton.launch import accepts, launcher, unused_arg
from v4compile.plugins.triton.radix_topk import (NB, TOPK_CONFIGS, WS_INTS, TopkConfig, _key, launch_select,
                                                 new_workspace, pick_topk_config, workspace_ints_per_row)

__all__ = ["ScoreConfig", "SCORE_CONFIGS", "FP4_SCORE_CONFIGS", "TopkConfig", "TOPK_CONFIGS", "indexer_scores_launch",
           "indexer_topk_launch", "topk_select_launch", "pick_score_config", "pick_topk_config"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class ScoreConfig:
    """Score kernel launch: queries per program (bt), keys per tile (block_n), warps, pipeline stages."""

    bt: int
    block_n: int
    num_warps: int
    num_stages: int


# Candidates swept by `v4compile bench kernels indexer --sweep` on the H200 (docs/perf/indexer_topk.md);
# `pick_score_config` takes [0] for decode and [2] for prefill, the fastest there.
SCORE_CONFIGS: list[ScoreConfig] = [
    ScoreConfig(1, 64, 4, 4),  # decode: one query (Hi = 64 rows of the dot), keys streamed
    ScoreConfig(1, 128, 4, 3),  # decode, batch 64: 8% faster than [0]
    ScoreConfig(2, 64, 4, 3),  # prefill: two queries share each key tile (M = 128)
    ScoreConfig(2, 128, 8, 3),
    ScoreConfig(4, 128, 8, 2),
]
# The FP4-key kernel (decode first, then prefill): it decodes 128 nibbles per key in registers, so more warps
# per key tile may pay where the bf16 kernel is bound by memory alone. Measured on the H200 (docs/perf/indexer_topk.md,
# run 3): at 1M context, batch 1, the three decode configs are within 2 % of each other (45.5-46.1 us fused).
FP4_SCORE_CONFIGS: list[ScoreConfig] = [
    ScoreConfig(1, 64, 4, 3),
    ScoreConfig(1, 128, 8, 3),
    ScoreConfig(1, 128, 4, 3),
    ScoreConfig(2, 64, 4, 3),
    ScoreConfig(2, 128, 8, 2),
]
WORKSPACE_FLOATS = 1 << 28  # fused op: fp32 score rows + top-k workspace per chunk of queries (1 GiB)


# ---------------------------------------------------------------------------------------------- jit helpers


@triton.jit
def _zero_ws(ws_ptr, rows, ok):
    """Zero the top-k workspace rows of this program's queries (the fused op's passes start from zero)."""
    zi = tl.arange(0, WS_INTS)
    tl.store(ws_ptr + rows.to(tl.int64)[:, None] * WS_INTS + zi[None, :], 0, mask=ok[:, None])


@triton.jit
def _e8m0(sb):
    """UE8M0 bytes (int32 0..255) -> float32 2^(byte - 127); byte 0 -> 2^-127, 255 -> NaN (quant.formats)."""
    bits = tl.where(sb == 0, 0x00400000, tl.where(sb == 255, 0x7FC00000, sb << 23))
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _e2m1(top):
    """An e2m1 nibble in bits 28-31 of an int32 -> its float32 value x 2^-126: the arithmetic shift puts the
    2 exponent and 1 mantissa bits at the top of the fp32 mantissa field (codes 0/1 become fp32 subnormals,
    which keeps the map linear) and the mask keeps them and the sign. Exact, no table; x 2^126 rebiases (a
    separate multiply from the block scale's: 2^126 x scale overflows fp32 for scales >= 4)."""
    return ((top >> 6) & -2118123520).to(tl.float32, bitcast=True)  # mask 0x81C00000


# ---------------------------------------------------------------------------------------------- kernels


@triton.jit
def _add_top_digit(hist, s, BLOCK_N: tl.constexpr):
    """hist [NB] += histogram of the top byte of the visible (finite) scores of a [BLOCK_N]-score tile (BT == 1)."""
    flat = tl.reshape(s, (BLOCK_N,))
    return hist + tl.histogram((_key(flat) >> 24).to(tl.int32), NB, mask=flat != float("-inf"))


@triton.jit
def _store_masked_tail(row_base, t_ok, n_start, n_end, N, BT: tl.constexpr, BLOCK_N: tl.constexpr,
                       KEY_MAJOR: tl.constexpr):
    """-inf into score columns n_start..n_end of the BT rows (tiles [BLOCK_N, BT] when KEY_MAJOR, else
    [BT, BLOCK_N]): the keys past every query's limit, which the score loop skips."""
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if KEY_MAJOR:
            tl.store(row_base[None, :] + offs_n[:, None], tl.full((BLOCK_N, BT), float("-inf"), tl.float32),
                     mask=t_ok[None, :] & (offs_n < N)[:, None])
        else:
            tl.store(row_base[:, None] + offs_n[None, :], tl.full((BT, BLOCK_N), float("-inf"), tl.float32),
                     mask=t_ok[:, None] & (offs_n < N)[None, :])


@triton.jit
def _query_block(pos_ptr, ws_ptr, T, N, ratio, sp_b, sp_t, BT: tl.constexpr, ZERO_WS: tl.constexpr):
    """Program axis 0 = (sequence b, block of BT queries from t0): b, t0, the queries' offsets, which exist, and
    how many compressed blocks each one sees ([BT]; 0 for a missing query). With ZERO_WS the first key chunk's
    program (axis 1 = 0) also zeroes these queries' top-k workspace rows."""
    pid_r = tl.program_id(0)
    n_tb = tl.cdiv(T, BT)
    b = (pid_r // n_tb).to(tl.int64)
    t0 = (pid_r % n_tb) * BT
    offs_t = t0 + tl.arange(0, BT)
    t_ok = offs_t < T
    pos = tl.load(pos_ptr + b * sp_b + offs_t * sp_t, mask=t_ok, other=0).to(tl.int64)
    if ZERO_WS:
        if tl.program_id(1) == 0:
            _zero_ws(ws_ptr, b * T + offs_t, t_ok)
    return b, t0, offs_t, t_ok, tl.where(t_ok, tl.minimum((pos + 1) // ratio, N), 0)


@triton.jit
def _scores_kernel(q_ptr, w_ptr, k_ptr, pos_ptr, s_ptr, ws_ptr,
                   T, N, ratio, tiles,
                   sq_b, sq_t, sq_h, sw_b, sw_t, sk_b, sk_n, sp_b, sp_t, ss_r,
                   HI: tl.constexpr, DI: tl.constexpr, BT: tl.constexpr, BLOCK_N: tl.constexpr,
                   HIST: tl.constexpr, WRITE_MASKED: tl.constexpr, ZERO_WS: tl.constexpr, DOT_PREC: tl.constexpr,
                   NUM_STAGES: tl.constexpr):
    """Program (b, query block, key chunk): scores of BT queries against `tiles` tiles of BLOCK_N keys."""
    pid_n = tl.program_id(1)
    b, t0, offs_t, t_ok, lim = _query_block(pos_ptr, ws_ptr, T, N, ratio, sp_b, sp_t, BT, ZERO_WS)
    lim_max = tl.max(lim, 0)

    offs_m = tl.arange(0, BT * HI)  # q rows: query-major, head-minor
    mt = t0 + offs_m // HI
    mh = offs_m % HI
    offs_d = tl.arange(0, DI)
    q = tl.load(q_ptr + b * sq_b + mt[:, None] * sq_t + mh[:, None] * sq_h + offs_d[None, :],
                mask=(mt < T)[:, None], other=0.0)
    w = tl.load(w_ptr + b * sw_b + mt * sw_t + mh, mask=mt < T, other=0.0).to(tl.float32)

    n_first = pid_n * tiles * BLOCK_N
    n_end = tl.minimum(n_first + tiles * BLOCK_N, N)
    n_live = tl.minimum(n_end, lim_max).to(tl.int32)  # keys past every query's limit need no dot product
    row_base = s_ptr + (b * T + offs_t).to(tl.int64) * ss_r
    if HIST:
        hist = tl.zeros((NB,), dtype=tl.int32)
    for n0 in tl.range(n_first, n_live, BLOCK_N, num_stages=NUM_STAGES):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kt = tl.load(k_ptr + b * sk_b + offs_n.to(tl.int64)[:, None] * sk_n + offs_d[None, :],
                     mask=(offs_n < N)[:, None], other=0.0)
        acc = tl.dot(q, tl.trans(kt), input_precision=DOT_PREC)  # [BT*HI, BLOCK_N] fp32
        acc = tl.maximum(acc, 0.0) * w[:, None]
        s = tl.sum(tl.reshape(acc, (BT, HI, BLOCK_N)), axis=1)  # [BT, BLOCK_N]
        s = tl.where(offs_n[None, :] < lim[:, None], s, float("-inf"))
        tl.store(row_base[:, None] + offs_n[None, :], s, mask=t_ok[:, None] & (offs_n < N)[None, :])
        if HIST:  # BT == 1: histogram of the top digit of the visible scores
            hist = _add_top_digit(hist, s, BLOCK_N)
    if WRITE_MASKED:
        _store_masked_tail(row_base, t_ok, tl.maximum(n_live, n_first), n_end, N, BT, BLOCK_N, False)
    if HIST:
        tl.atomic_add(ws_ptr + (b * T + t0) * WS_INTS + tl.arange(0, NB), hist, mask=hist > 0)


@triton.jit
def _scores_fp4_kernel(q_ptr, w_ptr, c_ptr, e_ptr, pos_ptr, s_ptr, ws_ptr,
                       T, N, ratio, tiles,
                       sq_b, sq_t, sq_h, sw_b, sw_t, sc_b, sc_n, se_b, se_n, sp_b, sp_t, ss_r,
                       HI: tl.constexpr, DI: tl.constexpr, BT: tl.constexpr, BLOCK_N: tl.constexpr,
                       HIST: tl.constexpr, WRITE_MASKED: tl.constexpr, ZERO_WS: tl.constexpr,
                       DOT_PREC: tl.constexpr, NUM_STAGES: tl.constexpr):
    """`_scores_kernel` over packed FP4 keys: codes [N, DI/2] bytes (dim 2i in the low nibble of byte i) and
    one UE8M0 byte per 32 dims. Key-major dots (keys x query heads): the head sum stays within each warp."""
    DH: tl.constexpr = DI // 2
    NBLK: tl.constexpr = DI // 32
    M: tl.constexpr = BT * HI
    pid_n = tl.program_id(1)
    b, t0, offs_t, t_ok, lim = _query_block(pos_ptr, ws_ptr, T, N, ratio, sp_b, sp_t, BT, ZERO_WS)
    lim_max = tl.max(lim, 0)

    offs_m = tl.arange(0, M)  # dot columns: query-major, head-minor
    mt = t0 + offs_m // HI
    mh = offs_m % HI
    offs_i = tl.arange(0, DH)  # byte i holds dims 2i (low nibble) and 2i + 1 (high nibble)
    q_ptrs = q_ptr + b * sq_b + mt[None, :] * sq_t + mh[None, :] * sq_h + 2 * offs_i[:, None]  # [DH, M]
    q_even = tl.load(q_ptrs, mask=(mt < T)[None, :], other=0.0)
    q_odd = tl.load(q_ptrs + 1, mask=(mt < T)[None, :], other=0.0)
    w = tl.load(w_ptr + b * sw_b + mt * sw_t + mh, mask=mt < T, other=0.0).to(tl.float32)

    n_first = pid_n * tiles * BLOCK_N
    n_end = tl.minimum(n_first + tiles * BLOCK_N, N)
    n_live = tl.minimum(n_end, lim_max).to(tl.int32)
    row_base = s_ptr + (b * T + offs_t).to(tl.int64) * ss_r
    if HIST:
        hist = tl.zeros((NB,), dtype=tl.int32)
    for n0 in tl.range(n_first, n_live, BLOCK_N, num_stages=NUM_STAGES):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        rows = offs_n.to(tl.int64)[:, None]
        byte = tl.load(c_ptr + b * sc_b + rows * sc_n + offs_i[None, :], mask=n_ok[:, None], other=0).to(tl.int32)
        sb = tl.load(e_ptr + b * se_b + rows * se_n + tl.arange(0, NBLK)[None, :], mask=n_ok[:, None],
                     other=127).to(tl.int32)
        scale = _e8m0(sb)[:, :, None]  # [BLOCK_N, NBLK, 1]
        k_lo = tl.reshape(tl.reshape(_e2m1(byte << 28) * 8.507059173023462e37, (BLOCK_N, NBLK, 16)) * scale,
                          (BLOCK_N, DH))  # x 2^126 rebiases, then the block scale: both exact
        k_hi = tl.reshape(tl.reshape(_e2m1(byte << 24) * 8.507059173023462e37, (BLOCK_N, NBLK, 16)) * scale,
                          (BLOCK_N, DH))
        acc = tl.dot(k_lo.to(q_even.dtype), q_even, input_precision=DOT_PREC)  # [BLOCK_N, M] fp32
        acc = tl.dot(k_hi.to(q_odd.dtype), q_odd, acc, input_precision=DOT_PREC)
        acc = tl.maximum(acc, 0.0) * w[None, :]
        s = tl.sum(tl.reshape(acc, (BLOCK_N, BT, HI)), axis=2)  # [BLOCK_N, BT]
        s = tl.where(offs_n[:, None] < lim[None, :], s, float("-inf"))
        tl.store(row_base[None, :] + offs_n[:, None], s, mask=t_ok[None, :] & n_ok[:, None])
        if HIST:  # BT == 1: histogram of the top digit of the visible scores
            hist = _add_top_digit(hist, s, BLOCK_N)
    if WRITE_MASKED:
        _store_masked_tail(row_base, t_ok, tl.maximum(n_live, n_first), n_end, N, BT, BLOCK_N, True)
    if HIST:
        tl.atomic_add(ws_ptr + (b * T + t0) * WS_INTS + tl.arange(0, NB), hist, mask=hist > 0)


# ---------------------------------------------------------------------------------------------- launchers


def _pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: few programs


def _concrete(*sizes) -> bool:
    """True when no size is symbolic (eager calls); export traces take the branch-free path."""
    return all(isinstance(x, int) for x in sizes)


def pick_score_config(T, n_heads: int, device: torch.device, fp4: bool = False) -> ScoreConfig:
    """Decode (T == 1): one query per program; prefill: two queries share a key tile; >= 16 dot rows.

    Under the interpreter: small tiles, so CI stays fast."""
    decode = statically_known_true(T == 1)  # a symbolic T (export) is a prefill length: no guard on it
    if INTERPRET or device.type != "cuda":
        bt = max(1, 16 // n_heads) if decode else max(2, 16 // n_heads)
        return ScoreConfig(bt, 16, 1, 1)
    configs = FP4_SCORE_CONFIGS if fp4 else SCORE_CONFIGS
    cfg = next(c for c in configs if (c.bt == 1) == decode)  # the first of each kind is the measured best
    return ScoreConfig(max(cfg.bt, 16 // n_heads), cfg.block_n, cfg.num_warps, cfg.num_stages)


def _split_keys(k_cache) -> tuple[torch.Tensor, torch.Tensor | None]:
    """k_cache: a [B, N, Di] tensor, or the packed FP4 pair (codes [B, N, Di/2], scales [B, N, Di/32])."""
    if isinstance(k_cache, (tuple, list)):
        if len(k_cache) != 2:
            raise ValueError(f"packed k_cache must be (codes, scales), got {len(k_cache)} tensors")
        return k_cache[0], k_cache[1]
    return k_cache, None


def _check_indexer_inputs(q: torch.Tensor, w: torch.Tensor, kc: torch.Tensor, pos: torch.Tensor, ratio: int,
                          ks: torch.Tensor | None = None):
    if q.dim() != 4:
        raise ValueError(f"q_idx must be [B, T, Hi, Di], got shape {list(q.shape)}")
    B, T, Hi, Di = q.shape
    if tuple(w.shape) != (B, T, Hi):
        raise ValueError(f"weights must be [B, T, Hi] = {[B, T, Hi]}, got {list(w.shape)}")
    if tuple(pos.shape) != (B, T) or pos.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be int32/int64 [B, T] = {[B, T]}, got {pos.dtype} {list(pos.shape)}")
    if not w.dtype.is_floating_point:
        raise ValueError(f"weights must be floating point, got {w.dtype}")
    if not (_pow2(Hi) and _pow2(Di) and Di >= 16):
        raise ValueError(f"Hi and Di must be powers of two with Di >= 16, got Hi={Hi}, Di={Di}")
    if ks is None:
        if kc.dim() != 3 or kc.shape[0] != B or kc.shape[2] != Di:
            raise ValueError(f"k_cache must be [B, N, Di] with B={B}, Di={Di}, got {list(kc.shape)}")
        if q.dtype not in (torch.bfloat16, torch.float16, torch.float32) or kc.dtype != q.dtype:
            raise ValueError(f"q_idx and k_cache must share a float dtype (bf16/fp16/fp32), got {q.dtype}, {kc.dtype}")
    else:
        _check_fp4_keys(q, kc, ks)
    if q.stride(3) != 1 or kc.stride(2) != 1 or w.stride(2) != 1:
        raise ValueError(f"last dims must be contiguous: q stride {q.stride()}, k_cache stride {kc.stride()}, "
                         f"weights stride {w.stride()}")
    if not isinstance(ratio, int) or ratio < 1:
        raise ValueError(f"ratio must be a positive int, got {ratio!r}")
    if len({t.device for t in (q, w, kc, pos) + (() if ks is None else (ks,))}) != 1:
        raise ValueError("q_idx, weights, k_cache and positions must be on one device")


def _check_fp4_keys(q: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> None:
    B, Di = q.shape[0], q.shape[3]
    if Di % 32:
        raise ValueError(f"packed FP4 keys need Di a multiple of 32 (one scale per 32 dims), got Di={Di}")
    if codes.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"packed FP4 keys must be uint8 codes and uint8 UE8M0 scales, got {codes.dtype}, "
                         f"{scales.dtype}")
    if codes.dim() != 3 or codes.shape[0] != B or codes.shape[2] != Di // 2:
        raise ValueError(f"FP4 key codes must be [B, N, Di/2] with B={B}, Di/2={Di // 2}, got {list(codes.shape)}")
    if tuple(scales.shape) != (*codes.shape[:2], Di // 32):
        raise ValueError(f"FP4 key scales must be [B, N, Di/32] = {[*codes.shape[:2], Di // 32]}, "
                         f"got {list(scales.shape)}")
    if q.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"packed FP4 keys decode exactly to bf16 or fp32 only; q_idx is {q.dtype}")
    if scales.stride(2) != 1:
        raise ValueError(f"FP4 key scales: last dim must be contiguous, stride {scales.stride()}")


def _launch_scores(q, w, kc, ks, pos, ratio, scores, ws, t_lo: int, t_hi: int, write_masked: bool,
                   cfg: ScoreConfig, hist: bool = False, zero_ws: bool = False) -> None:
    """Scores of queries [t_lo, t_hi) of every sequence into `scores` rows (b * (t_hi-t_lo) + t); with `hist`
    the kernel also builds the first top-k histogram (decode), with `zero_ws` it zeroes the top-k workspace."""
    B, _, Hi, Di = q.shape
    N = kc.shape[1]
    q, w, pos = q[:, t_lo:t_hi], w[:, t_lo:t_hi], pos[:, t_lo:t_hi]
    T = t_hi - t_lo
    if cfg.bt * Hi < 16:
        raise ValueError(f"config {cfg}: bt * Hi = {cfg.bt * Hi} must be >= 16 (tensor-core dot rows)")
    n_tiles = triton.cdiv(N, cfg.block_n)
    row_blocks = B * triton.cdiv(T, cfg.bt)
    # enough programs to fill the GPU twice over, each streaming >= 1 tile; one at least (it zeroes ws)
    chunks = torch.sym_max(1, torch.sym_min(n_tiles, triton.cdiv(2 * _sm_count(q.device), row_blocks)))
    tiles = torch.sym_max(1, triton.cdiv(n_tiles, chunks))
    grid = (row_blocks, torch.sym_max(1, triton.cdiv(n_tiles, tiles)))
    ws_arg = unused_arg(q.device) if ws is None else ws  # never `scores` itself (launch._check_distinct)
    common = dict(HI=Hi, DI=Di, BT=cfg.bt, BLOCK_N=cfg.block_n, HIST=hist, WRITE_MASKED=write_masked,
                  ZERO_WS=zero_ws, DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32", NUM_STAGES=cfg.num_stages,
                  num_warps=cfg.num_warps)
    if ks is None:
        launcher(_scores_kernel, q, w, kc, pos, scores, ws_arg)[grid](
            q, w, kc, pos, scores, ws_arg, T, N, ratio, tiles,
            q.stride(0), q.stride(1), q.stride(2), w.stride(0), w.stride(1), kc.stride(0), kc.stride(1),
            pos.stride(0), pos.stride(1), N, **common)
    else:
        launcher(_scores_fp4_kernel, q, w, kc, ks, pos, scores, ws_arg)[grid](
            q, w, kc, ks, pos, scores, ws_arg, T, N, ratio, tiles,
            q.stride(0), q.stride(1), q.stride(2), w.stride(0), w.stride(1), kc.stride(0), kc.stride(1),
            ks.stride(0), ks.stride(1), pos.stride(0), pos.stride(1), N, **common)


def indexer_scores_launch(q_idx: torch.Tensor, weights: torch.Tensor, k_cache, positions: torch.Tensor,
                          ratio: int, out: torch.Tensor | None = None,
                          config: ScoreConfig | None = None) -> torch.Tensor:
    """scores [B, T, N] float32 (-inf where not visible); k_cache [B, N, Di] or the packed FP4 pair (codes,
    scales) of quant.kv_layout.pack_index_keys; `out` (contiguous, float32) lets tests pre-poison it."""
    kc, ks = _split_keys(k_cache)
    _check_indexer_inputs(q_idx, weights, kc, positions, ratio, ks)
    B, T = q_idx.shape[:2]
    N = kc.shape[1]
    if out is None:
        out = torch.empty((B, T, N), dtype=torch.float32, device=q_idx.device)
    elif tuple(out.shape) != (B, T, N) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be contiguous float32 {[B, T, N]}, got {out.dtype} {list(out.shape)}")
    if not _concrete(B, T, N) or B * T * N:
        cfg = config or pick_score_config(T, q_idx.shape[2], q_idx.device, fp4=ks is not None)
        _launch_scores(q_idx, weights, kc, ks, positions, ratio, out, None, 0, T, write_masked=True, cfg=cfg)
    return out


def topk_select_launch(scores: torch.Tensor, k: int, out: torch.Tensor | None = None,
                       config: TopkConfig | None = None) -> torch.Tensor:
    """idx [..., k] int32 of the k largest scores per row (-inf never picked; -1 pads); order in module doc."""
    if scores.dtype != torch.float32 or scores.dim() < 1 or not scores.is_contiguous():
        raise ValueError(f"scores must be contiguous float32 [..., N], got {scores.dtype} {list(scores.shape)} "
                         f"contiguous={scores.is_contiguous()}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    N = scores.shape[-1]
    R = math.prod(scores.shape[:-1])
    out = _check_out(out, (*scores.shape[:-1], k), scores.device)
    if not _concrete(R, N) or (R and N):
        cfg = config or pick_topk_config(scores.device, k=k)
        launch_select(scores, R, N, k, out, new_workspace(R, scores.device, cfg, zeroed=True), hist1_done=False,
                      config=cfg)
    elif R:
        out.fill_(-1)
    return out


def _check_out(out: torch.Tensor | None, shape: tuple, device: torch.device) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=torch.int32, device=device)
    if tuple(out.shape) != tuple(shape) or out.dtype != torch.int32 or not out.is_contiguous():
        raise ValueError(f"out must be contiguous int32 {list(shape)}, got {out.dtype} {list(out.shape)}")
    return out


def indexer_topk_launch(q_idx: torch.Tensor, weights: torch.Tensor, k_cache, positions: torch.Tensor,
                        ratio: int, k: int, out: torch.Tensor | None = None,
                        workspace_floats: int = WORKSPACE_FLOATS, config: ScoreConfig | None = None,
                        topk_config: TopkConfig | None = None) -> torch.Tensor:
    """idx [B, T, k] int32: top-k of the indexer scores per query, -1 for masked picks (order: module doc);
    k_cache [B, N, Di] or the packed FP4 pair (codes, scales).

    Scores and the top-k workspace (4-byte words, `workspace_ints_per_row` per score row) live in buffers of
    at most `workspace_floats` words: long prefills run in chunks of queries (Python loop over static shapes).
    """
    kc, ks = _split_keys(k_cache)
    _check_indexer_inputs(q_idx, weights, kc, positions, ratio, ks)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    B, T = q_idx.shape[:2]
    N = kc.shape[1]
    out = _check_out(out, (B, T, k), q_idx.device)
    tk = topk_config or pick_topk_config(q_idx.device, k)
    if not _concrete(B, T, N):  # export: one pass over every query (no Python loop on symbolic sizes)
        _fused(q_idx, weights, kc, ks, positions, ratio, k, out, 0, T, config, tk)
        return out
    if B * T == 0:
        return out
    if N == 0:
        return out.fill_(-1)
    t_step = max(1, min(T, workspace_floats // (B * (N + workspace_ints_per_row(tk)))))
    for t_lo in range(0, T, t_step):
        t_hi = min(T, t_lo + t_step)
        if t_hi - t_lo == T or B == 1:
            _fused(q_idx, weights, kc, ks, positions, ratio, k, out[:, t_lo:t_hi], t_lo, t_hi, config, tk)
        else:  # a chunk of every sequence's queries is not contiguous in `out`
            o = torch.empty((B, t_hi - t_lo, k), dtype=torch.int32, device=out.device)
            _fused(q_idx, weights, kc, ks, positions, ratio, k, o, t_lo, t_hi, config, tk)
            out[:, t_lo:t_hi].copy_(o)
    return out


def _fused(q_idx, weights, kc, ks, positions, ratio: int, k: int, out, t_lo, t_hi, config, tk: TopkConfig) -> None:
    """Scores of queries [t_lo, t_hi) into a workspace, then the radix select into `out` (contiguous)."""
    B, N = q_idx.shape[0], kc.shape[1]
    R = B * (t_hi - t_lo)
    cfg = config or pick_score_config(t_hi - t_lo, q_idx.shape[2], q_idx.device, fp4=ks is not None)
    hist1 = tk.fuse_hist1 and cfg.bt == 1  # else the score kernel zeroes the workspace
    scores = torch.empty((R, N), dtype=torch.float32, device=q_idx.device)
    workspace = new_workspace(R, q_idx.device, tk, zeroed=hist1)
    _launch_scores(q_idx, weights, kc, ks, positions, ratio, scores, workspace[0], t_lo, t_hi, write_masked=False,
                   cfg=cfg, hist=hist1, zero_ws=not hist1)
    launch_select(scores, R, N, k, out, workspace, hist1, pos=positions[:, t_lo:t_hi], T=t_hi - t_lo, ratio=ratio,
                  config=tk)


# ---------------------------------------------------------------------------------------------- registration


@torch.library.triton_op("v4triton::indexer_scores", mutates_args=())
def indexer_scores(q_idx: torch.Tensor, weights: torch.Tensor, k_cache: torch.Tensor, positions: torch.Tensor,
                   ratio: int) -> torch.Tensor:
    """Same contract as v4::indexer_scores: float32 [B, T, N], -inf for blocks j >= (pos+1)//ratio."""
    return indexer_scores_launch(q_idx, weights, k_cache, positions, ratio)


@torch.library.triton_op("v4triton::topk_select", mutates_args=())
def topk_select(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Same contract as v4::topk_select as a set: int32 [..., k], -1 where fewer than k scores are > -inf."""
    return topk_select_launch(scores.contiguous(), k)


@torch.library.triton_op("v4triton::indexer_topk", mutates_args=())
def indexer_topk(q_idx: torch.Tensor, weights: torch.Tensor, k_cache: torch.Tensor, positions: torch.Tensor,
                 ratio: int, k: int) -> torch.Tensor:
    """topk_select(indexer_scores(...), k) fused: the [B, T, N] scores never leave the workspace."""
    return indexer_topk_launch(q_idx, weights, k_cache, positions, ratio, k)


@torch.library.triton_op("v4triton::indexer_scores_fp4", mutates_args=())
def indexer_scores_fp4(q_idx: torch.Tensor, weights: torch.Tensor, k_codes: torch.Tensor, k_scales: torch.Tensor,
                       positions: torch.Tensor, ratio: int) -> torch.Tensor:
    """v4triton::indexer_scores over packed FP4 keys (codes uint8 [B, N, Di/2], UE8M0 scales uint8 [B, N, Di/32])."""
    return indexer_scores_launch(q_idx, weights, (k_codes, k_scales), positions, ratio)


@torch.library.triton_op("v4triton::indexer_topk_fp4", mutates_args=())
def indexer_topk_fp4(q_idx: torch.Tensor, weights: torch.Tensor, k_codes: torch.Tensor, k_scales: torch.Tensor,
                     positions: torch.Tensor, ratio: int, k: int) -> torch.Tensor:
    """v4triton::indexer_topk over packed FP4 keys: 68 B per key at Di = 128 instead of 256."""
    return indexer_topk_launch(q_idx, weights, (k_codes, k_scales), positions, ratio, k)


def supports_indexer(q_idx, weights, k_cache, positions, ratio, *_rest, **_kw) -> bool:
    """Capability check shared by indexer_scores and indexer_topk (dtypes, pow2 heads/dims, strides)."""
    return accepts(_check_indexer_inputs, q_idx, weights, k_cache, positions, ratio)


def supports_indexer_fp4(q_idx, weights, k_codes, k_scales, positions, ratio, *_rest, **_kw) -> bool:
    """Capability check of the packed-FP4 ops (uint8 codes / scales, Di a multiple of 32, bf16/fp32 q)."""
    return accepts(_check_indexer_inputs, q_idx, weights, k_codes, positions, ratio, k_scales)


def supports_topk(scores, k, *_rest, **_kw) -> bool:
    """float32 scores (made contiguous by the op) and a positive k."""
    return getattr(scores, "dtype", None) == torch.float32 and isinstance(k, int) and k >= 1


_TARGETS = ("h100", "h200")
register_kernel("v4::indexer_scores", _TARGETS, supports_indexer, priority=10,
                name="v4triton::indexer_scores")(indexer_scores)
register_kernel("v4::topk_select", _TARGETS, supports_topk, priority=10, name="v4triton::topk_select")(topk_select)
# The fused form of indexer_scores -> topk_select, and both over the packed FP4 cache layout. The graph declares
# v4::indexer_scores_fp4 (production-layout caches, model/packed_ops.py); v4::indexer_topk(_fp4) not yet.
register_kernel("v4::indexer_topk", _TARGETS, supports_indexer, priority=10,
                name="v4triton::indexer_topk")(indexer_topk)
register_kernel("v4::indexer_scores_fp4", _TARGETS, supports_indexer_fp4, priority=10,
                name="v4triton::indexer_scores_fp4")(indexer_scores_fp4)
register_kernel("v4::indexer_topk_fp4", _TARGETS, supports_indexer_fp4, priority=10,
                name="v4triton::indexer_topk_fp4")(indexer_topk_fp4)

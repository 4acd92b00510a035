"""Lightning indexer (V4-SPEC section 4.3) with an exact radix top-k: `v4triton::indexer_scores`,
`v4triton::topk_select` and the fused `v4triton::indexer_topk`.

Legend: B batch, T queries per sequence, R = B*T score rows, Hi index heads, Di index head dim, N key rows
(compressed blocks), k picks per row, BT queries per score program, S chunks per row in the top-k passes.

score[b,t,j] = sum_h w[b,t,h] * ReLU(q[b,t,h] . k[b,j])  for j < min(N, (pos[b,t]+1) // ratio), else -inf.
Products accumulate in fp32 on tensor cores (bf16/fp16 inputs) or in IEEE fp32 (float32 inputs); the
reference op v4::indexer_scores also computes in fp32, so scores agree up to summation order (bit-equal at the
benchmarked shapes on the H200). DeepSeek's own reference einsum runs in bf16 (V4-SPEC 4.3): against that,
picks differ at near-ties only (docs/perf/indexer_topk.md quantifies a plain bf16 implementation).

Top-k without sorting: a score's fp32 bits map to an order-preserving uint32 key; four histogram passes
over its 8-bit digits (256 bins: tl.histogram's cost grows with the bin count; 10/11/11-bit digits measured
2.3x slower) find the exact k-th largest key KT; a count pass and a write pass put every index with
key > KT and the lowest-index ties with key == KT into the output (7 launches incl. one memset).
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
from v4compile.plugins.triton.launch import launcher

NB = tl.constexpr(256)  # bins per digit: the key's 32 bits are 4 digits of 8, most significant first
LEVELS = tl.constexpr(4)
HIST_STRIDE = tl.constexpr(4 * 256)  # int32 per row: hist1 | hist2 | hist3 | hist4
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


@dataclass(frozen=True)
class TopkConfig:
    """Top-k passes: scores per step (block), warps, and whether the decode score kernel builds hist1."""

    block: int
    num_warps: int
    fuse_hist1: bool


# [0] is the default: building hist1 inside the score kernel measured 1.6-2.3x slower end to end on the H200
# (the histogram in the streaming loop stalls it), so the first histogram is its own pass.
TOPK_CONFIGS: list[TopkConfig] = [
    TopkConfig(2048, 4, False),
    TopkConfig(2048, 4, True),
    TopkConfig(4096, 8, True),
]
MAX_CHUNKS = 256  # chunks per row in the top-k passes (a power of two: the write pass loads all counts)
WORKSPACE_FLOATS = 1 << 28  # fused op: fp32 score rows per chunk of queries (1 GiB)


# ---------------------------------------------------------------------------------------------- jit helpers


@triton.jit
def _key(s):
    """fp32 -> uint32 whose unsigned order is the float order (negatives flipped, positives offset)."""
    u = s.to(tl.uint32, bitcast=True)
    return tl.where((u >> 31) != 0, u ^ 0xFFFFFFFF, u | 0x80000000)


@triton.jit
def _level(h_ptr, need, NB: tl.constexpr):
    """Largest bin b with (count of bins >= b) >= need, and the need left inside b; b = -1 if too few."""
    ar = tl.arange(0, NB)
    h = tl.load(h_ptr + ar)
    above_eq = tl.cumsum(h, 0, reverse=True)
    b = tl.max(tl.where(above_eq >= need, ar, -1), 0)
    above = tl.sum(tl.where(ar > b, h, 0), 0)
    return b, need - above


@triton.jit
def _threshold(h_ptr, k, DIGITS: tl.constexpr):
    """(key prefix after DIGITS >= 1 digits, ties to take, take_all); take_all: fewer than k visible scores."""
    b, need = _level(h_ptr, k, NB)
    take_all = b < 0
    kt = b.to(tl.uint32)
    for lvl in tl.static_range(1, DIGITS):
        b, need = _level(h_ptr + lvl * NB, need, NB)
        kt = (kt << 8) | b.to(tl.uint32)
    kt = tl.where(take_all, 0, kt)
    need = tl.where(take_all, k, need)
    return kt, need, take_all


@triton.jit
def _row_limit(pos_ptr, row, T, sp_b, sp_t, ratio, N, HAS_POS: tl.constexpr):
    """Visible blocks of score row `row`: min(N, (pos+1) // ratio), or N without positions."""
    if HAS_POS:
        p = tl.load(pos_ptr + (row // T) * sp_b + (row % T) * sp_t).to(tl.int64)
        return tl.minimum((p + 1) // ratio, N)
    else:
        return tl.zeros((), dtype=tl.int64) + N


# ---------------------------------------------------------------------------------------------- kernels


@triton.jit
def _scores_kernel(q_ptr, w_ptr, k_ptr, pos_ptr, s_ptr, hist_ptr,
                   T, N, ratio, tiles,
                   sq_b, sq_t, sq_h, sw_b, sw_t, sk_b, sk_n, sp_b, sp_t, ss_r,
                   HI: tl.constexpr, DI: tl.constexpr, BT: tl.constexpr, BLOCK_N: tl.constexpr,
                   HIST: tl.constexpr, WRITE_MASKED: tl.constexpr, DOT_PREC: tl.constexpr,
                   NUM_STAGES: tl.constexpr):
    """Program (b, query block, key chunk): scores of BT queries against `tiles` tiles of BLOCK_N keys."""
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    n_tb = tl.cdiv(T, BT)
    b = (pid_r // n_tb).to(tl.int64)
    t0 = (pid_r % n_tb) * BT
    offs_t = t0 + tl.arange(0, BT)
    t_ok = offs_t < T
    pos = tl.load(pos_ptr + b * sp_b + offs_t * sp_t, mask=t_ok, other=0).to(tl.int64)
    lim = tl.where(t_ok, tl.minimum((pos + 1) // ratio, N), 0)  # [BT] visible blocks per query
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
            d1 = (_key(tl.reshape(s, (BLOCK_N,))) >> 24).to(tl.int32)
            hist += tl.histogram(d1, NB, mask=tl.reshape(s != float("-inf"), (BLOCK_N,)))
    if WRITE_MASKED:
        for n0 in range(tl.maximum(n_live, n_first), n_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            ninf = tl.full((BT, BLOCK_N), float("-inf"), tl.float32)
            tl.store(row_base[:, None] + offs_n[None, :], ninf, mask=t_ok[:, None] & (offs_n < N)[None, :])
    if HIST:
        tl.atomic_add(hist_ptr + (b * T + t0) * HIST_STRIDE + tl.arange(0, NB), hist, mask=hist > 0)


@triton.jit
def _hist_kernel(s_ptr, pos_ptr, hist_ptr, k, T, N, ratio, chunk, sp_b, sp_t, ss_r,
                 LEVEL: tl.constexpr, HAS_POS: tl.constexpr, BLOCK: tl.constexpr):
    """Histogram of digit LEVEL over the visible scores of one chunk whose higher digits match the prefix."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    h_row = hist_ptr + row * HIST_STRIDE
    lim = _row_limit(pos_ptr, row, T, sp_b, sp_t, ratio, N, HAS_POS)
    SHIFT: tl.constexpr = 32 - 8 * LEVEL
    if LEVEL > 1:
        prefix, _need, take_all = _threshold(h_row, k, LEVEL - 1)
    else:
        prefix = tl.zeros((), dtype=tl.uint32)
        take_all = False
    if not take_all:
        hist = tl.zeros((NB,), dtype=tl.int32)
        end = tl.minimum(c * chunk + chunk, lim)
        for j0 in range(c * chunk, end, BLOCK):
            offs = j0 + tl.arange(0, BLOCK)
            s = tl.load(s_ptr + row * ss_r + offs, mask=offs < end, other=float("-inf"))
            key = _key(s)
            ok = (offs < end) & (s != float("-inf"))
            if LEVEL > 1:
                ok = ok & ((key >> (SHIFT + 8)) == prefix)
            hist += tl.histogram(((key >> SHIFT) & 0xFF).to(tl.int32), NB, mask=ok)
        tl.atomic_add(h_row + (LEVEL - 1) * NB + tl.arange(0, NB), hist, mask=hist > 0)


@triton.jit
def _count_kernel(s_ptr, pos_ptr, hist_ptr, cnt_ptr, k, T, N, ratio, chunk, n_chunks, sp_b, sp_t, ss_r,
                  HAS_POS: tl.constexpr, BLOCK: tl.constexpr):
    """Per chunk: how many visible scores lie strictly above the k-th largest, and how many equal it."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    lim = _row_limit(pos_ptr, row, T, sp_b, sp_t, ratio, N, HAS_POS)
    kt, _ties, _all = _threshold(hist_ptr + row * HIST_STRIDE, k, LEVELS)
    n_gt = tl.zeros((), dtype=tl.int32)
    n_eq = tl.zeros((), dtype=tl.int32)
    end = tl.minimum(c * chunk + chunk, lim)
    for j0 in range(c * chunk, end, BLOCK):
        offs = j0 + tl.arange(0, BLOCK)
        s = tl.load(s_ptr + row * ss_r + offs, mask=offs < end, other=float("-inf"))
        key = _key(s)
        ok = (offs < end) & (s != float("-inf"))
        n_gt += tl.sum((ok & (key > kt)).to(tl.int32), 0)
        n_eq += tl.sum((ok & (key == kt)).to(tl.int32), 0)
    base = cnt_ptr + (row * n_chunks + c) * 2
    tl.store(base, n_gt)
    tl.store(base + 1, n_eq)


@triton.jit
def _write_kernel(s_ptr, pos_ptr, hist_ptr, cnt_ptr, out_ptr, k, T, N, ratio, chunk, n_chunks,
                  sp_b, sp_t, ss_r, HAS_POS: tl.constexpr, BLOCK: tl.constexpr, CHUNKS_P2: tl.constexpr):
    """Write this chunk's picks at offsets given by the counts of the chunks before it; chunk 0 pads -1."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    lim = _row_limit(pos_ptr, row, T, sp_b, sp_t, ratio, N, HAS_POS)
    kt, ties, _all = _threshold(hist_ptr + row * HIST_STRIDE, k, LEVELS)
    ci = tl.arange(0, CHUNKS_P2)
    cmask = ci < n_chunks
    gts = tl.load(cnt_ptr + (row * n_chunks + ci) * 2, mask=cmask, other=0)
    eqs = tl.load(cnt_ptr + (row * n_chunks + ci) * 2 + 1, mask=cmask, other=0)
    n_gt_all = tl.sum(gts, 0)
    gt_base = tl.sum(tl.where(ci < c, gts, 0), 0)
    eq_base = tl.sum(tl.where(ci < c, eqs, 0), 0)
    out_row = out_ptr + row * k
    end = tl.minimum(c * chunk + chunk, lim)
    for j0 in range(c * chunk, end, BLOCK):
        offs = j0 + tl.arange(0, BLOCK)
        s = tl.load(s_ptr + row * ss_r + offs, mask=offs < end, other=float("-inf"))
        key = _key(s)
        ok = (offs < end) & (s != float("-inf"))
        gt = (ok & (key > kt)).to(tl.int32)
        eq = (ok & (key == kt)).to(tl.int32)
        gt_pos = gt_base + tl.cumsum(gt, 0) - gt
        eq_rank = eq_base + tl.cumsum(eq, 0) - eq
        tl.store(out_row + gt_pos, offs.to(tl.int32), mask=gt != 0)
        tl.store(out_row + n_gt_all + eq_rank, offs.to(tl.int32), mask=(eq != 0) & (eq_rank < ties))
        gt_base += tl.sum(gt, 0)
        eq_base += tl.sum(eq, 0)
    if c == 0:
        n_sel = n_gt_all + tl.minimum(ties, tl.sum(eqs, 0))
        for i0 in range(0, k, BLOCK):
            offs = i0 + tl.arange(0, BLOCK)
            tl.store(out_row + offs, tl.full((BLOCK,), -1, tl.int32), mask=(offs >= n_sel) & (offs < k))


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


def pick_score_config(T, n_heads: int, device: torch.device) -> ScoreConfig:
    """Decode (T == 1): one query per program; prefill: two queries share a key tile; >= 16 dot rows.

    Under the interpreter: small tiles, so CI stays fast."""
    decode = statically_known_true(T == 1)  # a symbolic T (export) is a prefill length: no guard on it
    if INTERPRET or device.type != "cuda":
        bt = max(1, 16 // n_heads) if decode else max(2, 16 // n_heads)
        return ScoreConfig(bt, 16, 1, 1)
    cfg = SCORE_CONFIGS[0] if decode else SCORE_CONFIGS[2]  # measured best (docs/perf/indexer_topk.md)
    return ScoreConfig(max(cfg.bt, 16 // n_heads), cfg.block_n, cfg.num_warps, cfg.num_stages)


def _check_indexer_inputs(q: torch.Tensor, w: torch.Tensor, kc: torch.Tensor, pos: torch.Tensor, ratio: int):
    if q.dim() != 4:
        raise ValueError(f"q_idx must be [B, T, Hi, Di], got shape {list(q.shape)}")
    B, T, Hi, Di = q.shape
    if tuple(w.shape) != (B, T, Hi):
        raise ValueError(f"weights must be [B, T, Hi] = {[B, T, Hi]}, got {list(w.shape)}")
    if kc.dim() != 3 or kc.shape[0] != B or kc.shape[2] != Di:
        raise ValueError(f"k_cache must be [B, N, Di] with B={B}, Di={Di}, got {list(kc.shape)}")
    if tuple(pos.shape) != (B, T) or pos.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be int32/int64 [B, T] = {[B, T]}, got {pos.dtype} {list(pos.shape)}")
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32) or kc.dtype != q.dtype:
        raise ValueError(f"q_idx and k_cache must share a float dtype (bf16/fp16/fp32), got {q.dtype}, {kc.dtype}")
    if not w.dtype.is_floating_point:
        raise ValueError(f"weights must be floating point, got {w.dtype}")
    if not (_pow2(Hi) and _pow2(Di) and Di >= 16):
        raise ValueError(f"Hi and Di must be powers of two with Di >= 16, got Hi={Hi}, Di={Di}")
    if q.stride(3) != 1 or kc.stride(2) != 1 or w.stride(2) != 1:
        raise ValueError(f"last dims must be contiguous: q stride {q.stride()}, k_cache stride {kc.stride()}, "
                         f"weights stride {w.stride()}")
    if not isinstance(ratio, int) or ratio < 1:
        raise ValueError(f"ratio must be a positive int, got {ratio!r}")
    if len({t.device for t in (q, w, kc, pos)}) != 1:
        raise ValueError("q_idx, weights, k_cache and positions must be on one device")


def _launch_scores(q, w, kc, pos, ratio, scores, hist, t_lo: int, t_hi: int, write_masked: bool,
                   config: ScoreConfig | None = None, fuse_hist1: bool = True):
    """Scores of queries [t_lo, t_hi) of every sequence into `scores` rows (b * (t_hi-t_lo) + t)."""
    B, _, Hi, Di = q.shape
    N = kc.shape[1]
    q, w, pos = q[:, t_lo:t_hi], w[:, t_lo:t_hi], pos[:, t_lo:t_hi]
    T = t_hi - t_lo
    cfg = config or pick_score_config(T, Hi, q.device)
    if cfg.bt * Hi < 16:
        raise ValueError(f"config {cfg}: bt * Hi = {cfg.bt * Hi} must be >= 16 (tensor-core dot rows)")
    use_hist = hist is not None and cfg.bt == 1 and fuse_hist1
    n_tiles = triton.cdiv(N, cfg.block_n)
    row_blocks = B * triton.cdiv(T, cfg.bt)
    # enough programs to fill the GPU twice over, each streaming >= 1 tile
    chunks = torch.sym_max(1, torch.sym_min(n_tiles, triton.cdiv(2 * _sm_count(q.device), row_blocks)))
    tiles = triton.cdiv(n_tiles, chunks)
    grid = (row_blocks, triton.cdiv(n_tiles, tiles))
    launcher(_scores_kernel, q, w, kc, pos, scores)[grid](
        q, w, kc, pos, scores, hist if use_hist else scores,
        T, N, ratio, tiles,
        q.stride(0), q.stride(1), q.stride(2), w.stride(0), w.stride(1), kc.stride(0), kc.stride(1),
        pos.stride(0), pos.stride(1), N,
        HI=Hi, DI=Di, BT=cfg.bt, BLOCK_N=cfg.block_n, HIST=use_hist, WRITE_MASKED=write_masked,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32", NUM_STAGES=cfg.num_stages,
        num_warps=cfg.num_warps)
    return use_hist


def pick_topk_config(device: torch.device) -> TopkConfig:
    """TOPK_CONFIGS[0] on the GPU; small steps under the interpreter (with hist1 fused: the other path)."""
    if INTERPRET or device.type != "cuda":
        return TopkConfig(64, 1, True)
    return TOPK_CONFIGS[0]


def _launch_topk(scores, R, N, k: int, out, hist, hist1_done: bool, pos=None, T=1, ratio: int = 1,
                 config: TopkConfig | None = None) -> None:
    """Radix select over R rows of `scores` (row stride N) into out [R, k]; `hist` is zeroed by the caller."""
    cfg = config or pick_topk_config(scores.device)
    has_pos = pos is not None
    pos_arg = pos if has_pos else scores
    sp_b, sp_t = (pos.stride(0), pos.stride(1)) if has_pos else (0, 0)
    n_chunks = torch.sym_max(1, torch.sym_min(torch.sym_min(triton.cdiv(N, cfg.block), MAX_CHUNKS),
                                               triton.cdiv(2 * _sm_count(scores.device), R)))
    chunk = triton.cdiv(triton.cdiv(N, n_chunks), cfg.block) * cfg.block
    n_chunks = triton.cdiv(N, chunk)
    grid = (R, n_chunks)
    common = dict(HAS_POS=has_pos, BLOCK=cfg.block, num_warps=cfg.num_warps)
    for level in range(2 if hist1_done else 1, LEVELS.value + 1):
        launcher(_hist_kernel, scores, pos_arg, hist)[grid](
            scores, pos_arg, hist, k, T, N, ratio, chunk, sp_b, sp_t, N, LEVEL=level, **common)
    counts = torch.empty((R, n_chunks, 2), dtype=torch.int32, device=scores.device)
    launcher(_count_kernel, scores, pos_arg, hist)[grid](
        scores, pos_arg, hist, counts, k, T, N, ratio, chunk, n_chunks, sp_b, sp_t, N, **common)
    launcher(_write_kernel, scores, pos_arg, hist, out)[grid](
        scores, pos_arg, hist, counts, out, k, T, N, ratio, chunk, n_chunks, sp_b, sp_t, N,
        CHUNKS_P2=MAX_CHUNKS, **common)


def indexer_scores_launch(q_idx: torch.Tensor, weights: torch.Tensor, k_cache: torch.Tensor,
                          positions: torch.Tensor, ratio: int, out: torch.Tensor | None = None,
                          config: ScoreConfig | None = None) -> torch.Tensor:
    """scores [B, T, N] float32 (-inf where not visible); `out` (contiguous, float32) lets tests pre-poison it."""
    _check_indexer_inputs(q_idx, weights, k_cache, positions, ratio)
    B, T = q_idx.shape[:2]
    N = k_cache.shape[1]
    if out is None:
        out = torch.empty((B, T, N), dtype=torch.float32, device=q_idx.device)
    elif tuple(out.shape) != (B, T, N) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be contiguous float32 {[B, T, N]}, got {out.dtype} {list(out.shape)}")
    if not _concrete(B, T, N) or B * T * N:
        _launch_scores(q_idx, weights, k_cache, positions, ratio, out, None, 0, T, write_masked=True, config=config)
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
        hist = torch.zeros((R, HIST_STRIDE.value), dtype=torch.int32, device=scores.device)
        _launch_topk(scores, R, N, k, out, hist, hist1_done=False, config=config)
    elif R:
        out.fill_(-1)
    return out


def _check_out(out: torch.Tensor | None, shape: tuple, device: torch.device) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=torch.int32, device=device)
    if tuple(out.shape) != tuple(shape) or out.dtype != torch.int32 or not out.is_contiguous():
        raise ValueError(f"out must be contiguous int32 {list(shape)}, got {out.dtype} {list(out.shape)}")
    return out


def indexer_topk_launch(q_idx: torch.Tensor, weights: torch.Tensor, k_cache: torch.Tensor, positions: torch.Tensor,
                        ratio: int, k: int, out: torch.Tensor | None = None,
                        workspace_floats: int = WORKSPACE_FLOATS, config: ScoreConfig | None = None,
                        topk_config: TopkConfig | None = None) -> torch.Tensor:
    """idx [B, T, k] int32: top-k of the indexer scores per query, -1 for masked picks (order: module doc).

    Scores live in an fp32 workspace of at most `workspace_floats` elements: long prefills run in chunks
    of queries (Python loop over static shapes).
    """
    _check_indexer_inputs(q_idx, weights, k_cache, positions, ratio)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    B, T = q_idx.shape[:2]
    N = k_cache.shape[1]
    out = _check_out(out, (B, T, k), q_idx.device)
    if not _concrete(B, T, N):  # export: one pass over every query (no Python loop on symbolic sizes)
        _fused(q_idx, weights, k_cache, positions, ratio, k, out, 0, T, config, topk_config)
        return out
    if B * T == 0:
        return out
    if N == 0:
        return out.fill_(-1)
    t_step = max(1, min(T, workspace_floats // (B * N)))
    for t_lo in range(0, T, t_step):
        t_hi = min(T, t_lo + t_step)
        if t_hi - t_lo == T or B == 1:
            _fused(q_idx, weights, k_cache, positions, ratio, k, out[:, t_lo:t_hi], t_lo, t_hi, config, topk_config)
        else:  # a chunk of every sequence's queries is not contiguous in `out`
            o = torch.empty((B, t_hi - t_lo, k), dtype=torch.int32, device=out.device)
            _fused(q_idx, weights, k_cache, positions, ratio, k, o, t_lo, t_hi, config, topk_config)
            out[:, t_lo:t_hi].copy_(o)
    return out


def _fused(q_idx, weights, k_cache, positions, ratio: int, k: int, out, t_lo, t_hi, config, topk_config) -> None:
    """Scores of queries [t_lo, t_hi) into a workspace, then the radix select into `out` (contiguous)."""
    B, N = q_idx.shape[0], k_cache.shape[1]
    R = B * (t_hi - t_lo)
    scores = torch.empty((R, N), dtype=torch.float32, device=q_idx.device)
    hist = torch.zeros((R, HIST_STRIDE.value), dtype=torch.int32, device=q_idx.device)
    tk = topk_config or pick_topk_config(q_idx.device)
    hist1_done = _launch_scores(q_idx, weights, k_cache, positions, ratio, scores, hist, t_lo, t_hi,
                                write_masked=False, config=config, fuse_hist1=tk.fuse_hist1)
    _launch_topk(scores, R, N, k, out, hist, hist1_done, pos=positions[:, t_lo:t_hi], T=t_hi - t_lo, ratio=ratio,
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


def _accepts(check, *args) -> bool:
    try:
        check(*args)
    except (ValueError, TypeError, AttributeError):
        return False
    return True


def supports_indexer(q_idx, weights, k_cache, positions, ratio, *_rest, **_kw) -> bool:
    """Capability check shared by indexer_scores and indexer_topk (dtypes, pow2 heads/dims, strides)."""
    return _accepts(_check_indexer_inputs, q_idx, weights, k_cache, positions, ratio)


def supports_topk(scores, k, *_rest, **_kw) -> bool:
    """float32 scores (made contiguous by the op) and a positive k."""
    return getattr(scores, "dtype", None) == torch.float32 and isinstance(k, int) and k >= 1


_TARGETS = ("h100", "h200")
register_kernel("v4::indexer_scores", _TARGETS, supports_indexer, priority=10,
                name="v4triton::indexer_scores")(indexer_scores)
register_kernel("v4::topk_select", _TARGETS, supports_topk, priority=10, name="v4triton::topk_select")(topk_select)
# The fused form of indexer_scores -> topk_select; the graph side still has to declare v4::indexer_topk.
register_kernel("v4::indexer_topk", _TARGETS, supports_indexer, priority=10,
                name="v4triton::indexer_topk")(indexer_topk)

"""Exact radix top-k over fp32 score rows in up to five launches (the default, `fuse_finish` without `hist3`:
three): the selection half of `v4triton::topk_select` / `v4triton::indexer_topk` (V4-SPEC section 4.3).

Legend: R score rows of N scores, C chunks per row (`chunk` scores each, the grid's second axis), k picks per
row, P the 16-bit threshold prefix, M the row's candidate count, CAP the candidate list's capacity.

A score's fp32 bits map to an order-preserving uint32 key (`_key`); its 4 bytes are the radix digits, most
significant first (256 bins: tl.histogram's cost grows with the bin count; 10/11/11-bit digits measured 2.3x
slower). The passes:

1. `_hist_kernel` LEVEL 1: histogram of every visible key's top byte (atomics into the row's workspace).
2. `_hist_kernel` LEVEL 2: histogram of byte 2 among the keys whose top byte is the threshold byte: gives P,
   the top 16 bits of the k-th largest key, and M, the count of keys whose top 16 bits are >= P (fewer than
   k lie above P, plus those equal to P: tens at the benchmarked shapes).
3. `_hist_kernel` LEVEL 3 (`hist3`): byte 3 among the keys equal to P, and P grows to 24 bits; its programs
   exit at once unless M > CAP (scores crowded into one 1/128-wide bin, e.g. a large common offset).
4. `_compact_kernel`: every chunk appends its keys at or above P to the row's candidate list, as one run whose
   place comes from one atomic; it records the run's (start, length).
5. `_finish_row` (one program per row: its own launch, or the compaction program that arrives last): puts the
   runs in chunk order, so the list is in ascending index order, resolves the remaining bytes on the
   candidates with in-register histograms and writes the picks. A list that still overflows CAP (more than
   CAP - k keys sharing 24 bits: exact ties) is handled by the same steps reading the whole score row:
   exact, much slower (one program streams the row three times).

Output order (deterministic): indices with a score strictly above the k-th largest, ascending; then the chosen
ties (score equal to the k-th largest, lowest indices first), ascending; then -1 (fewer than k visible).
The score kernels of indexer_topk.py zero the workspace rows (ZERO_WS) so the fused op needs no memset.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from v4compile.plugins.triton.launch import launcher, unused_arg

NB = tl.constexpr(256)  # bins per digit
WS_INTS = tl.constexpr(1024)  # int32 per row: hist1 | hist2 | hist3 (256 each) | count @768 | arrivals @769
COUNT = tl.constexpr(768)
ARRIVE = tl.constexpr(769)
MAX_CHUNKS = tl.constexpr(256)  # chunks per row (a power of two: the finish loads every run at once)
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
REVERSE_CHUNKS = False  # tests: compaction programs take chunks last-first, so the interpreter (which runs
# programs in order) appends the runs out of chunk order as a GPU may, and the finish has to sort them


@dataclass(frozen=True)
class TopkConfig:
    """Top-k passes: scores per step (block), warps, whether the decode score kernel builds hist1, whether the
    last compaction program finishes the row (one launch fewer), candidate capacity per row (the finish's
    vector length, a power of two; `pick_topk_config` raises it to 2 k), the finish's warps, and whether the
    conditional third histogram pass is launched (without it a crowded 16-bit bin takes the slow finish)."""

    block: int
    num_warps: int
    fuse_hist1: bool
    fuse_finish: bool = False
    cand: int = 1024
    finish_warps: int = 8
    hist3: bool = True


# [0] is the default, the fastest in the session-4 sweep on the H200 (1M blocks, batch 1: 45.5 us vs 48-51 us
# for the former default, TopkConfig(2048, 4, False); docs/perf/indexer_topk.md run 3). Building hist1 inside
# the score kernel measured 1.6-2.3x slower end to end (the histogram in the streaming loop stalls it), so the
# first histogram is its own pass. The fused finish saves one launch; it relies on the last-arriving program
# seeing every run (release / acquire atomics). Without the third histogram pass a crowded 16-bit bin takes
# the slow finish: rare on real scores, and still exact (the GPU tests run crowded rows through every config).
TOPK_CONFIGS: list[TopkConfig] = [
    TopkConfig(2048, 4, False, fuse_finish=True, hist3=False),
    TopkConfig(2048, 4, False),
    TopkConfig(2048, 4, False, fuse_finish=True),
    TopkConfig(2048, 4, False, hist3=False),
    TopkConfig(1024, 4, False, fuse_finish=True, cand=4096),
    TopkConfig(2048, 4, True),
]


def pick_topk_config(device: torch.device, k: int = 512) -> TopkConfig:
    """TOPK_CONFIGS[0] on the GPU with room for 2 k candidates (at most 8192); small steps and 256 candidates
    under the interpreter (so CI also reaches the third pass and the overflow path)."""
    if INTERPRET or device.type != "cuda":
        return TopkConfig(64, 1, True, cand=256, finish_warps=1)
    base = TOPK_CONFIGS[0]
    return replace(base, cand=min(8192, max(base.cand, 2 * triton.next_power_of_2(k))))


# ---------------------------------------------------------------------------------------------- jit helpers


@triton.jit
def _key(s):
    """fp32 -> uint32 whose unsigned order is the float order (negatives flipped, positives offset)."""
    u = s.to(tl.uint32, bitcast=True)
    return tl.where((u >> 31) != 0, u ^ 0xFFFFFFFF, u | 0x80000000)


@triton.jit
def _level_of(h, need, NB: tl.constexpr):
    """Largest bin b of histogram h with (count of bins >= b) >= need, and the need left inside b; b = -1 if
    too few."""
    ar = tl.arange(0, NB)
    above_eq = tl.cumsum(h, 0, reverse=True)
    b = tl.max(tl.where(above_eq >= need, ar, -1), 0)
    above = tl.sum(tl.where(ar > b, h, 0), 0)
    return b, need - above


@triton.jit
def _threshold(h_ptr, k, DIGITS: tl.constexpr):
    """(key prefix of DIGITS bytes from the stored histograms, ties left to take, take_all); take_all: fewer
    than k visible scores (prefix 0, need k)."""
    b, need = _level_of(tl.load(h_ptr + tl.arange(0, NB), cache_modifier=".cg"), k, NB)
    take_all = b < 0
    kt = b.to(tl.uint32)
    for lvl in tl.static_range(1, DIGITS):
        b, need = _level_of(tl.load(h_ptr + lvl * NB + tl.arange(0, NB), cache_modifier=".cg"), need, NB)
        kt = (kt << 8) | b.to(tl.uint32)
    kt = tl.where(take_all, 0, kt)
    need = tl.where(take_all, k, need)
    return kt, need, take_all


@triton.jit
def _deep(ws_row, p16, need2, take_all, k, CAP: tl.constexpr):
    """1 (int32) when more than CAP keys lie at or above the 16-bit prefix p16: the third byte is resolved
    by a parallel pass before compaction."""
    n_eq = tl.load(ws_row + NB + (p16 & 0xFF).to(tl.int32), cache_modifier=".cg")
    return tl.where(take_all, 0, tl.where(k - need2 + n_eq > CAP, 1, 0))


@triton.jit
def _prefix(ws_row, k, CAP: tl.constexpr, HIST3: tl.constexpr):
    """(prefix, ties left inside it, shift, take_all, deep) after the parallel passes: the key bits above
    `shift` of the k-th largest key (16 bits, or 24 when `deep`)."""
    p16, need2, take_all = _threshold(ws_row, k, 2)
    if HIST3:
        deep = _deep(ws_row, p16, need2, take_all, k, CAP)
        b3, need3 = _level_of(tl.load(ws_row + 2 * NB + tl.arange(0, NB), cache_modifier=".cg"), need2, NB)
        prefix = tl.where(deep != 0, (p16 << 8) | b3.to(tl.uint32), p16)
        need = tl.where(deep != 0, need3, need2)
    else:
        deep = tl.zeros((), dtype=tl.int32)
        prefix = p16
        need = need2
    return prefix, need, tl.where(deep != 0, 8, 16), take_all, deep


@triton.jit
def _row_limit(pos_ptr, row, T, sp_b, sp_t, ratio, N, HAS_POS: tl.constexpr):
    """Visible blocks of score row `row`: min(N, (pos+1) // ratio), or N without positions."""
    if HAS_POS:
        p = tl.load(pos_ptr + (row // T) * sp_b + (row % T) * sp_t).to(tl.int64)
        return tl.minimum((p + 1) // ratio, N)
    else:
        return tl.zeros((), dtype=tl.int64) + N


@triton.jit
def _source(j0, fast, cand_row, s_row, n_src, CAP: tl.constexpr):
    """One block of the finish's input in ascending index order: (index, key, valid), from the sorted
    candidate list (fast) or from the score row itself."""
    offs = j0 + tl.arange(0, CAP)
    m = offs < n_src
    if fast:
        idx = tl.load(cand_row + offs, mask=m, other=0, cache_modifier=".cg")
        key = tl.load(cand_row + CAP + offs, mask=m, other=0, cache_modifier=".cg").to(tl.uint32, bitcast=True)
    else:
        s = tl.load(s_row + offs, mask=m, other=float("-inf"), cache_modifier=".cg")
        key = _key(s)
        idx = offs.to(tl.int32)
        m = m & (s != float("-inf"))
    return idx, key, m


@triton.jit
def _sort_runs(run_row, cand_row, n_chunks, chunk, total,
               CAP: tl.constexpr, CHUNKS_P2: tl.constexpr):
    """Reorder the candidate list (runs appended in arrival order) into chunk order: ascending index."""
    ci = tl.arange(0, CHUNKS_P2)
    cm = ci < n_chunks
    ln = tl.load(run_row + CHUNKS_P2 + ci, mask=cm, other=0, cache_modifier=".cg")
    off = tl.cumsum(ln, 0) - ln
    tl.store(run_row + 2 * CHUNKS_P2 + ci, off, mask=cm)
    sl = tl.arange(0, CAP)
    v = sl < total
    idx = tl.load(cand_row + sl, mask=v, other=0, cache_modifier=".cg")
    key = tl.load(cand_row + CAP + sl, mask=v, other=0, cache_modifier=".cg")
    tl.debug_barrier()  # every thread holds its candidates and the offsets are stored
    ch = idx // chunk
    dst = (tl.load(run_row + 2 * CHUNKS_P2 + ch, mask=v, other=0, cache_modifier=".cg") + sl
           - tl.load(run_row + ch, mask=v, other=0, cache_modifier=".cg"))
    tl.store(cand_row + dst, idx, mask=v)
    tl.store(cand_row + CAP + dst, key, mask=v)
    tl.debug_barrier()


@triton.jit
def _finish_row(s_row, ws_row, run_row, cand_row, out_row, k, lim, chunk, n_chunks,
                CAP: tl.constexpr, CHUNKS_P2: tl.constexpr, HIST3: tl.constexpr):
    """Resolve the k-th largest key's remaining bytes over the row's candidates and write the picks."""
    prefix, need, _shift, take_all, deep = _prefix(ws_row, k, CAP, HIST3)
    total = tl.load(ws_row + COUNT, cache_modifier=".cg")
    fast = total <= CAP
    if fast:
        _sort_runs(run_row, cand_row, n_chunks, chunk, total, CAP, CHUNKS_P2)
    n_src = tl.where(fast, total.to(tl.int64), lim)
    p24 = prefix
    need3 = need
    if deep == 0:  # byte 3 over the candidates equal to the 16-bit prefix
        h3 = tl.zeros((NB,), dtype=tl.int32)
        for j0 in range(0, n_src, CAP):
            idx, key, m = _source(j0, fast, cand_row, s_row, n_src, CAP)
            h3 += tl.histogram(((key >> 8) & 0xFF).to(tl.int32), NB, mask=m & ((key >> 16) == prefix))
        b3, need3 = _level_of(h3, need, NB)
        p24 = (prefix << 8) | b3.to(tl.uint32)
    h4 = tl.zeros((NB,), dtype=tl.int32)
    for j0 in range(0, n_src, CAP):
        idx, key, m = _source(j0, fast, cand_row, s_row, n_src, CAP)
        h4 += tl.histogram((key & 0xFF).to(tl.int32), NB, mask=m & ((key >> 8) == p24))
    b4, ties = _level_of(h4, need3, NB)
    kt = (p24 << 8) | b4.to(tl.uint32)
    ties = tl.where(take_all, 0, ties)
    n_gt_all = k - ties  # not take_all: exactly k - ties keys lie above the k-th largest
    gt_base = tl.zeros((), dtype=tl.int32)
    eq_base = tl.zeros((), dtype=tl.int32)
    for j0 in range(0, n_src, CAP):
        idx, key, m = _source(j0, fast, cand_row, s_row, n_src, CAP)
        gt = (m & ((key > kt) | take_all)).to(tl.int32)
        eq = (m & (key == kt) & ~take_all).to(tl.int32)
        gt_pos = gt_base + tl.cumsum(gt, 0) - gt
        eq_rank = eq_base + tl.cumsum(eq, 0) - eq
        tl.store(out_row + gt_pos, idx, mask=gt != 0)
        tl.store(out_row + n_gt_all + eq_rank, idx, mask=(eq != 0) & (eq_rank < ties))
        gt_base += tl.sum(gt, 0)
        eq_base += tl.sum(eq, 0)
    n_sel = gt_base + tl.minimum(ties, eq_base)
    for i0 in range(0, k, CAP):
        offs = i0 + tl.arange(0, CAP)
        tl.store(out_row + offs, tl.full((CAP,), -1, tl.int32), mask=(offs >= n_sel) & (offs < k))


# ---------------------------------------------------------------------------------------------- kernels


@triton.jit
def _hist_kernel(s_ptr, pos_ptr, ws_ptr, k, T, N, ratio, chunk, sp_b, sp_t, ss_r,
                 LEVEL: tl.constexpr, HAS_POS: tl.constexpr, BLOCK: tl.constexpr, CAP: tl.constexpr):
    """Histogram of byte LEVEL (1..3) over the visible scores of one chunk whose higher bytes match; LEVEL 3
    only where the 16-bit prefix leaves more than CAP candidates."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    h_row = ws_ptr + row * WS_INTS
    lim = _row_limit(pos_ptr, row, T, sp_b, sp_t, ratio, N, HAS_POS)
    SHIFT: tl.constexpr = 32 - 8 * LEVEL
    if LEVEL > 1:
        prefix, need, take_all = _threshold(h_row, k, LEVEL - 1)
        if LEVEL == 3:
            take_all = _deep(h_row, prefix, need, take_all, k, CAP) == 0  # nothing to do
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
def _compact_kernel(s_ptr, pos_ptr, ws_ptr, run_ptr, cand_ptr, out_ptr, k, T, N, ratio, chunk, n_chunks,
                    sp_b, sp_t, ss_r, HAS_POS: tl.constexpr, BLOCK: tl.constexpr, CAP: tl.constexpr,
                    FUSE_FINISH: tl.constexpr, HIST3: tl.constexpr, REVERSE: tl.constexpr):
    """Append this chunk's keys at or above the prefix P to the row's candidate list as one run."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    if REVERSE:
        c = n_chunks - 1 - c
    ws_row = ws_ptr + row * WS_INTS
    run_row = run_ptr + row * (3 * MAX_CHUNKS)
    cand_row = cand_ptr + row * (2 * CAP)
    s_row = s_ptr + row * ss_r
    lim = _row_limit(pos_ptr, row, T, sp_b, sp_t, ratio, N, HAS_POS)
    prefix, _need, shift, _all, _deep = _prefix(ws_row, k, CAP, HIST3)  # take_all: P = 0 keeps every score
    end = tl.minimum(c * chunk + chunk, lim)
    n = tl.zeros((), dtype=tl.int32)
    for j0 in range(c * chunk, end, BLOCK):
        offs = j0 + tl.arange(0, BLOCK)
        s = tl.load(s_row + offs, mask=offs < end, other=float("-inf"))
        n += tl.sum(((offs < end) & (s != float("-inf")) & ((_key(s) >> shift) >= prefix)).to(tl.int32), 0)
    start = tl.atomic_add(ws_row + COUNT, n)
    tl.store(run_row + c, start)
    tl.store(run_row + MAX_CHUNKS + c, n)
    base = start
    for j0 in range(c * chunk, end, BLOCK):  # the chunk again, from cache
        offs = j0 + tl.arange(0, BLOCK)
        s = tl.load(s_row + offs, mask=offs < end, other=float("-inf"))
        key = _key(s)
        sel = ((offs < end) & (s != float("-inf")) & ((key >> shift) >= prefix)).to(tl.int32)
        slot = base + tl.cumsum(sel, 0) - sel
        keep = (sel != 0) & (slot < CAP)  # past CAP: the finish reads the score row instead
        tl.store(cand_row + slot, offs, mask=keep)
        tl.store(cand_row + CAP + slot, key.to(tl.int32, bitcast=True), mask=keep)
        base += tl.sum(sel, 0)
    if FUSE_FINISH:
        tl.debug_barrier()  # every thread's stores precede the release below
        arrived = tl.atomic_add(ws_row + ARRIVE, 1, sem="acq_rel")
        if arrived == n_chunks - 1:  # last of the row: every run is visible (acquire)
            _finish_row(s_row, ws_row, run_row, cand_row, out_ptr + row * k, k, lim, chunk, n_chunks,
                        CAP, MAX_CHUNKS, HIST3)


@triton.jit
def _finish_kernel(s_ptr, pos_ptr, ws_ptr, run_ptr, cand_ptr, out_ptr, k, T, N, ratio, chunk, n_chunks,
                   sp_b, sp_t, ss_r, HAS_POS: tl.constexpr, CAP: tl.constexpr, HIST3: tl.constexpr):
    """One program per row: `_finish_row`."""
    row = tl.program_id(0).to(tl.int64)
    lim = _row_limit(pos_ptr, row, T, sp_b, sp_t, ratio, N, HAS_POS)
    _finish_row(s_ptr + row * ss_r, ws_ptr + row * WS_INTS, run_ptr + row * (3 * MAX_CHUNKS),
                cand_ptr + row * (2 * CAP), out_ptr + row * k, k, lim, chunk, n_chunks, CAP, MAX_CHUNKS, HIST3)


# ---------------------------------------------------------------------------------------------- launchers


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: few programs


def new_workspace(R, device: torch.device, config: TopkConfig, zeroed: bool) -> tuple[torch.Tensor, ...]:
    """(ws [R, WS_INTS], runs [R, 3 MAX_CHUNKS], candidates [R, 2 cand]) int32; `zeroed=False` when a score
    kernel zeroes ws (ZERO_WS) before the passes read it."""
    alloc = torch.zeros if zeroed else torch.empty
    ws = alloc((R, WS_INTS.value), dtype=torch.int32, device=device)
    runs = torch.empty((R, 3 * MAX_CHUNKS.value), dtype=torch.int32, device=device)
    cand = torch.empty((R, 2 * config.cand), dtype=torch.int32, device=device)
    return ws, runs, cand


def workspace_ints_per_row(config: TopkConfig) -> int:
    """int32 per score row that `new_workspace` allocates (for the fused op's workspace budget)."""
    return WS_INTS.value + 3 * MAX_CHUNKS.value + 2 * config.cand


def check_topk_config(cfg: TopkConfig) -> None:
    if not all(x >= 16 and x & (x - 1) == 0 for x in (cfg.cand, cfg.block)):
        raise ValueError(f"{cfg}: block and cand must be powers of two >= 16")


def launch_select(scores, R, N, k: int, out, workspace, hist1_done: bool, pos=None, T=1, ratio: int = 1,
                  config: TopkConfig | None = None) -> None:
    """Radix select over R rows of `scores` (row stride N) into out [R, k]; `workspace` from new_workspace."""
    cfg = config or pick_topk_config(scores.device)
    check_topk_config(cfg)
    ws, runs, cand = workspace
    has_pos = pos is not None
    pos_arg = pos if has_pos else unused_arg(scores.device, torch.int64)  # never `scores` (launch.py)
    sp_b, sp_t = (pos.stride(0), pos.stride(1)) if has_pos else (0, 0)
    n_chunks = torch.sym_max(1, torch.sym_min(torch.sym_min(triton.cdiv(N, cfg.block), MAX_CHUNKS.value),
                                               triton.cdiv(2 * _sm_count(scores.device), R)))
    chunk = triton.cdiv(triton.cdiv(N, n_chunks), cfg.block) * cfg.block
    n_chunks = torch.sym_max(1, triton.cdiv(N, chunk))
    grid = (R, n_chunks)
    levels = (1, 2, 3)[1 if hist1_done else 0: 3 if cfg.hist3 else 2]
    for level in levels:
        launcher(_hist_kernel, scores, pos_arg, ws)[grid](
            scores, pos_arg, ws, k, T, N, ratio, chunk, sp_b, sp_t, N, LEVEL=level, HAS_POS=has_pos,
            BLOCK=cfg.block, CAP=cfg.cand, num_warps=cfg.num_warps)
    launcher(_compact_kernel, scores, pos_arg, ws, runs, cand, out)[grid](
        scores, pos_arg, ws, runs, cand, out, k, T, N, ratio, chunk, n_chunks, sp_b, sp_t, N,
        CAP=cfg.cand, FUSE_FINISH=cfg.fuse_finish, HIST3=cfg.hist3, REVERSE=REVERSE_CHUNKS, HAS_POS=has_pos,
        BLOCK=cfg.block,
        num_warps=cfg.finish_warps if cfg.fuse_finish else cfg.num_warps)
    if not cfg.fuse_finish:
        launcher(_finish_kernel, scores, pos_arg, ws, runs, cand, out)[(R,)](
            scores, pos_arg, ws, runs, cand, out, k, T, N, ratio, chunk, n_chunks, sp_b, sp_t, N,
            HAS_POS=has_pos, CAP=cfg.cand, HIST3=cfg.hist3, num_warps=cfg.finish_warps)

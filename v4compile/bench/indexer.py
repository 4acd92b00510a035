"""Benchmarks of the lightning indexer + top-k and the compressor kernels at V4-Flash shapes.

Indexer (V4-SPEC 4.3): Hi = 64 heads of Di = 128, top-k 512, one key row per 4-token block (262 144 at 1M
context). Each bench checks the kernel at the benchmarked shape first: scores calc_diff against the reference
op (fp32 accumulation on both sides), the picks against the documented rule on the kernel's own scores, and
the overlap of the picked set with torch.topk on the reference scores (near-ties may differ). Rivals: the eager
reference (v4::indexer_scores + v4::topk_select, fp32 einsum) and the plain-torch bf16 way (bf16 einsum,
ReLU, weighted head sum, torch.topk). Bytes = keys + queries + weights + picks; FLOPs = 2 Hi Di per (query,
visible key). Decode benches also run the packed FP4 key layout (`fp4_*` rows, 68 B per key instead of 256:
their floor counts their own bytes).
Compressor (4.1, 4.2, 5, 6.5): decode = one token per sequence at a position that completes a block (the worst
case), prefill = T tokens from position 0; bytes = projections read + state read/written + cache rows written.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from v4compile.bench.common import Ceilings, Row, compiled_row, floor_us, time_us
from v4compile.validate import calc_diff

HI, DI, TOPK, RATIO = 64, 128, 512, 4
DEVICE = "cuda"  # benchmarks run on the GPU; a CPU dry run of the harness (interpreter) points this elsewhere


def _indexer_inputs(B: int, T: int, N: int, start: int, seed: int = 0) -> dict[str, Any]:
    """Queries at positions start..start+T-1 of B sequences over N key rows (FP4-grid values, as stored)."""
    from v4compile.quant.formats import fake_quant_fp4

    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q = fake_quant_fp4(torch.randn(B, T, HI, DI, device=DEVICE, generator=g), 32).to(torch.bfloat16)
    w = (torch.randn(B, T, HI, device=DEVICE, generator=g) * (HI * DI) ** -0.5).to(torch.bfloat16)
    k = fake_quant_fp4(torch.randn(B, N, DI, device=DEVICE, generator=g), 32).to(torch.bfloat16)
    pos = (start + torch.arange(T, device=DEVICE)).view(1, T).repeat(B, 1)
    return dict(q=q, w=w, k=k, pos=pos)


def _bf16_rival(a: dict[str, Any], k: int) -> torch.Tensor:
    """Plain torch in bf16: einsum, ReLU, weighted head sum, causal mask, torch.topk."""
    s = torch.einsum("bthd,bnd->bthn", a["q"], a["k"]).relu_()
    s = (s * a["w"].unsqueeze(-1)).sum(2, dtype=torch.float32)
    lim = torch.div(a["pos"] + 1, RATIO, rounding_mode="floor").unsqueeze(-1)
    s.masked_fill_(torch.arange(s.shape[-1], device=s.device) >= lim, -math.inf)
    v, i = s.topk(k, dim=-1)
    return torch.where(v == -math.inf, -1, i)


def _members(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Picks [rows, k] (-1 = none) -> membership mask [rows, n]."""
    m = torch.zeros(idx.shape[0], n + 1, device=idx.device, dtype=torch.bool)
    return m.scatter_(1, idx.long() + 1, True)[:, 1:]


def _agreement(idx: torch.Tensor, ref_idx: torch.Tensor, ref_scores: torch.Tensor) -> dict[str, float]:
    """Overlap of the picked sets with the reference's (fraction of reference picks also picked), and the largest reference-score gap to the reference's
    k-th largest among the picks that differ (0: exact ties; ~1e-7 relative: fp32 summation-order near-ties)."""
    s = ref_scores.flatten(0, -2)
    a, b = _members(idx.flatten(0, -2), s.shape[-1]), _members(ref_idx.flatten(0, -2), s.shape[-1])
    overlap = float((a & b).sum()) / max(1, int(b.sum()))  # over all reference picks
    kth = torch.where(b, s, math.inf).amin(1, keepdim=True)
    gap = torch.where(a ^ b, (s - kth).abs() / kth.abs().clamp(min=1e-30), 0.0)
    return dict(overlap_vs_torch_topk=overlap, rows_differing=int((a ^ b).any(1).sum()),
                max_rel_gap_of_differing_picks=float(gap.max()) if gap.numel() else 0.0)


def _rule_ok(idx: torch.Tensor, scores: torch.Tensor) -> bool:
    """Every pick is visible, the picks are distinct and no unpicked score exceeds the smallest picked one."""
    idx, scores = idx.flatten(0, -2), scores.flatten(0, -2)
    valid = idx >= 0
    picked = torch.gather(scores, -1, idx.clamp(min=0).long())
    smallest = torch.where(valid, picked, math.inf).amin(-1, keepdim=True)
    mask = _members(idx, scores.shape[-1])
    distinct = bool((mask.sum(-1) == valid.sum(-1)).all())
    above = bool(((scores > smallest) & ~mask).any())
    n_vis = (scores > -math.inf).sum(-1)
    count_ok = bool((valid.sum(-1) == n_vis.clamp(max=idx.shape[-1])).all())
    return count_ok and distinct and not above and bool(torch.isfinite(picked[valid]).all())


def _indexer_cost(a: dict[str, Any], N: int) -> tuple[float, float]:
    vis = torch.div(a["pos"] + 1, RATIO, rounding_mode="floor").clamp(max=N)
    flops = 2.0 * HI * DI * float(vis.sum())
    B, T = a["pos"].shape
    nbytes = B * N * DI * 2 + a["q"].numel() * 2 + a["w"].numel() * 2 + B * T * TOPK * 4
    return flops, nbytes


def indexer_decode(ceil: Ceilings, opt: Any, *, B: int, N: int, bench: str) -> list[Row]:
    """One query per sequence at the last position of an N-block context: fused scores + top-k, with the keys
    as bf16 rows (256 B each) and packed FP4 (68 B each: codes + UE8M0 scales, quant.kv_layout)."""
    import v4compile.model.ops  # noqa: F401
    from v4compile.plugins.triton import indexer_topk as it

    a = _indexer_inputs(B, 1, N, RATIO * N - 1)
    args = (a["q"], a["w"], a["k"], a["pos"], RATIO)
    ref_scores = torch.ops.v4.indexer_scores(*args)
    ref_idx = torch.ops.v4.topk_select(ref_scores, TOPK)
    flops, nbytes = _indexer_cost(a, N)
    fl = floor_us(nbytes, flops, ceil)
    rows, idx, ks, (cfg, tcfg) = _fused_rows(args, it.SCORE_CONFIGS, opt, ref_scores, ref_idx, flops, nbytes, fl,
                                             bench, "")
    rows.append(Row(bench, "topk_only", time_us(lambda: it.topk_select_launch(ks, TOPK, config=tcfg),
                                                cudagraph=True),
                    0.0, ks.numel() * 4 + B * TOPK * 4, None))
    rows.append(Row(bench, "torch.topk_only", time_us(lambda: torch.topk(ks, TOPK, dim=-1), cudagraph=True),
                    0.0, ks.numel() * 4 + B * TOPK * 4, None))
    try:
        rows += _fp4_rows(ceil, opt, a, flops, nbytes, ref_scores, ref_idx, idx, bench)
    except Exception as e:  # noqa: BLE001  (keep the bf16 rows of this run)
        print(f"[bench] {bench}: FP4 rows failed: {type(e).__name__}: {e}", flush=True)
        rows.append(Row(bench, "fp4_triton_graph", math.nan, extra=dict(error=f"{type(e).__name__}: {e}"[:500])))
    rows.append(Row(bench, "eager", time_us(lambda: torch.ops.v4.topk_select(torch.ops.v4.indexer_scores(*args),
                                                                              TOPK)), flops, nbytes, fl))
    bf = _bf16_rival(a, TOPK)
    rows.append(Row(bench, "torch_bf16", time_us(lambda: _bf16_rival(a, TOPK)), flops, nbytes, fl,
                    extra=_agreement(bf, ref_idx, ref_scores)))
    return rows


def _best(run, configs: list) -> tuple[Any, Any, list[dict[str, Any]]]:
    """Time run(score_config, topk_config) for each pair (CUDA graph); the fastest pair and every trial (a pair
    that fails is reported in its trial, not fatal)."""
    trials = []
    for cfg, tcfg in configs:
        try:
            trials.append(dict(config=str(cfg), topk_config=str(tcfg), time_us=time_us(lambda: run(cfg, tcfg),
                                                                                       cudagraph=True)))
        except Exception as e:  # noqa: BLE001  (a sweep config that does not compile or fit)
            trials.append(dict(config=str(cfg), topk_config=str(tcfg), error=f"{type(e).__name__}: {e}"[:300]))
    ok = [j for j, t in enumerate(trials) if "time_us" in t]
    if not ok:
        raise RuntimeError(f"every configuration failed: {trials}")
    i = min(ok, key=lambda j: trials[j]["time_us"])
    return configs[i][0], configs[i][1], trials


def _fp4_rows(ceil: Ceilings, opt: Any, a: dict[str, Any], flops: float, bf16_bytes: float, ref_scores, ref_idx,
              bf16_idx, bench: str) -> list[Row]:
    """The same decode step over packed FP4 keys (68 B per key: its own floor), checked like the bf16 rows
    plus the agreement of its picks with the bf16-layout kernel's."""
    from v4compile.plugins.triton import indexer_topk as it
    from v4compile.quant.kv_layout import index_key_bytes, pack_index_keys

    B, N = a["k"].shape[:2]
    packed = pack_index_keys(a["k"])  # exact: the keys are on the FP4 grid
    args = (a["q"], a["w"], packed, a["pos"], RATIO)
    nbytes = bf16_bytes - B * N * DI * 2 + B * N * index_key_bytes(DI)
    fl = floor_us(nbytes, flops, ceil)
    rows, idx, _, _ = _fused_rows(args, it.FP4_SCORE_CONFIGS, opt, ref_scores, ref_idx, flops, nbytes, fl, bench,
                                  "fp4_")
    rows[0].extra["picks_equal_bf16_layout"] = float((_members(idx.flatten(0, -2), N)
                                                      == _members(bf16_idx.flatten(0, -2), N)).all(-1).float().mean())
    return rows


def _fused_rows(args: tuple, score_configs: Any, opt: Any, ref_scores, ref_idx, flops: float, nbytes: float,
                fl: float, bench: str, prefix: str) -> tuple[list[Row], Any, Any, tuple[Any, Any]]:
    """The fused scores + top-k op at its fastest (score, top-k) config (all of them with --sweep): rows
    <prefix>triton_graph (checked against the reference), <prefix>triton (plain launches) and
    <prefix>scores_only (the unfused scores kernel, which writes all N scores); also the picks, the scores and
    the chosen configs."""
    from v4compile.plugins.triton import indexer_topk as it

    B = args[0].shape[0]
    configs = ([(c, tc) for c in score_configs if c.bt == 1 for tc in it.TOPK_CONFIGS] if opt.sweep
               else [(None, None)])
    cfg, tcfg, trials = _best(lambda c, tc: it.indexer_topk_launch(*args, TOPK, config=c, topk_config=tc), configs)
    idx = it.indexer_topk_launch(*args, TOPK, config=cfg, topk_config=tcfg)
    ks = it.indexer_scores_launch(*args, config=cfg)
    extra = dict(scores_calc_diff=calc_diff(ks, ref_scores), rule_ok=_rule_ok(idx, ks),
                 **_agreement(idx, ref_idx, ref_scores), trials=trials)
    best = min(t["time_us"] for t in trials if "time_us" in t)
    rows = [Row(bench, f"{prefix}triton_graph", best, flops, nbytes, fl, extra["scores_calc_diff"], extra),
            Row(bench, f"{prefix}triton", time_us(lambda: it.indexer_topk_launch(*args, TOPK, config=cfg,
                                                                                   topk_config=tcfg)),
                flops, nbytes, fl),
            Row(bench, f"{prefix}scores_only", time_us(lambda: it.indexer_scores_launch(*args, config=cfg),
                                                       cudagraph=True), flops, nbytes - B * TOPK * 4, fl)]
    return rows, idx, ks, (cfg, tcfg)


def indexer_prefill(ceil: Ceilings, opt: Any, *, T: int, bench: str, check_rows: int = 256) -> list[Row]:
    """T queries at positions 0..T-1 over their own T/4 blocks (causal), fused scores + top-k."""
    import v4compile.model.ops  # noqa: F401
    from v4compile.plugins.triton import indexer_topk as it

    N = T // RATIO
    a = _indexer_inputs(1, T, N, 0)
    args = (a["q"], a["w"], a["k"], a["pos"], RATIO)
    flops, nbytes = _indexer_cost(a, N)
    fl = floor_us(nbytes, flops, ceil)
    configs = [c for c in it.SCORE_CONFIGS if c.bt > 1] if opt.sweep else [None]
    trials = []
    for cfg in configs:
        try:
            trials.append(dict(config=str(cfg), time_us=time_us(lambda: it.indexer_topk_launch(*args, TOPK,
                                                                                               config=cfg))))
        except Exception as e:  # a config that does not fit is reported, not fatal
            trials.append(dict(config=str(cfg), error=str(e)[:200]))
    ok = [t for t in trials if "time_us" in t]
    best = min(ok, key=lambda t: t["time_us"])
    cfg = configs[trials.index(best)]
    idx = it.indexer_topk_launch(*args, TOPK, config=cfg)
    sel = torch.linspace(0, T - 1, min(T, check_rows), device=DEVICE).long().unique()
    sub = (a["q"][:, sel], a["w"][:, sel], a["k"], a["pos"][:, sel], RATIO)
    ref_scores = torch.ops.v4.indexer_scores(*sub)
    ks = it.indexer_scores_launch(*(t.contiguous() if torch.is_tensor(t) else t for t in sub), config=cfg)
    extra = dict(scores_calc_diff=calc_diff(ks, ref_scores), rule_ok=_rule_ok(idx[:, sel], ks),
                 **_agreement(idx[:, sel], torch.ops.v4.topk_select(ref_scores, TOPK), ref_scores),
                 checked_rows=int(sel.numel()), trials=trials)
    rows = [Row(bench, "triton", best["time_us"], flops, nbytes, fl, extra["scores_calc_diff"], extra)]
    full = torch.empty((1, T, N), device=DEVICE)
    rows.append(Row(bench, "scores_only", time_us(lambda: it.indexer_scores_launch(*args, out=full, config=cfg)),
                    flops, nbytes, fl))
    del full
    if T <= 8192:
        rows.append(Row(bench, "eager", time_us(lambda: torch.ops.v4.topk_select(
            torch.ops.v4.indexer_scores(*args), TOPK)), flops, nbytes, fl))
        rows.append(Row(bench, "torch_bf16", time_us(lambda: _bf16_rival(a, TOPK)), flops, nbytes, fl))
    return rows


# ------------------------------------------------------------------------------------------ compressor

_KINDS = {"csa": (4, 512, False), "csa_indexer": (4, 128, True), "hca": (128, 512, False)}


def _compress_inputs(kind: str, B: int, T: int, start: int, n_blocks: int, seed: int = 0, packed: bool = False):
    from v4compile.model.rope import rope_inv_freq

    m, D, rotate = _KINDS[kind]
    c = 2 if m == 4 else 1
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    dev = DEVICE
    kv = torch.randn(B, T, c * D, device=dev, generator=g)
    gate = torch.randn(B, T, c * D, device=dev, generator=g)
    ape = torch.randn(m, c * D, device=dev, generator=g)
    norm_w = (1 + 0.1 * torch.randn(D, device=dev, generator=g)).to(torch.bfloat16)
    inv_freq = rope_inv_freq(64, 160000.0, yarn=True, factor=16, original_seq_len=65536, device=dev)
    start_pos = torch.full((B,), start, device=dev, dtype=torch.int64)
    state = [torch.randn(B, c * m, c * D, device=dev, generator=g),
             torch.randn(B, c * m, c * D, device=dev, generator=g)]
    if packed:  # production layout (model/cache.py): uint8 data rows + their scale bytes
        width, sw = _packed_row_bytes(kind)
        state += [torch.zeros(B, n_blocks + 1, width, device=dev, dtype=torch.uint8),
                  torch.zeros(B, n_blocks + 1, sw, device=dev, dtype=torch.uint8)]
    else:
        state.append(torch.zeros(B, n_blocks + 1, D, device=dev, dtype=torch.bfloat16))
    return (kv, gate, ape, norm_w, inv_freq, start_pos), state, (m, 1e-6, rotate)


def _packed_row_bytes(kind: str) -> tuple[int, int]:
    """(data bytes, scale bytes) of one production-layout row: 576 + 8 (KV), 64 + 4 (indexer key)."""
    from v4compile.quant.kv_layout import row_bytes

    m, D, rotate = _KINDS[kind]
    return row_bytes(D, 64, index_key=rotate)


def _compress_bytes(kind: str, B: int, T: int, packed: bool = False, mid_block: bool = False) -> float:
    m, D, _ = _KINDS[kind]
    c = 2 if m == 4 else 1
    if mid_block:  # one state row written per tensor, nothing pooled (the other rows stay: not read)
        return 2 * B * T * c * D * 4 + 2 * B * c * D * 4
    blocks = B * max(T // m, 1)
    state = 0 if T >= c * m else 2 * 2 * B * c * m * c * D * 4  # decode: read + write both state tensors
    row = sum(_packed_row_bytes(kind)) if packed else D * 2
    return 2 * B * T * c * D * 4 + state + blocks * row


def compressor(ceil: Ceilings, opt: Any, *, kind: str, B: int, T: int, bench: str, packed: bool = False,
               mid_block: bool = False) -> list[Row]:
    """Decode (T = 1 at a block-completing position, or with `mid_block` at one inside a block: the common step,
    which writes one state row) or prefill (T tokens from 0) of one compressor; `packed`: into production-layout
    caches (v4::compress_packed), timed also against torch.compile of its reference body (what a GPU engine ran
    before this kernel existed)."""
    import v4compile.model.ops  # noqa: F401
    from v4compile.plugins.triton import compressor as ck

    m = _KINDS[kind][0]
    start = (m // 2 if mid_block else m - 1) if T == 1 else 0
    n_blocks = max(T // m, 1) + 1
    inp, state, tail = _compress_inputs(kind, B, T, start, n_blocks, packed=packed)
    ref_op = torch.ops.v4.compress_packed if packed else torch.ops.v4.compress
    launch = ck.compress_packed_launch if packed else ck.compress_launch
    if mid_block:  # a state as the model leaves it after `start` tokens (absent rows kv 0 / score -inf)
        c = 2 if m == 4 else 1
        state[0].zero_()
        state[1].fill_(float("-inf"))
        prefix = [torch.randn(B, start, c * _KINDS[kind][1], device=inp[0].device) for _ in range(2)]
        ref_op(*prefix, *inp[2:5], torch.zeros_like(inp[5]), *state, *tail)
    ref_state = [t.clone() for t in state]
    ref_op(*inp, *ref_state, *tail)
    ker_state = [t.clone() for t in state]
    launch(*inp, *ker_state, *tail)
    states_equal = bool(torch.equal(ker_state[0], ref_state[0]) and torch.equal(ker_state[1], ref_state[1]))
    if packed:  # bytes: exact fraction over data and scales; check on the decoded rows
        from v4compile.quant.kv_layout import unpack_index_rows, unpack_kv_rows

        rotate = tail[2]
        dec = [unpack_index_rows(t[2][:, :-1], t[3][:, :-1], torch.float32) if rotate else
               unpack_kv_rows(t[2][:, :-1], t[3][:, :-1], 64, torch.float32) for t in (ker_state, ref_state)]
        check = calc_diff(dec[0], dec[1])
        same = sum(int((ker_state[i][:, :-1] == ref_state[i][:, :-1]).sum()) for i in (2, 3))
        exact = same / sum(ref_state[i][:, :-1].numel() for i in (2, 3))
    else:
        check = calc_diff(ker_state[2][:, :-1], ref_state[2][:, :-1])
        exact = float((ker_state[2][:, :-1] == ref_state[2][:, :-1]).float().mean())
    nbytes = _compress_bytes(kind, B, T, packed, mid_block)
    fl = floor_us(nbytes, 0.0, ceil)
    work = [t.clone() for t in state]  # timing reruns the same call; the state contents do not change the cost
    extra = dict(states_equal=states_equal, cache_exact_fraction=exact)
    rows = [Row(bench, "triton", time_us(lambda: launch(*inp, *work, *tail), cudagraph=T == 1),
                0.0, nbytes, fl, check, extra)]
    rows.append(Row(bench, "eager", time_us(lambda: ref_op(*inp, *work, *tail)), 0.0, nbytes, fl))
    if packed:
        from v4compile.model.ops import BODIES

        rows.append(compiled_row(bench, BODIES["compress_packed"], (*inp, *[t.clone() for t in state], *tail),
                                 (*inp, *work, *tail), 0.0, nbytes, fl, cudagraph=T == 1))
    return rows


def bench_specs(spec_cls) -> list:
    """BenchSpec entries for bench/kernels.py's BENCHES (groups 'indexer' and 'compressor')."""
    return [
        spec_cls("indexer_decode_b1_1m", indexer_decode, "indexer", dict(B=1, N=262144)),
        spec_cls("indexer_decode_b1_128k", indexer_decode, "indexer", dict(B=1, N=32768)),
        spec_cls("indexer_decode_b8_128k", indexer_decode, "indexer", dict(B=8, N=32768)),
        spec_cls("indexer_decode_b64_128k", indexer_decode, "indexer", dict(B=64, N=32768)),
        spec_cls("indexer_prefill_4k", indexer_prefill, "indexer", dict(T=4096)),
        spec_cls("indexer_prefill_32k", indexer_prefill, "indexer", dict(T=32768)),
        spec_cls("compress_csa_decode_b64", compressor, "compressor", dict(kind="csa", B=64, T=1)),
        spec_cls("compress_idx_decode_b64", compressor, "compressor", dict(kind="csa_indexer", B=64, T=1)),
        spec_cls("compress_hca_decode_b64", compressor, "compressor", dict(kind="hca", B=64, T=1)),
        spec_cls("compress_csa_prefill_16k", compressor, "compressor", dict(kind="csa", B=1, T=16384)),
        spec_cls("compress_idx_prefill_16k", compressor, "compressor", dict(kind="csa_indexer", B=1, T=16384)),
        spec_cls("compress_hca_prefill_16k", compressor, "compressor", dict(kind="hca", B=1, T=16384)),
        spec_cls("compress_hca_decode_b64_mid", compressor, "compressor", dict(kind="hca", B=64, T=1, mid_block=True)),
        spec_cls("compress_csa_decode_b64_packed", compressor, "compressor", dict(kind="csa", B=64, T=1, packed=True)),
        spec_cls("compress_idx_decode_b64_packed", compressor, "compressor",
                 dict(kind="csa_indexer", B=64, T=1, packed=True)),
        spec_cls("compress_hca_decode_b64_packed", compressor, "compressor", dict(kind="hca", B=64, T=1, packed=True)),
        spec_cls("compress_csa_prefill_16k_packed", compressor, "compressor",
                 dict(kind="csa", B=1, T=16384, packed=True)),
        spec_cls("compress_hca_prefill_16k_packed", compressor, "compressor",
                 dict(kind="hca", B=1, T=16384, packed=True)),
    ]

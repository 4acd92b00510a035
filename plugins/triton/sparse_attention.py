"""Sparse MQA attention over two gathered KV sets plus a sink (V4-SPEC section 3.4), as `v4triton::sparse_attention`.

Legend: B batch, T query tokens, H heads, D head dim (512), N / N2 rows of the two KV sources, K / K2 indices
per query into them (-1 = skip), BH heads per program, BN entries per step, S splits of the entry list.

One program owns one query token and BH (= all 64 at V4-Flash) heads, so each gathered KV row is loaded once
for all heads and serves as both K (QK^T) and V (PV). It walks the blocks of source 1 then of source 2 with an
online softmax in fp32 (QK in the input dtype with fp32 accumulation, P cast to the input dtype before PV),
then adds the sink to the denominator. Decode with few queries splits the entry list over S programs that
write fp32 partials (acc, max, sum); a combine kernel merges them and applies the sink. A second entry point,
`v4triton::sparse_attention_fp8`, reads both sources in the production FP8 layout (quant/kv_layout.py).
Indices >= the source's row count are skipped like -1 (the reference clamps them; both are contract violations).
H200 numbers and why they fall short of the targets: docs/perf/sparse_attention.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from v4compile.plugins.registry import register_kernel
from v4compile.plugins.triton.launch import launcher, unused_arg

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class AttnConfig:
    """Launch parameters of the attention kernel (entries per step, warps, pipeline depth)."""

    block_n: int
    num_warps: int
    num_stages: int


# Candidate configs. On sm_90 each keeps the [64, 512] fp32 accumulator in registers without spills (ptxas);
# `bench/kernels.py --sweep` times them on the GPU. Measured on the H200 (docs/perf/sparse_attention.md): time
# per 64-entry step is nearly fixed, so the largest tile wins everywhere for BF16 rows (64, 8 warps, 2 stages);
# for FP8 rows the register-staged dequantisation fits 32-entry tiles best.
CONFIGS_BF16: list[AttnConfig] = [AttnConfig(64, 8, 2), AttnConfig(32, 8, 3), AttnConfig(16, 8, 3),
                                  AttnConfig(16, 8, 4)]
CONFIGS_FP8: list[AttnConfig] = [AttnConfig(32, 8, 3), AttnConfig(16, 8, 3), AttnConfig(16, 8, 4)]
MAX_SPLITS = 32  # beyond ~32 splits the fp32 partials (128 KiB per split and query) cost more than they save
CONFIG_INTERPRETER = AttnConfig(16, 4, 1)  # the CPU interpreter: small tiles keep numpy fast


@triton.jit
def _gather_kv_tile(kv_base, sc_base, rows, valid, stride_n, stride_sc, offs_d, d_mask,
                    FP8: tl.constexpr, NOPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows `rows` of one KV source as a [BN, BD] tile in the compute dtype (zeros where not valid).

    FP8: each data row is NOPE e4m3 bytes then 64 bf16 RoPE values; the scale row holds one UE8M0 byte per
    64 nope channels (quant/kv_layout.py). Dequantised in registers: e4m3 * 2^(byte - 127) is exact.
    """
    r = rows.to(tl.int64)
    if FP8:
        NB: tl.constexpr = NOPE // 64
        NBP: tl.constexpr = BLOCK_D // 64
        blk = tl.arange(0, NBP)
        c = tl.arange(0, 64)
        row_ptr = kv_base + r * stride_n  # uint8 row starts [BN]
        is_nope = blk < NB
        codes = tl.load(row_ptr[:, None, None] + (blk * 64)[None, :, None] + c[None, None, :],
                        mask=valid[:, None, None] & is_nope[None, :, None], other=0)
        sc = tl.load(sc_base + r[:, None] * stride_sc + blk[None, :], mask=valid[:, None] & is_nope[None, :],
                     other=0)
        scale = (sc.to(tl.int32) << 23).to(tl.float32, bitcast=True)  # 2^(byte - 127); byte 0 never occurs
        rope_ptr = (row_ptr + NOPE).to(tl.pointer_type(tl.bfloat16), bitcast=True)
        rope = tl.load(rope_ptr[:, None] + c[None, :], mask=valid[:, None], other=0.0)  # [BN, 64]
        vals = codes.to(tl.float8e4nv, bitcast=True).to(tl.float32) * scale[:, :, None]
        vals = tl.where((blk == NB)[None, :, None], rope.to(tl.float32)[:, None, :], vals)
        return tl.reshape(vals, [BLOCK_N, BLOCK_D]).to(tl.bfloat16)
    else:
        ptrs = kv_base + r[:, None] * stride_n + offs_d[None, :]
        return tl.load(ptrs, mask=valid[:, None] & d_mask[None, :], other=0.0)


@triton.jit
def _attend_block(q, acc, m_i, l_i, kv_base, sc_base, idx_base, start, n_idx, n_rows, stride_n, stride_sc,
                  offs_n, offs_d, d_mask, qk_scale, DOT_PREC: tl.constexpr, FP8: tl.constexpr,
                  NOPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One step of the online softmax over the entries idx[start : start + BN] of one source."""
    pos = start + offs_n
    rows = tl.load(idx_base + pos, mask=pos < n_idx, other=-1)
    valid = (rows >= 0) & (rows < n_rows)
    kv = _gather_kv_tile(kv_base, sc_base, rows, valid, stride_n, stride_sc, offs_d, d_mask,
                         FP8, NOPE, BLOCK_N, BLOCK_D)  # [BN, BD]: key and value
    s = tl.dot(q, tl.trans(kv), input_precision=DOT_PREC) * qk_scale  # [BH, BN] fp32, log2 domain
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing valid yet: keep exp2 finite
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(kv.dtype), kv, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _sparse_attn_kernel(
    q_ptr, kv_ptr, sc_ptr, idx_ptr, kv2_ptr, sc2_ptr, idx2_ptr, sink_ptr, o_ptr, part_acc_ptr, part_ml_ptr,
    T, H, D, N, N2, K, K2, blocks_per_split, qk_scale, sink_scale,
    s_qb, s_qt, s_qh, s_kvb, s_kvn, s_scb, s_scn, s_ib, s_it, s_kv2b, s_kv2n, s_sc2b, s_sc2n, s_i2b, s_i2t,
    s_ob, s_ot, s_oh,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr, DOT_PREC: tl.constexpr, FP8: tl.constexpr, NOPE: tl.constexpr,
):
    # float arguments arrive as fp64 when AOTInductor launches the kernel: keep the softmax state in fp32
    qk_scale = tl.cast(qk_scale, tl.float32)
    sink_scale = tl.cast(sink_scale, tl.float32)
    pid_bt = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = (pid_bt // T).to(tl.int64)
    t = (pid_bt % T).to(tl.int64)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    h_mask = offs_h < H
    d_mask = offs_d < D

    q_ptrs = q_ptr + b * s_qb + t * s_qt + offs_h[:, None] * s_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=h_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    nb1 = tl.cdiv(K, BLOCK_N)
    nb = nb1 + tl.cdiv(K2, BLOCK_N)
    lo = pid_s * blocks_per_split
    hi = tl.minimum(lo + blocks_per_split, nb)
    kv_base = kv_ptr + b * s_kvb
    sc_base = sc_ptr + b * s_scb
    idx_base = idx_ptr + b * s_ib + t * s_it
    kv2_base = kv2_ptr + b * s_kv2b
    sc2_base = sc2_ptr + b * s_sc2b
    idx2_base = idx2_ptr + b * s_i2b + t * s_i2t

    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    # one loop over the blocks of both sources (two loops made ptxas spill the second one's registers)
    for i in range(lo, hi):
        first = i < nb1
        acc, m_i, l_i = _attend_block(
            q, acc, m_i, l_i, tl.where(first, kv_base, kv2_base), tl.where(first, sc_base, sc2_base),
            tl.where(first, idx_base, idx2_base), tl.where(first, i, i - nb1) * BLOCK_N, tl.where(first, K, K2),
            tl.where(first, N, N2), tl.where(first, s_kvn, s_kv2n), tl.where(first, s_scn, s_sc2n),
            offs_n, offs_d, d_mask, qk_scale, DOT_PREC, FP8, NOPE, BLOCK_N, BLOCK_D)

    if SPLIT:
        # fp32 partials: part_acc [BT, S, H, D], part_ml [BT, S, H, 2]; the combine kernel adds the sink
        n_split = tl.num_programs(2)
        row = (pid_bt.to(tl.int64) * n_split + pid_s) * H
        pa = part_acc_ptr + (row + offs_h)[:, None] * D + offs_d[None, :]
        tl.store(pa, acc, mask=h_mask[:, None] & d_mask[None, :])
        tl.store(part_ml_ptr + (row + offs_h) * 2, m_i, mask=h_mask)
        tl.store(part_ml_ptr + (row + offs_h) * 2 + 1, l_i, mask=h_mask)
    else:
        sink = tl.load(sink_ptr + offs_h, mask=h_mask, other=0.0) * sink_scale
        z = l_i + tl.exp2(sink - m_i)
        out = tl.where(l_i[:, None] > 0, acc / z[:, None], 0.0)
        o_ptrs = o_ptr + b * s_ob + t * s_ot + offs_h[:, None] * s_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=h_mask[:, None] & d_mask[None, :])


@triton.jit
def _combine_kernel(part_acc_ptr, part_ml_ptr, sink_ptr, o_ptr, T, H, D, n_split, sink_scale,
                    s_ob, s_ot, s_oh, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Merge the S fp32 partials of one query and BLOCK_H heads, add the sink, write the output."""
    sink_scale = tl.cast(sink_scale, tl.float32)  # fp64 when launched by AOTInductor
    pid_bt = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_mask = offs_h < H
    mask = h_mask[:, None] & (offs_d < D)[None, :]
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    for s in range(0, n_split):
        row = (pid_bt.to(tl.int64) * n_split + s) * H + offs_h
        m_s = tl.load(part_ml_ptr + row * 2, mask=h_mask, other=float("-inf"))
        l_s = tl.load(part_ml_ptr + row * 2 + 1, mask=h_mask, other=0.0)
        a_s = tl.load(part_acc_ptr + row[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
        m_new = tl.maximum(m_i, m_s)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        beta = tl.exp2(m_s - m_use)
        acc = acc * alpha[:, None] + a_s * beta[:, None]
        l_i = l_i * alpha + l_s * beta
        m_i = m_new
    sink = tl.load(sink_ptr + offs_h, mask=h_mask, other=0.0) * sink_scale
    z = l_i + tl.exp2(sink - m_i)
    out = tl.where(l_i[:, None] > 0, acc / z[:, None], 0.0)
    b = (pid_bt // T).to(tl.int64)
    t = (pid_bt % T).to(tl.int64)
    o_ptrs = o_ptr + b * s_ob + t * s_ot + offs_h[:, None] * s_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=mask)


def _pow2(n: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the CPU interpreter: a few splits so that tests exercise the combine path


def pick_config(head_dim: int, device: torch.device, fp8: bool = False) -> AttnConfig:
    """Config by head width, KV format and device (the GPU sweep in bench/kernels.py checks this choice)."""
    if device.type != "cuda":
        return CONFIG_INTERPRETER
    return CONFIGS_FP8[0] if fp8 else CONFIGS_BF16[0]


def pick_splits(n_queries: int, n_blocks: int, n_head_blocks: int, device: torch.device) -> int:
    """Split the entry list only when the queries alone leave SMs idle (decode at small batch).

    From the H200 sweep: one split per query at batch >= 128, two at 64, one 64-entry block per split for a
    CSA query at batch 1-8 (10 blocks), ~5 blocks per split for an HCA query at 1M context (130 blocks).
    """
    if not isinstance(n_queries, int):  # symbolic batch under torch.export: do not guard on it
        return 1
    free = _num_sms(device) // max(1, n_queries * n_head_blocks)
    return max(1, min(free, n_blocks, MAX_SPLITS))


def _check_common(q, idx, idx2, sink) -> None:
    if q.dim() != 4:
        raise ValueError(f"sparse_attention: q must be [B, T, H, D], got shape {tuple(q.shape)}")
    B, T, H, D = q.shape
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"sparse_attention: q dtype must be bfloat16/float16/float32, got {q.dtype}")
    for name, t in (("idx", idx), ("idx2", idx2)):
        if t.dim() != 3 or t.shape[0] != B or t.shape[1] != T:
            raise ValueError(f"sparse_attention: {name} must be [B={B}, T={T}, k], got {tuple(t.shape)}")
        if t.dtype != torch.int32:
            raise ValueError(f"sparse_attention: {name} must be int32, got {t.dtype}")
    if sink.dim() != 1 or sink.dtype != torch.float32 or sink.shape[0] != H:
        raise ValueError(f"sparse_attention: sink must be float32 [H={H}], got {sink.dtype} {tuple(sink.shape)}")
    if D > 1024:
        raise ValueError(f"sparse_attention: head dim D <= 1024 required, got {D}")


def _check_unit_stride(tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    for name, t in tensors.items():
        if t.device != device:
            raise ValueError(f"sparse_attention: {name} is on {t.device}, q on {device}")
        if t.numel() > 0 and t.stride(-1) != 1:
            raise ValueError(f"sparse_attention: {name} must be contiguous in its last dim, strides {t.stride()}")


def _check_bf16_sources(q, kv, kv2) -> None:
    B, _, _, D = q.shape
    for name, t in (("kv", kv), ("kv2", kv2)):
        if t.dim() != 3 or t.shape[0] != B or t.shape[2] != D:
            raise ValueError(f"sparse_attention: {name} must be [B={B}, rows, D={D}], got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"sparse_attention: {name} dtype {t.dtype} != q dtype {q.dtype}")


def _check_fp8_sources(q, kv, sc, kv2, sc2, nope: int) -> None:
    B, _, _, D = q.shape
    if q.dtype != torch.bfloat16:
        raise ValueError(f"sparse_attention_fp8: q must be bfloat16 (the RoPE part is stored bf16), got {q.dtype}")
    if nope % 64 != 0 or D - nope != 64:
        raise ValueError(f"sparse_attention_fp8: needs D = nope + 64 with nope % 64 == 0, got D={D} nope={nope}")
    for name, d, s_ in (("kv", kv, sc), ("kv2", kv2, sc2)):
        if d.dtype != torch.uint8 or d.dim() != 3 or d.shape[0] != B or d.shape[2] != nope + 128:
            raise ValueError(f"sparse_attention_fp8: {name} data must be uint8 [B={B}, rows, {nope + 128}], "
                             f"got {d.dtype} {tuple(d.shape)}")
        if s_.dtype != torch.uint8 or s_.dim() != 3 or s_.shape[:2] != d.shape[:2] or s_.shape[2] < nope // 64:
            raise ValueError(f"sparse_attention_fp8: {name} scales must be uint8 [B, rows, >= {nope // 64}] "
                             f"matching the data rows, got {s_.dtype} {tuple(s_.shape)}")
        if d.numel() > 0 and d.stride(1) % 2 != 0:
            raise ValueError(f"sparse_attention_fp8: {name} data row stride must be even (bf16 RoPE), got {d.stride(1)}")


def _no_source(kv: torch.Tensor, sc: torch.Tensor) -> tuple:
    """(kv, scales, idx, K, N) of an absent KV source: one-row dummies the kernel never reads (K = N = 0)."""
    dev = kv.device
    return (unused_arg(dev, kv.dtype).view(1, 1, 1), unused_arg(dev, sc.dtype).view(1, 1, 1),
            unused_arg(dev, torch.int32).view(1, 1, 1), 0, 0)


def _launch(q, kv, sc, idx, kv2, sc2, idx2, sink, scale, fp8: bool, nope: int, config: AttnConfig | None,
            num_splits: int | None, out: torch.Tensor | None) -> torch.Tensor:
    B, T, H, D = q.shape
    N, N2, K, K2 = kv.shape[1], kv2.shape[1], idx.shape[2], idx2.shape[2]
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"sparse_attention: out must be {q.dtype} {tuple(q.shape)} with unit last stride")
    if q.numel() == 0:
        return out
    # Pointers a launch does not dereference are distinct dummies of the right rank, never another argument
    # (launch._check_distinct): the bf16 path's scale rows, a missing second source, unsplit partials.
    if not fp8:
        sc, sc2 = unused_arg(q.device, torch.uint8).view(1, 1, 1), unused_arg(q.device, torch.uint8).view(1, 1, 1)
    if kv2.numel() == 0 or idx2.numel() == 0:  # no second source: never dereferenced (K2 = 0 or all masked)
        kv2, sc2, idx2, K2, N2 = _no_source(kv, sc)
    if kv.numel() == 0 or idx.numel() == 0:
        kv, sc, idx, K, N = _no_source(kv2, sc2)
    # a caller's one tensor as both sources (read-only): a second view object of it, no copy
    kv2, sc2, idx2 = (b.view(b.shape) if b is a else b for a, b in ((kv, kv2), (sc, sc2), (idx, idx2)))
    cfg = config or pick_config(D, q.device, fp8)
    block_h = min(64, _pow2(H, 16))
    block_d = _pow2(D, 16)
    n_hb = triton.cdiv(H, block_h)
    n_blocks = triton.cdiv(K, cfg.block_n) + triton.cdiv(K2, cfg.block_n)
    splits = num_splits if num_splits is not None else pick_splits(B * T, n_blocks, n_hb, q.device)
    splits = max(1, min(int(splits), max(1, n_blocks)))
    per_split = triton.cdiv(max(1, n_blocks), splits)
    splits = triton.cdiv(max(1, n_blocks), per_split)
    dot_prec = "ieee"  # fp32 inputs: exact products (tf32 would break fp32 parity); 16-bit inputs: ignored
    if splits > 1:
        part_acc = torch.empty((B * T, splits, H, D), device=q.device, dtype=torch.float32)
        part_ml = torch.empty((B * T, splits, H, 2), device=q.device, dtype=torch.float32)
    else:  # unused by the kernel when SPLIT is False
        part_acc, part_ml = unused_arg(q.device, torch.float32), unused_arg(q.device, torch.float32)
    launcher(_sparse_attn_kernel, q)[(B * T, n_hb, splits)](
        q, kv, sc, idx, kv2, sc2, idx2, sink, out, part_acc, part_ml,
        T, H, D, N, N2, K, K2, per_split, float(scale) * LOG2E, LOG2E,
        q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), sc.stride(0), sc.stride(1),
        idx.stride(0), idx.stride(1), kv2.stride(0), kv2.stride(1), sc2.stride(0), sc2.stride(1),
        idx2.stride(0), idx2.stride(1), out.stride(0), out.stride(1), out.stride(2),
        BLOCK_H=block_h, BLOCK_N=cfg.block_n, BLOCK_D=block_d, SPLIT=splits > 1, DOT_PREC=dot_prec,
        FP8=fp8, NOPE=nope, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if splits > 1:
        ch = min(block_h, 16)
        launcher(_combine_kernel, q)[(B * T, triton.cdiv(H, ch))](
            part_acc, part_ml, sink, out, T, H, D, splits, LOG2E, out.stride(0), out.stride(1), out.stride(2),
            BLOCK_H=ch, BLOCK_D=block_d, num_warps=4)
    return out


def sparse_attention_launch(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, kv2: torch.Tensor,
                            idx2: torch.Tensor, sink: torch.Tensor, scale: float, *,
                            config: AttnConfig | None = None, num_splits: int | None = None,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """BF16/FP16/FP32 KV rows. `config`, `num_splits`, `out` (e.g. NaN-poisoned) are for tests and benches."""
    _check_common(q, idx, idx2, sink)
    _check_bf16_sources(q, kv, kv2)
    _check_unit_stride(dict(q=q, kv=kv, idx=idx, kv2=kv2, idx2=idx2, sink=sink), q.device)
    return _launch(q, kv, kv, idx, kv2, kv2, idx2, sink, scale, False, 0, config, num_splits, out)


def sparse_attention_fp8_launch(q: torch.Tensor, kv: torch.Tensor, kv_scale: torch.Tensor, idx: torch.Tensor,
                                kv2: torch.Tensor, kv2_scale: torch.Tensor, idx2: torch.Tensor,
                                sink: torch.Tensor, scale: float, *, config: AttnConfig | None = None,
                                num_splits: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """KV in the production FP8 layout (quant/kv_layout.py `pack_kv_cache`): data uint8 [B, N, nope + 128]
    (e4m3 nope, bf16 RoPE) and UE8M0 scale bytes uint8 [B, N, 8]; same math as the BF16 path on the decoded rows."""
    _check_common(q, idx, idx2, sink)
    nope = q.shape[-1] - 64
    _check_fp8_sources(q, kv, kv_scale, kv2, kv2_scale, nope)
    _check_unit_stride(dict(q=q, kv=kv, kv_scale=kv_scale, idx=idx, kv2=kv2, kv2_scale=kv2_scale, idx2=idx2,
                            sink=sink), q.device)
    return _launch(q, kv, kv_scale, idx, kv2, kv2_scale, idx2, sink, scale, True, nope, config, num_splits, out)


@torch.library.triton_op("v4triton::sparse_attention", mutates_args=())
def sparse_attention(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, kv2: torch.Tensor,
                     idx2: torch.Tensor, sink: torch.Tensor, scale: float) -> torch.Tensor:
    """o[B,T,H,D] = softmax over kv[idx] and kv2[idx2] (one softmax, -1 skipped) plus the sink; V4-SPEC 3.4."""
    return sparse_attention_launch(q, kv, idx, kv2, idx2, sink, scale)


@torch.library.triton_op("v4triton::sparse_attention_fp8", mutates_args=())
def sparse_attention_fp8(q: torch.Tensor, kv: torch.Tensor, kv_scale: torch.Tensor, idx: torch.Tensor,
                         kv2: torch.Tensor, kv2_scale: torch.Tensor, idx2: torch.Tensor, sink: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """As v4triton::sparse_attention with both KV sources in the FP8 production layout (V4-SPEC 6.2)."""
    return sparse_attention_fp8_launch(q, kv, kv_scale, idx, kv2, kv2_scale, idx2, sink, scale)


def supports_sparse_attention(q, kv, idx, kv2, idx2, sink, scale) -> bool:
    """Capability of the GPU kernel: CUDA, 16-bit activations, D <= 1024, int32 indices, fp32 sink."""
    return (q.device.type == "cuda" and q.dim() == 4 and q.dtype in (torch.bfloat16, torch.float16)
            and kv.dtype == q.dtype and kv2.dtype == q.dtype and q.shape[-1] <= 1024
            and idx.dtype == torch.int32 and idx2.dtype == torch.int32 and sink.dtype == torch.float32)


def supports_sparse_attention_fp8(q, kv, kv_scale, idx, kv2, kv2_scale, idx2, sink, scale) -> bool:
    """Capability of the FP8-layout kernel (v4::sparse_attention_fp8): CUDA, bf16 q, 64 RoPE dims (rows of
    D - 64 e4m3 + 128 bf16 bytes, as at V4; the tiny presets' 32 RoPE dims fall back to the reference body),
    the launcher's shape / dtype checks."""
    if getattr(getattr(q, "device", None), "type", None) != "cuda":
        return False
    try:
        _check_common(q, idx, idx2, sink)
        _check_fp8_sources(q, kv, kv_scale, kv2, kv2_scale, q.shape[-1] - 64)
    except (ValueError, TypeError, AttributeError):
        return False
    return True


register_kernel("v4::sparse_attention", ("h100", "h200"), supports=supports_sparse_attention, priority=10,
                name="v4triton::sparse_attention")(torch.ops.v4triton.sparse_attention.default)
register_kernel("v4::sparse_attention_fp8", ("h100", "h200"), supports=supports_sparse_attention_fp8, priority=10,
                name="v4triton::sparse_attention_fp8")(torch.ops.v4triton.sparse_attention_fp8.default)

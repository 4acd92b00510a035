"""Fused MoE router (V4-SPEC section 8.1) as `v4triton::moe_route`.

Legend: N tokens, d hidden, E routed experts, k experts per token (top-k), BM tokens per program,
BE = next power of two >= E (all experts' logits of a token live in one program), BK reduction step,
S splits of the hidden dim (decode: few tokens, so the 2 MB gate weight is streamed by S programs; a
second kernel, one token per program, adds the S partials as one [S, BE] tile in a fixed order).

One program owns BM tokens and every expert: logits = x @ gate^T with fp32 accumulation (bf16 x bf16
products are exact in fp32; fp32 inputs use an IEEE fp32 dot), then in registers: s = sqrt(softplus(logits)),
selection on s + bias (top-k by repeated argmax, ties to the lower expert id) or the token's row of
tid2eid (hash layers), weights = s[chosen] / sum * route_scale. With S > 1 the programs write fp32
partial logits and the second kernel runs the same epilogue on their (deterministic) sum.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from v4compile.plugins.triton.launch import launcher, unused_arg


@dataclass(frozen=True)
class RouteConfig:
    """Launch parameters of the router kernel, and the widest expert tile (BE) and dot kind it serves."""

    max_experts: int  # largest BE (next power of two of E) this config is meant for
    fp32_dot: bool  # IEEE fp32 dot (fp32 activations) instead of the bf16 tensor-core dot
    block_m: int  # tokens per program
    block_k: int  # hidden channels per step
    num_warps: int
    num_stages: int


# Candidates, first match wins (sm_90 compile: <= 150 registers, no spills for the [BM, BE] fp32 tile).
ROUTE_CONFIGS: list[RouteConfig] = [
    RouteConfig(256, False, 32, 64, 8, 3),  # V4-Flash: 256 experts, bf16
    RouteConfig(512, False, 16, 32, 8, 3),  # V4-Pro: 384 experts, bf16
    RouteConfig(512, True, 16, 16, 8, 2),  # fp32 activations (exact-test mode): FMA dot, narrow K steps
]


@triton.jit
def _sqrt_softplus(z):
    """sqrt(softplus(z)) in fp32; softplus = max(z, 0) + log1p(exp(-|z|)) (log1p by series for tiny args)."""
    t = tl.exp(-tl.abs(z))
    l1p = tl.where(t < 1e-4, t * (1.0 - 0.5 * t), tl.log(1.0 + t))
    return tl.sqrt(tl.maximum(z, 0.0) + l1p)


@triton.jit
def _route_epilogue(logits, rows, N, E, bias_ptr, tid_ptr, tok_ptr, w_ptr, id_ptr, stride_tid, route_scale,
                    BE: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr,
                    HASH: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Scores, selection, renormalisation and the stores of one [BM, BE] tile of logits."""
    cols = tl.arange(0, BE)
    kcols = tl.arange(0, KP)
    row_ok = rows < N
    s = _sqrt_softplus(logits)
    w_tile = tl.zeros([logits.shape[0], KP], dtype=tl.float32)
    if HASH:
        tok = tl.load(tok_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        id_tile = tl.load(tid_ptr + tok[:, None] * stride_tid + kcols[None, :],
                          mask=row_ok[:, None] & (kcols[None, :] < TOPK), other=0).to(tl.int32)
        for j in tl.static_range(TOPK):
            id_j = tl.sum(tl.where(kcols[None, :] == j, id_tile, 0), axis=1)
            v = tl.sum(tl.where(cols[None, :] == id_j[:, None], s, 0.0), axis=1)
            w_tile = tl.where(kcols[None, :] == j, v[:, None], w_tile)
    else:
        sel = s
        if HAS_BIAS:
            sel = sel + tl.load(bias_ptr + cols, mask=cols < E, other=0.0)[None, :]
        sel = tl.where(cols[None, :] < E, sel, float("-inf"))
        id_tile = tl.zeros([logits.shape[0], KP], dtype=tl.int32)
        for j in tl.static_range(TOPK):
            id_j = tl.argmax(sel, axis=1, tie_break_left=True).to(tl.int32)
            hit = cols[None, :] == id_j[:, None]
            v = tl.sum(tl.where(hit, s, 0.0), axis=1)
            sel = tl.where(hit, float("-inf"), sel)
            w_tile = tl.where(kcols[None, :] == j, v[:, None], w_tile)
            id_tile = tl.where(kcols[None, :] == j, id_j[:, None], id_tile)
    w_tile = w_tile / tl.sum(w_tile, axis=1)[:, None] * route_scale
    out_mask = row_ok[:, None] & (kcols[None, :] < TOPK)
    out_off = rows.to(tl.int64)[:, None] * TOPK + kcols[None, :]
    tl.store(w_ptr + out_off, w_tile, mask=out_mask)
    tl.store(id_ptr + out_off, id_tile, mask=out_mask)


@triton.jit
def _router_kernel(x_ptr, g_ptr, bias_ptr, tid_ptr, tok_ptr, part_ptr, w_ptr, id_ptr,
                   N, E, D, k_per_split, route_scale, stride_xn, stride_ge, stride_tid,
                   BM: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr,
                   SPLIT: tl.constexpr, HASH: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr):
    """Logits of BM tokens x all experts over one slice of the hidden dim; epilogue when unsplit."""
    route_scale = tl.cast(route_scale, tl.float32)  # float arguments arrive as fp64 when AOTInductor launches the kernel
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = tl.arange(0, BE)
    rk = tl.arange(0, BK)
    row_ok = rows < N
    col_ok = cols < E
    x_base = x_ptr + rows.to(tl.int64)[:, None] * stride_xn
    g_base = g_ptr + cols.to(tl.int64)[:, None] * stride_ge
    acc = tl.zeros([BM, BE], dtype=tl.float32)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, D)
    for k0 in range(k_lo, k_hi, BK):
        kk = k0 + rk
        k_ok = kk < k_hi
        a = tl.load(x_base + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(g_base + kk[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if FP32_DOT:
            acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    if SPLIT == 1:
        _route_epilogue(acc, rows, N, E, bias_ptr, tid_ptr, tok_ptr, w_ptr, id_ptr, stride_tid, route_scale,
                        BE, TOPK, KP, HASH, HAS_BIAS)
    else:
        p_off = (pid_k * N + rows).to(tl.int64)[:, None] * BE + cols[None, :]
        tl.store(part_ptr + p_off, acc, mask=row_ok[:, None])


@triton.jit
def _router_reduce_kernel(part_ptr, bias_ptr, tid_ptr, tok_ptr, w_ptr, id_ptr, N, E, route_scale, stride_tid,
                          BE: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr, SPLIT: tl.constexpr,
                          SPLIT_P: tl.constexpr, HASH: tl.constexpr, HAS_BIAS: tl.constexpr):
    """One token per program: all split partials as one [S, BE] tile, summed (fixed tree order), then the epilogue."""
    route_scale = tl.cast(route_scale, tl.float32)  # fp64 when launched by AOTInductor
    row = tl.program_id(0)
    sp = tl.arange(0, SPLIT_P)
    cols = tl.arange(0, BE)
    off = (sp[:, None] * N + row).to(tl.int64) * BE + cols[None, :]
    parts = tl.load(part_ptr + off, mask=(sp < SPLIT)[:, None], other=0.0)
    logits = tl.sum(parts, axis=0)[None, :]
    _route_epilogue(logits, row + tl.arange(0, 1), N, E, bias_ptr, tid_ptr, tok_ptr, w_ptr, id_ptr, stride_tid,
                    route_scale, BE, TOPK, KP, HASH, HAS_BIAS)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # CPU interpreter: a few splits so the split path is exercised at small shapes


def pick_route_config(n_experts: int, fp32_dot: bool) -> RouteConfig:
    """The first candidate for this dot kind whose tile is wide enough for every expert."""
    be = triton.next_power_of_2(n_experts)
    for cfg in ROUTE_CONFIGS:
        if cfg.fp32_dot == fp32_dot and be <= cfg.max_experts:
            return cfg
    raise ValueError(f"moe_route: {n_experts} experts need a [BM, {be}] logits tile; at most 512 experts supported")


def pick_split(n_tokens: int, dim: int, cfg: RouteConfig, device: torch.device) -> int:
    """Hidden-dim splits so that about 2 programs per SM stream the gate weight; none once the token blocks
    alone give half an SM's worth (H200: at 4096 tokens the split costs 11 us more than it saves)."""
    if not isinstance(n_tokens, int):  # symbolic under torch.export: no branch on it
        return 1
    n_m = triton.cdiv(n_tokens, cfg.block_m)
    if 2 * n_m >= _num_sms(device):
        return 1
    steps = triton.cdiv(dim, cfg.block_k)
    return max(1, min(steps, (2 * _num_sms(device)) // n_m, 64))


def _check(x, gate_w, bias, tid2eid, token_ids, topk, use_hash) -> None:
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"moe_route: x must be [N, d] with unit stride in d, got shape {list(x.shape)} "
                         f"strides {list(x.stride())}")
    if x.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"moe_route: x dtype must be bfloat16 or float32, got {x.dtype}")
    if gate_w.dim() != 2 or gate_w.shape[1] != x.shape[1] or gate_w.stride(-1) != 1:
        raise ValueError(f"moe_route: gate weight must be [E, {x.shape[1]}] with unit stride, got "
                         f"{list(gate_w.shape)} strides {list(gate_w.stride())}")
    if gate_w.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"moe_route: gate weight dtype must be bfloat16 or float32, got {gate_w.dtype}")
    E = gate_w.shape[0]
    if not 1 <= topk <= E:
        raise ValueError(f"moe_route: topk must be in [1, {E}], got {topk}")
    if bias.numel() and (bias.shape != (E,) or bias.dtype != torch.float32 or not bias.is_contiguous()):
        raise ValueError(f"moe_route: bias must be contiguous float32 [{E}] or empty, got {bias.dtype} "
                         f"{list(bias.shape)}")
    if use_hash:
        if tid2eid.dim() != 2 or tid2eid.shape[1] != topk or tid2eid.stride(-1) != 1:
            raise ValueError(f"moe_route: tid2eid must be [vocab, {topk}] with unit stride, got "
                             f"{list(tid2eid.shape)}")
        if tid2eid.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"moe_route: tid2eid must be int32 or int64, got {tid2eid.dtype}")
        if token_ids.shape != (x.shape[0],) or token_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"moe_route: token_ids must be int [{x.shape[0]}], got {token_ids.dtype} "
                             f"{list(token_ids.shape)}")


def moe_route_launch(x: torch.Tensor, gate_w: torch.Tensor, bias: torch.Tensor, tid2eid: torch.Tensor,
                     token_ids: torch.Tensor, topk: int, route_scale: float, use_hash: bool,
                     ids_dtype: torch.dtype = torch.int64, split: int | None = None, poison: bool = False,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate, allocate (weights fp32 [N, k], ids [N, k]) and launch; `split` overrides the hidden-dim split;
    `poison` fills the outputs with NaN / -1 first (tests: an unwritten element shows)."""
    _check(x, gate_w, bias, tid2eid, token_ids, topk, use_hash)
    N, D = x.shape
    E = gate_w.shape[0]
    if poison:
        weights = torch.full((N, topk), float("nan"), dtype=torch.float32, device=x.device)
        ids = torch.full((N, topk), -1, dtype=ids_dtype, device=x.device)
    else:
        weights = torch.empty((N, topk), dtype=torch.float32, device=x.device)
        ids = torch.empty((N, topk), dtype=ids_dtype, device=x.device)
    if isinstance(N, int) and N == 0:
        return weights, ids
    # Triton 3.6's interpreter multiplies bf16 tiles as their raw uint16 bits (np.matmul on the storage), so
    # under TRITON_INTERPRET the bf16 operands are upcast first: same products (bf16 x bf16 is exact in fp32),
    # only the CPU path changes. Remove when the interpreter converts bf16 in create_dot.
    fp32_dot = (x.dtype == torch.float32 or gate_w.dtype == torch.float32
                or os.environ.get("TRITON_INTERPRET") == "1")
    cfg = pick_route_config(E, fp32_dot)
    be, kp = triton.next_power_of_2(E), triton.next_power_of_2(topk)
    n_split = split if split is not None else pick_split(N, D, cfg, x.device)
    k_per_split = triton.cdiv(triton.cdiv(D, cfg.block_k), n_split) * cfg.block_k
    n_split = triton.cdiv(D, k_per_split)
    has_bias = bias.numel() > 0 and not use_hash
    # pointers the constexpr flags leave unused get their own dummies, never an output (launch._check_distinct)
    tid = tid2eid if use_hash else unused_arg(x.device, torch.int64)
    tok = token_ids if use_hash else unused_arg(x.device, torch.int64)
    bias_arg = bias if has_bias else unused_arg(x.device, torch.float32)
    stride_tid = tid2eid.stride(0) if use_hash else 0
    part = torch.empty((n_split, N, be) if n_split > 1 else (1,), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(N, cfg.block_m), n_split)
    launcher(_router_kernel)[grid](
        x, gate_w, bias_arg, tid, tok, part, weights, ids,
        N, E, D, k_per_split, float(route_scale), x.stride(0), gate_w.stride(0), stride_tid,
        BM=cfg.block_m, BE=be, BK=cfg.block_k, TOPK=topk, KP=kp, SPLIT=n_split, HASH=use_hash,
        HAS_BIAS=has_bias, FP32_DOT=fp32_dot, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if n_split > 1:
        launcher(_router_reduce_kernel)[(N,)](
            part, bias_arg, tid, tok, weights, ids, N, E, float(route_scale), stride_tid,
            BE=be, TOPK=topk, KP=kp, SPLIT=n_split, SPLIT_P=triton.next_power_of_2(n_split), HASH=use_hash,
            HAS_BIAS=has_bias, num_warps=4)
    return weights, ids


@torch.library.triton_op("v4triton::moe_route", mutates_args=())
def moe_route(x: torch.Tensor, gate_w: torch.Tensor, bias: torch.Tensor, tid2eid: torch.Tensor,
              token_ids: torch.Tensor, topk: int, route_scale: float, hash: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as v4::moe_route: (weights f32 [N, k], ids int64 [N, k]); V4-SPEC section 8.1."""
    return moe_route_launch(x, gate_w, bias, tid2eid, token_ids, topk, route_scale, hash)


def supports_moe_route(x, gate_w, bias, tid2eid, token_ids, topk, route_scale, hash) -> bool:
    """Capability check: bf16/fp32 activations and gate, at most 512 experts, unit-stride rows."""
    return (x.dim() == 2 and x.dtype in (torch.bfloat16, torch.float32)
            and gate_w.dtype in (torch.bfloat16, torch.float32) and gate_w.dim() == 2
            and gate_w.shape[0] <= 512 and 1 <= topk <= gate_w.shape[0] and x.stride(-1) == 1)


def _register() -> None:
    from v4compile.plugins.registry import register_kernel

    register_kernel("v4::moe_route", ("h100", "h200"), supports=supports_moe_route, priority=10,
                    name="v4triton::moe_route")(torch.ops.v4triton.moe_route)


_register()

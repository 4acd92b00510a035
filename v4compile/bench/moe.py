"""MoE benchmark at V4-Flash shapes: the fused FP8 experts and router vs torch's grouped GEMMs, in one run.

Shapes: 256 routed experts + 1 shared (stacked as expert 256), top-6, d = 4096, I = 2048, FP8 e4m3 weights
with 128x128 UE8M0 scales. Routing is realistic: x ~ N(0, 1), random gate (logits ~ N(0, 1)) plus a mild
bias, scored by sqrt(softplus) and top-6, so expert loads are uneven (min/max load are recorded).
Every time is a CUDA-graph replay (triton.testing.do_bench_cudagraph, median), as an engine runs the op,
except the eager reference (data-dependent shapes: CUDA events).
Rows per token count N:
- triton: v4triton::moe_experts_fp8 (routed + shared in one call), checked against v4::moe_experts;
- eager: the reference op (the model's v4::moe_experts body, routed + shared stacked);
- sgmm_fp8/gemms and /pipeline: torch._scaled_grouped_mm (FP8, rowwise scales, the only scaling it has on
  sm_90) on the same routed layout: the two GEMM calls alone, and with the eager glue (gather, quantise,
  SwiGLU, combine) that makes it a full MoE;
- gmm_bf16/gemms and /pipeline: torch._grouped_mm with BF16 copies of the weights, same layout;
- route: v4triton::moe_route vs the eager reference (ids must match exactly).
FLOPs = 2 * routes * 3 * d * I; bytes = distinct experts touched * bytes per expert (+ activations);
floor = max(bytes / copy bandwidth, FLOPs / FP8 matmul rate), both measured in the same run.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from v4compile.bench.common import Ceilings, Row, floor_us, measure_ceilings, print_table, time_us, write_json
from v4compile.validate import calc_diff

E, K, D, I, ROUTE_SCALE, LIMIT = 256, 6, 4096, 2048, 1.5, 10.0
TOKENS = (1, 8, 64, 512, 4096, 16384)
DEVICE = "cuda"  # benchmarks run on the GPU; a CPU dry run of the harness (interpreter) points this elsewhere


@dataclass
class Setup:
    """Device tensors shared by every token count."""

    w13: torch.Tensor  # [E+1, 2I, d] e4m3 (W1 rows, then W3 rows), shared expert last
    s13: torch.Tensor  # [E+1, 2I/128, d/128] e8m0
    w2: torch.Tensor  # [E+1, d, I] e4m3
    s2: torch.Tensor  # [E+1, d/128, I/128] e8m0
    gate: torch.Tensor  # [E, d] bf16
    bias: torch.Tensor  # [E] f32
    w13_bf16: torch.Tensor | None = None  # dequantised copies for torch._grouped_mm
    w2_bf16: torch.Tensor | None = None


def _rand_fp8(shape: tuple[int, ...], device: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random e4m3 experts with e8m0 128x128 scales: weights ~ N(0, 1/K) after scaling, built expert by expert.
    Scales vary by 128-row block (and expert) but not along K, so that torch._scaled_grouped_mm's rowwise
    weight scales represent the same weights exactly and its result is comparable (the kernels still read
    one scale per 128x128 block)."""
    n, O, Kd = shape
    q = torch.empty(shape, dtype=torch.float8_e4m3fn, device=device)
    for e in range(n):
        q[e] = (torch.randn(O, Kd, device=device, generator=gen) * 32).clamp(-448, 448).to(torch.float8_e4m3fn)
    # 32 * 2^(b-127) ~ 1/sqrt(K): b = 127 - 5 - log2(sqrt(K)), jittered by one binade
    base = 122 - int(round(0.5 * torch.log2(torch.tensor(float(Kd))).item()))
    b = base + torch.randint(-1, 2, (n, O // 128, 1), device=device, generator=gen)
    return q, b.expand(n, O // 128, Kd // 128).to(torch.uint8).contiguous().view(torch.float8_e8m0fnu)


def make_setup(device: str | None = None, seed: int = 0, bf16_copies: bool = True) -> Setup:
    device = device or DEVICE
    g = torch.Generator(device=device).manual_seed(seed)
    w13, s13 = _rand_fp8((E + 1, 2 * I, D), device, g)
    w2, s2 = _rand_fp8((E + 1, D, I), device, g)
    gate = (torch.randn(E, D, device=device, generator=g) / D**0.5).to(torch.bfloat16)  # logits ~ N(0, 1)
    bias = 0.05 * torch.randn(E, device=device, generator=g)  # mild: at 4096 tokens loads span ~0.25x..2.2x mean
    setup = Setup(w13, s13, w2, s2, gate, bias)
    if bf16_copies:
        from v4compile.quant.formats import dequant_fp8_block

        setup.w13_bf16 = torch.empty(w13.shape, dtype=torch.bfloat16, device=device)
        setup.w2_bf16 = torch.empty(w2.shape, dtype=torch.bfloat16, device=device)
        for e in range(E + 1):
            setup.w13_bf16[e] = dequant_fp8_block(w13[e], s13[e]).to(torch.bfloat16)
            setup.w2_bf16[e] = dequant_fp8_block(w2[e], s2[e]).to(torch.bfloat16)
    return setup


def with_shared(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Append the shared expert (index E, weight 1) to every token's picks: the layout of the reference."""
    n = ids.shape[0]
    return (torch.cat([weights, weights.new_ones(n, 1)], 1),
            torch.cat([ids, torch.full((n, 1), E, dtype=ids.dtype, device=ids.device)], 1))


def moe_flops(n_tokens: int, kt: int = K + 1) -> float:
    return 2.0 * n_tokens * kt * 3 * D * I


def touched_bytes(ids_full: torch.Tensor, n_tokens: int) -> float:
    """Distinct experts' weights + scales, x read (bf16) and y written (f32)."""
    per_expert = 3 * D * I + 3 * (D // 128) * (I // 128)
    return float(torch.unique(ids_full).numel() * per_expert + n_tokens * D * (2 + 4))


# ------------------------------------------------------------------------------ torch baselines


def torch_layout(ids_full: torch.Tensor, align: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Routes sorted by expert: (order, row of each sorted route, int32 group ends, total rows); groups padded
    to `align` rows (device ops only, no host sync)."""
    flat = ids_full.flatten()
    R, n_exp = flat.numel(), E + 1
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_exp)
    if align == 1:
        return order, torch.arange(R, device=flat.device), torch.cumsum(counts, 0).to(torch.int32), R
    padded = (counts + align - 1) // align * align
    starts = torch.cumsum(padded, 0) - padded
    sorted_e = flat[order]
    rank = torch.arange(R, device=flat.device) - (torch.cumsum(counts, 0) - counts)[sorted_e]
    return order, starts[sorted_e] + rank, torch.cumsum(padded, 0).to(torch.int32), R + n_exp * (align - 1)


def _quant_rowwise(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = a.float().abs().amax(-1).clamp(min=1e-4) / 448.0
    return (a.float() / s[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn), s


def _swiglu(gu: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    g, u = gu[:, :I].float().clamp(max=LIMIT), gu[:, I:].float().clamp(-LIMIT, LIMIT)
    return F.silu(g) * u * w[:, None]


class TorchMoe:
    """The same MoE through torch._scaled_grouped_mm (fp8=True) or torch._grouped_mm (bf16)."""

    def __init__(self, s: Setup, x: torch.Tensor, w_full: torch.Tensor, ids_full: torch.Tensor, fp8: bool,
                 align: int):
        self.fp8, self.x, self.kt = fp8, x, ids_full.shape[1]
        self.order, self.pos, self.offs, self.total = torch_layout(ids_full, align)
        self.tok = self.order // self.kt
        self.wr = w_full.flatten()[self.order]
        dev = x.device
        if fp8:
            from v4compile.quant.formats import e8m0_to_float

            self.b1, self.b2 = s.w13.transpose(1, 2), s.w2.transpose(1, 2)  # [G, K, N] column-major views
            # rowwise weight scales: exact here (the bench's block scales are constant along K)
            self.sb1 = e8m0_to_float(s.s13[:, :, 0]).repeat_interleave(128, dim=1).contiguous()
            self.sb2 = e8m0_to_float(s.s2[:, :, 0]).repeat_interleave(128, dim=1).contiguous()
        else:
            self.b1, self.b2 = s.w13_bf16.transpose(1, 2), s.w2_bf16.transpose(1, 2)
        self.fast_accum = False
        self._prepare_gemm_inputs()

    def _gmm(self, a, sa, b, sb):
        if self.fp8:
            return torch._scaled_grouped_mm(a, b, sa, sb, offs=self.offs, out_dtype=torch.bfloat16,
                                            use_fast_accum=self.fast_accum)
        return torch._grouped_mm(a, b, offs=self.offs)

    def _scatter(self, rows: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Rows of sorted routes -> the padded group layout (fp8 moved as bytes: index_put has no fp8 kernel)."""
        if rows.dtype == torch.float8_e4m3fn:
            out = torch.zeros((self.total, *rows.shape[1:]), dtype=torch.uint8, device=rows.device)
            out[self.pos] = rows.view(torch.uint8)
            return out.view(torch.float8_e4m3fn)
        out = rows.new_full((self.total, *rows.shape[1:]), fill)
        out[self.pos] = rows
        return out

    def _prepare_gemm_inputs(self) -> None:
        xa = self.x[self.tok]
        if self.fp8:
            a8, sa = _quant_rowwise(xa)
            self.a, self.sa = self._scatter(a8), self._scatter(sa, 1.0)
        else:
            self.a, self.sa = self._scatter(xa), None
        gu = self._gmm(self.a, self.sa, self.b1, getattr(self, "sb1", None))
        h = _swiglu(gu[self.pos], self.wr)
        if self.fp8:
            h8, sh = _quant_rowwise(h)
            self.h, self.sh = self._scatter(h8), self._scatter(sh, 1.0)
        else:
            self.h, self.sh = self._scatter(h.to(torch.bfloat16)), None

    def gemms(self) -> torch.Tensor:
        """Only the two grouped GEMMs, on prepared inputs."""
        self._gmm(self.a, self.sa, self.b1, getattr(self, "sb1", None))
        return self._gmm(self.h, self.sh, self.b2, getattr(self, "sb2", None))

    def pipeline(self) -> torch.Tensor:
        """Gather, quantise, GEMM1, SwiGLU, quantise, GEMM2, weighted combine: y f32 [N, d]."""
        xa = self.x[self.tok]
        if self.fp8:
            a8, sa = _quant_rowwise(xa)
            a, sa = self._scatter(a8), self._scatter(sa, 1.0)
        else:
            a, sa = self._scatter(xa), None
        gu = self._gmm(a, sa, self.b1, getattr(self, "sb1", None))
        h = _swiglu(gu[self.pos], self.wr)
        if self.fp8:
            h8, sh = _quant_rowwise(h)
            hh, sh = self._scatter(h8), self._scatter(sh, 1.0)
        else:
            hh, sh = self._scatter(h.to(torch.bfloat16)), None
        out = self._gmm(hh, sh, self.b2, getattr(self, "sb2", None))
        y = torch.zeros(self.x.shape[0], D, dtype=torch.float32, device=self.x.device)
        return y.index_add_(0, self.tok, out[self.pos].float())


def make_torch_moe(s: Setup, x, w_full, ids_full, fp8: bool) -> tuple[TorchMoe | None, str]:
    """Try the unpadded layout first, then groups padded to 16 / 128 rows (alignment rules differ by build)."""
    errors = []
    for align in (1, 16, 128):
        try:
            m = TorchMoe(s, x, w_full, ids_full, fp8, align)
            m.pipeline()
            if x.is_cuda:
                torch.cuda.synchronize()
            return m, f"align={align}"
        except (RuntimeError, ValueError, TypeError) as e:
            errors.append(f"align={align}: {str(e).splitlines()[0][:200]}")
    return None, "; ".join(errors)


# ------------------------------------------------------------------------------ the run


def _time(fn: Callable[[], Any], rep_ms: float = 100) -> float:
    """CUDA-graph replay time (launch overhead excluded, as in an engine); events when capture fails."""
    try:
        return time_us(fn, cudagraph=True, rep_ms=rep_ms)
    except Exception as e:  # noqa: BLE001 - some rivals cannot be captured; fall back to events
        print(f"[moe bench] cudagraph timing failed ({type(e).__name__}: {str(e)[:120]}); using events")
    return time_us(fn, rep_ms=rep_ms)


def _time_slow(fn: Callable[[], Any], iters: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def bench_route(s: Setup, x: torch.Tensor, n: int, ceil: Ceilings) -> tuple[list[Row], torch.Tensor, torch.Tensor]:
    """Router kernel vs the eager reference; returns rows and the kernel's (weights, ids)."""
    from v4compile.model.ops import BODIES
    from v4compile.plugins.triton.moe_route import moe_route_launch

    empty = torch.empty(0, K, dtype=torch.int64, device=x.device)
    tok = torch.zeros(n, dtype=torch.int64, device=x.device)
    w, ids = moe_route_launch(x, s.gate, s.bias, empty, tok, K, ROUTE_SCALE, False)
    wr, idr = BODIES["moe_route"](x, s.gate, s.bias, empty, tok, K, ROUTE_SCALE, False)
    same = (torch.sort(ids, 1).values == torch.sort(idr, 1).values).all(1)
    mism = int((~same).sum())
    gap = None
    if mism:  # measure how close the disagreeing picks were (near-ties between the two fp32 summation orders)
        sc = F.softplus(F.linear(x.float(), s.gate.float())).sqrt() + s.bias
        bad = (~same).nonzero()[:, 0]
        srt = sc[bad].sort(1, descending=True).values
        gap = float((srt[:, K - 1] - srt[:, K]).abs().max())
    flops, nbytes = 2.0 * n * E * D, float(E * D * 2 + n * D * 2 + n * K * 12)
    fl = floor_us(nbytes, flops, ceil)
    t_k = _time(lambda: moe_route_launch(x, s.gate, s.bias, empty, tok, K, ROUTE_SCALE, False))
    t_1 = _time(lambda: moe_route_launch(x, s.gate, s.bias, empty, tok, K, ROUTE_SCALE, False, split=1))
    t_e = _time(lambda: BODIES["moe_route"](x, s.gate, s.bias, empty, tok, K, ROUTE_SCALE, False))
    extra = dict(id_mismatch_tokens=mism, max_gap_of_mismatches=gap, weights_diff=calc_diff(w, wr))
    rows = [Row(f"route_t{n}", "triton", t_k, flops, nbytes, fl, check=float(mism), extra=extra),
            Row(f"route_t{n}", "triton/split1", t_1, flops, nbytes, fl),
            Row(f"route_t{n}", "eager", t_e, flops, nbytes, fl)]
    return rows, w, ids


def bench_experts(s: Setup, x, w, ids, n: int, ceil: Ceilings, sweep: bool) -> list[Row]:
    """The fused experts (routed + shared), the eager reference and torch's grouped GEMMs at one token count."""
    from v4compile.model.ops import BODIES
    from v4compile.plugins.triton import moe_gemm as mg

    w_full, ids_full = with_shared(w, ids)
    flops, nbytes = moe_flops(n), touched_bytes(ids_full, n)
    fl = floor_us(nbytes, flops, ceil, fp8=True)
    counts = torch.bincount(ids.flatten(), minlength=E)
    load = dict(min_load=int(counts.min()), max_load=int(counts.max()), experts_touched=int((counts > 0).sum()))
    I_ = I

    def ours(path="auto", configs=None):
        return mg.moe_experts_launch(x, w, ids, s.w13[:, :I_], s.w13[:, I_:], s.s13[:, :I_ // 128],
                                     s.s13[:, I_ // 128:], s.w2, s.s2, LIMIT, 1, path, configs)

    y = torch.ops.v4triton.moe_experts_fp8(x, w, ids, s.w13, s.s13, s.w2, s.s2, LIMIT, 1)
    w1, w3 = s.w13[:, :I], s.w13[:, I:]
    s1, s3 = s.s13[:, :I // 128], s.s13[:, I // 128:]
    ref = lambda: BODIES["moe_experts"](x, w_full, ids_full, w1, s1, w3, s3, s.w2, s.s2, LIMIT)  # noqa: E731
    yr = ref()
    check = calc_diff(y, yr)
    rows = [Row(f"moe_t{n}", "triton", _time(lambda: ours()), flops, nbytes, fl, check=check,
                extra=dict(path=mg.pick_path(n), **load))]
    rows.append(Row(f"moe_t{n}", "eager", _time_slow(ref, 2 if n >= 4096 else 3), flops, nbytes, fl))
    for path in ("route", "grouped"):
        if path != mg.pick_path(n) and n <= 64:
            rows.append(Row(f"moe_t{n}", f"triton/{path}", _time(lambda: ours(path)), flops, nbytes, fl,
                            check=calc_diff(ours(path), yr)))
    for fp8, name in ((True, "sgmm_fp8"), (False, "gmm_bf16")):
        if not fp8 and s.w13_bf16 is None:
            continue
        m, how = make_torch_moe(s, x, w_full, ids_full, fp8)
        if m is None:
            rows.append(Row(f"moe_t{n}", name, float("nan"), flops, nbytes, fl, extra=dict(error=how)))
            continue
        c = calc_diff(m.pipeline(), yr)
        rows.append(Row(f"moe_t{n}", f"{name}/gemms", _time(m.gemms), flops, nbytes, fl,
                        extra=dict(layout=how)))
        rows.append(Row(f"moe_t{n}", f"{name}/pipeline", _time(m.pipeline), flops, nbytes, fl, check=c))
        if fp8:
            m.fast_accum = True
            rows.append(Row(f"moe_t{n}", f"{name}/gemms/fast_accum", _time(m.gemms), flops, nbytes, fl))
        del m
    if sweep:
        rows += sweep_configs(ours, n, flops, nbytes, fl, yr)
    return rows


def sweep_configs(ours: Callable, n: int, flops: float, nbytes: float, fl: float,
                  yr: torch.Tensor) -> list[Row]:
    """Time every candidate config of the path this token count uses (one GEMM varied at a time)."""
    from v4compile.plugins.triton import moe_gemm as mg

    path = mg.pick_path(n)
    c1s, c2s = ((mg.ROUTE_GEMM1_CONFIGS, mg.ROUTE_GEMM2_CONFIGS) if path == "route"
                else (mg.GROUPED_GEMM1_CONFIGS, mg.GROUPED_GEMM2_CONFIGS))
    base1, base2 = mg.pick_configs(path, n, K + 1, E + 1, I, D)
    pairs = [(c1, base2 if path == "route" else _same_bm(base2, c1, c2s)) for c1 in c1s]
    pairs += [(base1 if path == "route" else _same_bm(base1, c2, c1s), c2) for c2 in c2s]
    rows, seen = [], set()
    for c1, c2 in pairs:
        if c1 is None or c2 is None or (c1, c2) in seen:
            continue
        seen.add((c1, c2))
        tag = f"cfg g1={c1.block_m}x{c1.block_n}w{c1.num_warps}s{c1.num_stages} " \
              f"g2={c2.block_m}x{c2.block_n}w{c2.num_warps}s{c2.num_stages}"
        try:
            chk = calc_diff(ours(path, (c1, c2)), yr)
            t = _time(lambda: ours(path, (c1, c2)), rep_ms=50)
        except Exception as e:  # noqa: BLE001 - a config that fails to compile or launch is reported, not fatal
            rows.append(Row(f"moe_t{n}", tag, float("nan"), flops, nbytes, fl, extra=dict(error=str(e)[:300])))
            continue
        rows.append(Row(f"moe_t{n}", tag, t, flops, nbytes, fl, check=chk))
    return rows


def _same_bm(base, other, candidates):
    """A config with the BM of `other` (grouped GEMM1 and GEMM2 share the padding BM)."""
    if base.block_m == other.block_m:
        return base
    return next((c for c in candidates if c.block_m == other.block_m), None)


def breakdown(s: Setup, x, w, ids, n: int, ceil: Ceilings, path: str | None = None) -> list[Row]:
    """Time each launch of our path separately (inputs prepared once), with per-part bytes and FLOPs."""
    from v4compile.plugins.triton import moe_gemm as mg

    path = path or mg.pick_path(n)
    w1, w3, s1, s3 = s.w13[:, :I], s.w13[:, I:], s.s13[:, :I // 128], s.s13[:, I // 128:]
    p = mg._check(x, w, ids, w1, w3, s1, s3, s.w2, s.s2, 1)
    c1, c2 = mg.pick_configs(path, n, p.kt, p.E, p.I, p.d)
    sa = [mg._scale_arg(t) for t in (s1, s3, s.s2)]
    R = n * p.kt
    n_exp = float(torch.unique(with_shared(w, ids)[1]).numel())
    gemm1_bytes, gemm2_bytes = n_exp * 2 * I * D, n_exp * D * I
    rows: list[Row] = []

    def add(part: str, fn: Callable[[], Any], nbytes: float, flops: float = 0.0, fp8: bool = True) -> None:
        rows.append(Row(f"moe_t{n}", f"part:{path}:{part}", _time(fn), flops, nbytes,
                        floor_us(nbytes, flops, ceil, fp8=fp8)))

    xq, xs = mg._quant_rows_fp8(x)
    add("quant_x", lambda: mg._quant_rows_fp8(x), n * D * 3.0)
    if path == "route":
        args1 = (p, R, R, xq, xs, w1, w3, sa[0], sa[1], w, ids, ids, ids, LIMIT, c1, True, 16, False)
        hq, hs = mg._gemm1(*args1)
        add("gemm1+quant_h", lambda: mg._gemm1(*args1), gemm1_bytes, 2.0 * R * 2 * I * D)
        o = torch.empty(R, D, dtype=x.dtype, device=x.device)
        add("gemm2", lambda: mg._gemm2(p, R, hq, hs, s.w2, sa[2], ids, ids, ids, o, c2, True, 16),
            gemm2_bytes, 2.0 * R * D * I)
        add("combine", lambda: mg._combine(p, o, ids, False), R * D * 2.0 + n * D * 4.0)
        return rows
    ep = triton_next_pow2(p.E)
    add("sort", lambda: mg.sort_routes(ids, p.E, 1, c1.block_m), R * 16.0)
    counts, sroute, t_max = mg.sort_routes(ids, p.E, 1, c1.block_m)
    args1 = (p, t_max * c1.block_m, t_max, xq, xs, w1, w3, sa[0], sa[1], w, ids, counts, sroute, LIMIT, c1, False,
             ep, False)
    hq, hs = mg._gemm1(*args1)
    add("gemm1", lambda: mg._gemm1(*args1), gemm1_bytes, 2.0 * R * 2 * I * D)
    o = torch.empty(R, D, dtype=x.dtype, device=x.device)
    add("gemm2", lambda: mg._gemm2(p, t_max, hq, hs, s.w2, sa[2], ids, counts, sroute, o, c2, False, ep),
        gemm2_bytes, 2.0 * R * D * I)
    add("combine", lambda: mg._combine(p, o, ids, False), R * D * 2.0 + n * D * 4.0)
    return rows


def triton_next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _summary(rows: list[Row]) -> None:
    """The target lines: decode vs the bandwidth floor, prefill TFLOP/s vs torch._scaled_grouped_mm."""
    by = {(r.bench, r.impl): r for r in rows}
    for n in sorted({int(r.bench.split("_t")[1]) for r in rows if r.bench.startswith("moe_t")}):
        t = by.get((f"moe_t{n}", "triton"))
        if t is None:
            continue
        line = f"[moe summary] N={n}: triton {t.time_us:.1f} us = {t.vs_floor:.2f}x floor, {t.tflops:.0f} TFLOP/s"
        for impl in ("sgmm_fp8/gemms", "sgmm_fp8/gemms/fast_accum", "sgmm_fp8/pipeline", "gmm_bf16/gemms",
                     "eager"):
            r = by.get((f"moe_t{n}", impl))
            if r is not None and r.time_us == r.time_us:
                line += f"; {impl} {r.time_us:.1f} us ({r.time_us / t.time_us:.2f}x ours)"
        print(line + f"; check {t.check:.1e}")
    for r in rows:  # the sweep and the per-launch breakdown, one line each
        if r.impl.startswith(("cfg", "part")):
            print(f"[moe {r.bench}] {r.impl}: {r.time_us:.1f} us, {r.tflops:.0f} TFLOP/s, {r.gbps:.0f} GB/s, "
                  f"{'' if r.vs_floor is None else f'{r.vs_floor:.2f}x floor'} {r.extra.get('error', '')}")


def run_moe_bench(tokens: tuple[int, ...] = TOKENS, json_out: str | None = None, sweep: bool = False,
                  bf16_baseline: bool = True, verbose: bool = False) -> list[Row]:
    """Check and time the MoE kernels at every token count; print one table; optionally write JSON."""
    torch.manual_seed(0)
    ceil = measure_ceilings(DEVICE)
    print(f"[moe bench] ceilings: copy {ceil.copy_gbps:.0f} GB/s, bf16 {ceil.bf16_tflops:.0f} TFLOP/s, "
          f"fp8 {ceil.fp8_tflops} TFLOP/s on {ceil.device}")
    s = make_setup(bf16_copies=bf16_baseline)
    rows: list[Row] = []
    g = torch.Generator(device=DEVICE).manual_seed(1)
    for n in tokens:
        x = torch.randn(n, D, device=DEVICE, generator=g).to(torch.bfloat16)
        try:
            r_rows, w, ids = bench_route(s, x, n, ceil)
            rows += r_rows
            rows += bench_experts(s, x, w, ids, n, ceil, sweep)
            rows += breakdown(s, x, w, ids, n, ceil)
            if n == 1:
                rows += breakdown(s, x, w, ids, n, ceil, "grouped")
        except Exception as e:  # noqa: BLE001 - record the failure and go on with the other token counts
            import traceback

            traceback.print_exc()
            rows.append(Row(f"moe_t{n}", "error", float("nan"), extra=dict(error=f"{type(e).__name__}: {e}"[:500])))
        if verbose:
            print_table([r for r in rows if r.bench in (f"moe_t{n}", f"route_t{n}")], f"MoE, {n} tokens")
        if json_out:  # after every token count, so a run cut short still leaves its numbers
            write_json(json_out, rows, ceil, bench="moe", tokens=list(tokens), complete=False)
    print_table([r for r in rows if not r.impl.startswith(("cfg", "part"))],
                "MoE (V4-Flash: 256+1 experts, top-6, d 4096, I 2048)")
    _summary(rows)
    if json_out:
        write_json(json_out, rows, ceil, bench="moe", tokens=list(tokens), complete=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="v4compile bench moe", description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--json", default=None)
    ap.add_argument("--sweep", action="store_true", help="also time every candidate kernel config")
    ap.add_argument("--no-bf16", action="store_true", help="skip the BF16 _grouped_mm baseline (13 GB of weights)")
    ap.add_argument("--verbose", action="store_true", help="a table per token count (configs and parts too)")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        from v4compile.errors import TargetError

        raise TargetError("the MoE benchmark needs a CUDA device (none is visible to torch)")
    run_moe_bench(tuple(int(t) for t in a.tokens.split(",")), a.json or os.environ.get("V4_BENCH_JSON"),
                  a.sweep, not a.no_bf16, a.verbose)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

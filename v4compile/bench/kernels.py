"""`v4compile bench kernels`: each kernel at V4-Flash shapes vs its eager reference and plain-torch rivals.

BENCHES is the list the CLI runs: a BenchSpec per named benchmark, each a function (ceilings, options) -> rows.
Append new kernels' benchmarks to it. Every benchmark first checks the kernel against the reference at the
benchmarked shape (calc_diff, printed in the `check` column), then times it; the floor is
max(bytes / copy bandwidth, FLOPs / matmul rate) from ceilings measured in the same run (bench/common.py).

Attention shapes (V4-Flash: H = 64 query heads sharing one 512-wide KV head, window 128, top-k 512):
CSA decode = 128 window + 512 selected compressed entries per query; HCA decode at 1M context = 128 window +
all 8192 compressed entries; CSA prefill = T queries, each its own 128-entry window and 512 picks.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from v4compile.bench.common import Ceilings, Row, floor_us, measure_ceilings, print_table, time_us, write_json
from v4compile.errors import TargetError
from v4compile.validate import calc_diff

H, D, NOPE, WINDOW, TOPK = 64, 512, 448, 128, 512


@dataclass
class Options:
    sweep: bool = False  # try every kernel config / split count and report the best (all go to JSON)
    quick: bool = False  # smaller shapes (a smoke run of the harness itself)


@dataclass
class BenchSpec:
    name: str
    fn: Callable[[Ceilings, Options], list[Row]]
    group: str
    kwargs: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ inputs


def _fake_quant_kv(x: torch.Tensor) -> torch.Tensor:
    """KV rows as the model stores them: FP8 fake-quantised nope part, bf16 RoPE part."""
    from v4compile.quant.formats import fake_quant_fp8

    return torch.cat((fake_quant_fp8(x[..., :NOPE].float(), 64), x[..., NOPE:].float()), -1).to(torch.bfloat16)


def _random_picks(rows: int, n_vis: torch.Tensor, k: int, device, gen) -> torch.Tensor:
    """[rows, k] int32 picks below n_vis[row] (distinct when n_vis > k; -1 beyond n_vis otherwise)."""
    n_vis = n_vis.to(device).view(-1, 1)
    ar = torch.arange(k, device=device).view(1, -1)
    # a random rotation of an evenly spread grid over [0, n_vis): distinct, cheap at T = 128K
    step = torch.clamp(n_vis // k, min=1)
    off = (torch.rand(rows, 1, device=device, generator=gen) * step).long()
    spread = (ar * step + off) % torch.clamp(n_vis, min=1)
    return torch.where(ar < n_vis, spread, -1).to(torch.int32)


def decode_inputs(B: int, n_comp: int, k2: int | None, device: str = "cuda", seed: int = 0) -> dict[str, Any]:
    """One decode token per sequence: window = ring (128) + the token itself, compressed cache of n_comp
    entries with k2 random distinct picks (k2 None: all entries, the HCA case)."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, 1, H, D, device=device, generator=g).to(torch.bfloat16)
    kv = _fake_quant_kv(torch.randn(B, WINDOW + 1, D, device=device, generator=g))
    idx = (torch.arange(1, WINDOW + 1, device=device, dtype=torch.int32)).view(1, 1, -1).repeat(B, 1, 1)
    kv2 = _fake_quant_kv(torch.randn(B, n_comp, D, device=device, generator=g))
    if k2 is None:
        idx2 = torch.arange(n_comp, device=device, dtype=torch.int32).view(1, 1, -1).repeat(B, 1, 1)
    else:
        idx2 = torch.rand(B, n_comp, device=device, generator=g).topk(k2, dim=-1).indices.to(torch.int32)[:, None]
    sink = torch.randn(H, device=device, generator=g)
    return dict(q=q, kv=kv, idx=idx, kv2=kv2, idx2=idx2.contiguous(), sink=sink, scale=D**-0.5)


def prefill_inputs(T: int, device: str = "cuda", seed: int = 0) -> dict[str, Any]:
    """A CSA prefill chunk of T tokens from position 0: raw window source (T rows), T // 4 compressed rows,
    per query the 128 window positions and 512 picks among its complete blocks (-1 where fewer exist)."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(1, T, H, D, device=device, generator=g).to(torch.bfloat16)
    kv = _fake_quant_kv(torch.randn(1, T, D, device=device, generator=g))
    p = torch.arange(T, device=device)
    win = p.view(-1, 1) - (WINDOW - 1) + torch.arange(WINDOW, device=device).view(1, -1)
    idx = torch.where(win >= 0, win, -1).to(torch.int32)[None]
    kv2 = _fake_quant_kv(torch.randn(1, max(T // 4, 1), D, device=device, generator=g))
    idx2 = _random_picks(T, (p + 1) // 4, TOPK, device, g)[None]
    sink = torch.randn(H, device=device, generator=g)
    return dict(q=q, kv=kv, idx=idx, kv2=kv2, idx2=idx2, sink=sink, scale=D**-0.5)


def _valid_entries(a: dict[str, Any]) -> int:
    return int((a["idx"] >= 0).sum()) + int((a["idx2"] >= 0).sum())


def _attn_cost(a: dict[str, Any], unique_rows: int, kv_bytes_per_row: float) -> tuple[float, float]:
    """(FLOPs, minimum bytes): QK and PV over every valid entry; q, out, indices and each KV row once."""
    n = _valid_entries(a)
    flops = 4.0 * H * D * n
    io = 2 * a["q"].numel() * 2 + (a["idx"].numel() + a["idx2"].numel()) * 4
    return flops, io + unique_rows * kv_bytes_per_row


# ------------------------------------------------------------------------------------------ rivals


def _gather(a: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Gathered rows [B, T, K+K2, D] and validity [B, T, K+K2] (what SDPA / matmul rivals start from)."""
    B, T = a["idx"].shape[:2]
    out, valid = [], []
    for src, ix in ((a["kv"], a["idx"]), (a["kv2"], a["idx2"])):
        safe = ix.long().clamp(min=0).flatten(1)
        rows = torch.gather(src, 1, safe.unsqueeze(-1).expand(-1, -1, D)).view(B, T, -1, D)
        out.append(rows)
        valid.append(ix >= 0)
    return torch.cat(out, 2), torch.cat(valid, 2)


def sdpa_rival(a: dict[str, Any]) -> torch.Tensor:
    """torch SDPA on gathered, head-expanded KV (no sink: SDPA cannot express it; timing rival only)."""
    g, valid = _gather(a)
    B, T, K, _ = g.shape
    q = a["q"].reshape(B * T, 1, H, D).transpose(1, 2)  # [BT, H, 1, D]
    kv = g.reshape(B * T, 1, K, D).expand(B * T, H, K, D)
    mask = valid.reshape(B * T, 1, 1, K)
    o = F.scaled_dot_product_attention(q, kv, kv, attn_mask=mask, scale=a["scale"])
    return o.transpose(1, 2).reshape(B, T, H, D)


def mm_rival(a: dict[str, Any]) -> torch.Tensor:
    """Gather + bf16 matmul + fp32 softmax with the sink + bf16 matmul (the plain-torch way)."""
    g, valid = _gather(a)
    B, T, K, _ = g.shape
    g = g.reshape(B * T, K, D)
    s = torch.bmm(a["q"].reshape(B * T, H, D), g.transpose(1, 2)).float() * a["scale"]  # [BT, H, K]
    s = s.masked_fill(~valid.reshape(B * T, 1, K), -math.inf)
    s = torch.cat((s, a["sink"].view(1, H, 1).expand(B * T, H, 1)), -1)
    p = torch.softmax(s, -1)[..., :K].to(torch.bfloat16)
    return torch.bmm(p, g).reshape(B, T, H, D)


# ------------------------------------------------------------------------------------------ attention benches


def _triton_rows(bench: str, a: dict[str, Any], ref: torch.Tensor | None, flops: float, nbytes: float,
                 ceil: Ceilings, opt: Options, fp8: bool, splits_choices: list[int | None],
                 graph: bool = False) -> list[Row]:
    """Time the kernel (optionally over every config x split count) and check it against `ref`.

    graph=True times CUDA-graph replays (decode: what an engine does; removes Python launch cost)."""
    from v4compile.plugins.triton import sparse_attention as sa
    from v4compile.quant.kv_layout import pack_kv_cache

    if fp8:
        d1, s1 = pack_kv_cache(a["kv"])
        d2, s2 = pack_kv_cache(a["kv2"])

        def run(cfg, ns):
            return sa.sparse_attention_fp8_launch(a["q"], d1, s1, a["idx"], d2, s2, a["idx2"], a["sink"],
                                                  a["scale"], config=cfg, num_splits=ns)
    else:
        def run(cfg, ns):
            return sa.sparse_attention_launch(a["q"], a["kv"], a["idx"], a["kv2"], a["idx2"], a["sink"],
                                              a["scale"], config=cfg, num_splits=ns)

    default = sa.pick_config(D, a["q"].device, fp8)
    configs = (sa.CONFIGS_FP8 if fp8 else sa.CONFIGS_BF16) if opt.sweep else [default]
    trials = []
    for cfg in configs:
        for ns in splits_choices:
            try:
                t = time_us(lambda: run(cfg, ns), cudagraph=graph, rep_ms=60 if opt.sweep else 100)
            except Exception as e:  # a config that does not fit (shared memory) is reported, not fatal
                trials.append(dict(config=str(cfg), splits=ns, error=str(e)[:200]))
                continue
            trials.append(dict(config=str(cfg), splits=ns, time_us=t))
    ok = [t for t in trials if "time_us" in t]
    if not ok:
        raise RuntimeError(f"{bench}: no kernel config ran: {trials}")
    best = min(ok, key=lambda t: t["time_us"])
    cfg = next(c for c in configs if str(c) == best["config"])
    out = run(cfg, best["splits"])
    check = None if ref is None else calc_diff(out, ref)
    impl = "triton_fp8" if fp8 else "triton"
    fl = floor_us(nbytes, flops, ceil)
    return [Row(bench, impl, best["time_us"], flops, nbytes, fl, check,
                dict(best=best, default=str(default), trials=trials, cuda_graph=graph))]


def _rival_rows(bench: str, a: dict[str, Any], ref: torch.Tensor | None, flops: float, nbytes: float,
                fl: float, rivals: tuple[str, ...], graph: bool = False) -> list[Row]:
    """Plain-torch ways to compute the same thing (and the triton_op called eagerly, without a graph)."""
    args = (a["q"], a["kv"], a["idx"], a["kv2"], a["idx2"], a["sink"], a["scale"])
    impls = dict(eager=lambda: torch.ops.v4.sparse_attention(*args),
                 sdpa=lambda: sdpa_rival(a), mm_softmax_mm=lambda: mm_rival(a),
                 triton_op_nograph=lambda: torch.ops.v4triton.sparse_attention(*args))
    rows = []
    B, T = a["idx"].shape[:2]
    K = a["idx"].shape[2] + a["idx2"].shape[2]
    for name in rivals:
        if name == "sdpa" and B * T * H * K * D * 2 > (64 << 30):  # would it materialise the expanded KV?
            print(f"[bench] {bench}/sdpa skipped: head-expanded KV would be {B * T * H * K * D * 2 / 2**30:.0f} GiB")
            continue
        fn = impls[name]
        try:
            t = time_us(fn, cudagraph=graph and name != "triton_op_nograph", rep_ms=100)
            check = None if (ref is None or name == "sdpa") else calc_diff(fn(), ref)
        except torch.OutOfMemoryError as e:
            print(f"[bench] {bench}/{name}: out of memory ({e})")
            continue
        rows.append(Row(bench, name, t, flops, nbytes, fl, check,
                        dict(cuda_graph=graph and name != "triton_op_nograph")))
    return rows


def attention_decode(ceil: Ceilings, opt: Options, *, B: int, n_comp: int, k2: int | None,
                     bench: str) -> list[Row]:
    """CSA (k2 picks) or HCA (all n_comp entries) decode, one token per sequence."""
    import v4compile.model.ops  # noqa: F401  (registers torch.ops.v4.*)
    from v4compile.quant.kv_layout import entry_bytes

    if opt.quick:
        n_comp = min(n_comp, 4096)
    a = decode_inputs(B, n_comp, k2)
    ref = torch.ops.v4.sparse_attention(a["q"], a["kv"], a["idx"], a["kv2"], a["idx2"], a["sink"], a["scale"])
    unique = B * (WINDOW + (k2 if k2 is not None else n_comp))
    flops, nbytes = _attn_cost(a, unique, D * 2)
    _, nbytes8 = _attn_cost(a, unique, entry_bytes(D))
    splits: list[int | None] = [None]
    if opt.sweep:
        splits = [None, 1, 2] if B >= 32 else [None, 1, 4, 8, 16, 32, 64]
    rows = _triton_rows(bench, a, ref, flops, nbytes, ceil, opt, False, splits, graph=True)
    rows += _triton_rows(bench, a, ref, flops, nbytes8, ceil, opt, True, splits, graph=True)
    rows += _rival_rows(bench, a, ref, flops, nbytes, rows[0].floor_us,
                        ("eager", "sdpa", "mm_softmax_mm", "triton_op_nograph"), graph=True)
    return rows


def attention_prefill(ceil: Ceilings, opt: Options, *, T: int, bench: str, check_queries: int = 2048,
                      rivals: tuple[str, ...] = ("eager", "sdpa", "mm_softmax_mm"), same_rows: bool = False
                      ) -> list[Row]:
    """CSA prefill of T tokens; at large T the check covers `check_queries` queries spread over the chunk.

    same_rows: every query attends to the same 128 + 512 rows (cache-resident): a probe of the kernel's
    arithmetic efficiency with gather traffic taken out of the way."""
    import v4compile.model.ops  # noqa: F401

    if opt.quick:
        T = min(T, 4096)
    a = prefill_inputs(T)
    if same_rows:
        a["idx"] = torch.arange(WINDOW, device="cuda", dtype=torch.int32).expand(1, T, WINDOW).contiguous()
        a["idx2"] = torch.arange(TOPK, device="cuda", dtype=torch.int32).expand(1, T, TOPK).contiguous()
    flops, nbytes = _attn_cost(a, a["kv"].shape[1] + a["kv2"].shape[1], D * 2)
    rows = _triton_rows(bench, a, None, flops, nbytes, ceil, opt, False, [1])
    out = torch.ops.v4triton.sparse_attention(a["q"], a["kv"], a["idx"], a["kv2"], a["idx2"], a["sink"], a["scale"])
    n = min(T, check_queries)
    sel = torch.linspace(0, T - 1, n, device=a["q"].device).long().unique()
    ref = torch.ops.v4.sparse_attention(a["q"][:, sel].contiguous(), a["kv"], a["idx"][:, sel].contiguous(),
                                        a["kv2"], a["idx2"][:, sel].contiguous(), a["sink"], a["scale"])
    rows[0].check = calc_diff(out[:, sel], ref)
    rows[0].extra["checked_queries"] = int(sel.numel())
    if T <= 8192:
        full_ref = torch.ops.v4.sparse_attention(a["q"], a["kv"], a["idx"], a["kv2"], a["idx2"], a["sink"],
                                                 a["scale"])
        rows += _rival_rows(bench, a, full_ref, flops, nbytes, rows[0].floor_us, rivals)
    return rows


BENCHES: list[BenchSpec] = [
    BenchSpec("csa_decode_b128_4k", attention_decode, "attention", dict(B=128, n_comp=1024, k2=TOPK)),
    BenchSpec("csa_decode_b128", attention_decode, "attention", dict(B=128, n_comp=32768, k2=TOPK)),
    BenchSpec("csa_decode_b8", attention_decode, "attention", dict(B=8, n_comp=262144, k2=TOPK)),
    BenchSpec("csa_decode_b1", attention_decode, "attention", dict(B=1, n_comp=262144, k2=TOPK)),
    BenchSpec("hca_decode_b1_1m", attention_decode, "attention", dict(B=1, n_comp=8192, k2=None)),
    BenchSpec("hca_decode_b64_1m", attention_decode, "attention", dict(B=64, n_comp=8192, k2=None)),
    BenchSpec("csa_prefill_4k", attention_prefill, "attention", dict(T=4096)),
    BenchSpec("csa_prefill_4k_samerows", attention_prefill, "attention", dict(T=4096, same_rows=True, rivals=())),
    BenchSpec("csa_prefill_128k", attention_prefill, "attention", dict(T=131072)),
]

# indexer + top-k and compressor benchmarks (groups "indexer", "compressor") live in bench/indexer.py
from v4compile.bench.indexer import bench_specs as _indexer_specs  # noqa: E402

BENCHES += _indexer_specs(BenchSpec)

from v4compile.bench.mhc import bench_specs as _mhc_specs  # noqa: E402 - group "mhc"

BENCHES += _mhc_specs(BenchSpec)

from v4compile.bench.linear import bench_specs as _linear_specs  # noqa: E402 - group "linear"

BENCHES += _linear_specs(BenchSpec)


def run_kernel_bench(names: list[str] | None = None, json_out: str | None = None, sweep: bool = False,
                     quick: bool = False) -> list[Row]:
    """Run the named benchmarks (all when None or empty) on the current CUDA device; print a table; write JSON."""
    if not torch.cuda.is_available():
        raise TargetError("kernel benchmarks need a CUDA device (none is visible to torch)")
    known = {b.name: b for b in BENCHES}
    unknown = [n for n in names or [] if n not in known and not any(b.group == n for b in BENCHES)]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; known: {sorted(known)} and groups "
                         f"{sorted({b.group for b in BENCHES})}")
    chosen = [b for b in BENCHES if not names or b.name in names or b.group in names]
    ceil = measure_ceilings()
    print(f"[bench] {ceil.device}: copy {ceil.copy_gbps:.0f} GB/s, bf16 {ceil.bf16_tflops:.0f} TFLOP/s, "
          f"fp8 {ceil.fp8_tflops or float('nan'):.0f} TFLOP/s", flush=True)
    opt = Options(sweep=sweep, quick=quick)
    rows: list[Row] = []
    for spec in chosen:
        got = spec.fn(ceil, opt, bench=spec.name, **spec.kwargs)
        for r in got:
            print(f"[bench] {r.bench:>18} {r.impl:>14} {r.time_us:10.1f} us {r.tflops:7.1f} TFLOP/s "
                  f"{r.gbps:7.0f} GB/s  x floor {r.vs_floor or 0:.2f}  check {r.check}", flush=True)
        rows += got
        torch.cuda.empty_cache()
    print_table(rows, f"kernels on {ceil.device}")
    if json_out:
        write_json(json_out, rows, ceil, sweep=sweep, quick=quick)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="v4compile bench kernels", description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="benchmark names or groups (default: all)")
    ap.add_argument("--json", dest="json_out", help="write rows + ceilings here")
    ap.add_argument("--sweep", action="store_true", help="try every kernel config and split count")
    ap.add_argument("--quick", action="store_true", help="small shapes: a smoke run of the harness")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = ap.parse_args(argv)
    if args.list:
        for b in BENCHES:
            print(f"{b.name:24} {b.group:12} {b.kwargs}")
        return 0
    run_kernel_bench(args.names, args.json_out, args.sweep, args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark of the mHC Sinkhorn kernel (`v4triton::sinkhorn`, group "mhc" of `v4compile bench kernels`).

N = tokens x mHC maps of one step, hc = 4, 20 iterations (V4). Rows: the kernel (CUDA-graph replay), the eager
reference body, and torch.compile of the reference body (Inductor: what a GPU engine ran before the kernel, one
kernel per normalisation step). Bytes = logits read + comb written (fp32), the floor's only term.
"""

from __future__ import annotations

from typing import Any

import torch

from v4compile.bench.common import Ceilings, Row, compiled_row, floor_us, time_us
from v4compile.validate import calc_diff

DEVICE = "cuda"  # a CPU dry run of the harness (interpreter) points this elsewhere
HC, ITERS, EPS = 4, 20, 1e-6


def sinkhorn_bench(ceil: Ceilings, opt: Any, *, n: int, bench: str) -> list[Row]:
    from v4compile.model.ops import BODIES
    from v4compile.plugins.triton import mhc

    ref_body = BODIES["sinkhorn"]
    logits = torch.randn(n, HC, HC, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(n)) * 3
    nbytes = 2 * logits.numel() * 4
    fl = floor_us(nbytes, 0.0, ceil)
    want = ref_body(logits, ITERS, EPS)
    got = mhc.sinkhorn_launch(logits, ITERS, EPS)
    graph = DEVICE == "cuda" and n <= 4096
    rows = [Row(bench, "triton", time_us(lambda: mhc.sinkhorn_launch(logits, ITERS, EPS), cudagraph=graph), 0.0,
                nbytes, fl, calc_diff(got, want))]
    rows.append(Row(bench, "eager", time_us(lambda: ref_body(logits, ITERS, EPS)), 0.0, nbytes, fl))
    args = (logits, ITERS, EPS)
    rows.append(compiled_row(bench, ref_body, args, args, 0.0, nbytes, fl, want, cudagraph=graph))
    return rows


def bench_specs(spec_cls) -> list:
    """BenchSpec entries for bench/kernels.py's BENCHES (group 'mhc')."""
    return [
        spec_cls("sinkhorn_decode_b1", sinkhorn_bench, "mhc", dict(n=1)),  # one token, one map
        spec_cls("sinkhorn_decode_b64", sinkhorn_bench, "mhc", dict(n=64)),
        spec_cls("sinkhorn_prefill_16k", sinkhorn_bench, "mhc", dict(n=16384)),
        spec_cls("sinkhorn_prefill_128k", sinkhorn_bench, "mhc", dict(n=131072)),
    ]

"""Benchmark of the dense FP8 linear kernel (`v4triton::fp8_linear`, group "linear" of `v4compile bench kernels`).

V4-Flash shapes (wq_b 1024 -> 32768, wo_b 8192 -> 4096, a d x d one), rows = tokens of one step. Rows: the kernel
(CUDA-graph replay at decode sizes), the eager reference body and torch.compile of it (what a GPU engine ran
before the kernel: weights dequantised to float32 on every call, then an fp32 GEMM). Floor = max(bytes of weights
+ scales + x + y over the copy rate, FLOPs over the FP8 `_scaled_mm` rate).
"""

from __future__ import annotations

from typing import Any

import torch

from v4compile.bench.common import Ceilings, Row, compiled_row, floor_us, time_us
from v4compile.validate import calc_diff

DEVICE = "cuda"  # a CPU dry run of the harness (interpreter) points this elsewhere


def linear_bench(ceil: Ceilings, opt: Any, *, M: int, O: int, K: int, bench: str) -> list[Row]:
    from v4compile.model.ops import BODIES
    from v4compile.plugins.triton import fp8_linear as fl
    from v4compile.quant.formats import quant_fp8_block

    g = torch.Generator(device=DEVICE).manual_seed(M + O + K)
    w, s = quant_fp8_block(torch.randn(O, K, device=DEVICE, generator=g) * K ** -0.5, (128, 128), scale_fmt="fp32")
    s = s.float()
    x = torch.randn(M, K, device=DEVICE, generator=g).bfloat16()
    ref = BODIES["fp8_linear"]
    nbytes = O * K + s.numel() * 4 + M * K * 2 + M * O * 2
    flops = 2.0 * M * O * K
    fl_us = floor_us(nbytes, flops, ceil, fp8=True)
    want = ref(x, w, s)
    graph = DEVICE == "cuda" and M <= 64
    rows = [Row(bench, "triton", time_us(lambda: fl.fp8_linear_launch(x, w, s), cudagraph=graph), flops, nbytes,
                fl_us, calc_diff(fl.fp8_linear_launch(x, w, s), want))]
    rows.append(Row(bench, "eager", time_us(lambda: ref(x, w, s)), flops, nbytes, fl_us))
    rows.append(compiled_row(bench, ref, (x, w, s), (x, w, s), flops, nbytes, fl_us, want, cudagraph=graph))
    return rows


def bench_specs(spec_cls) -> list:
    """BenchSpec entries for bench/kernels.py's BENCHES (group 'linear')."""
    return [spec_cls(f"fp8_linear_{name}_m{M}", linear_bench, "linear", dict(M=M, O=O, K=K))
            for name, O, K in (("wq_b", 32768, 1024), ("wo_b", 4096, 8192), ("d_x_d", 4096, 4096))
            for M in (1, 64, 4096)]

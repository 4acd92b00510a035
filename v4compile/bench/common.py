"""Shared benchmark machinery: timing, the two measured ceilings, the floor, a rich table and JSON output.

Every ratio printed by a benchmark is measured in the same process as its ceilings (copy bandwidth from a
large device-to-device `copy_`, matmul rate from a bf16 8192^3 product, and FP8 `_scaled_mm` where an op is
FP8), so "time / floor" never mixes numbers from different runs or machines.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch


@dataclass
class Ceilings:
    """Measured on this device in this run."""

    copy_gbps: float  # device-to-device copy, bytes read + written per second / 1e9
    bf16_tflops: float  # dense bf16 matmul 8192^3
    fp8_tflops: float | None  # torch._scaled_mm e4m3 8192^3 (None where unavailable)
    device: str


@dataclass
class Row:
    """One benchmark line: an implementation of an op at one shape."""

    bench: str  # e.g. "csa_decode_b128"
    impl: str  # "triton", "eager", "sdpa", ...
    time_us: float
    flops: float = 0.0
    bytes: float = 0.0
    floor_us: float | None = None
    check: float | None = None  # calc_diff vs the reference where the row was checked
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tflops(self) -> float:
        return self.flops / self.time_us / 1e6 if self.time_us > 0 else 0.0

    @property
    def gbps(self) -> float:
        return self.bytes / self.time_us / 1e3 if self.time_us > 0 else 0.0

    @property
    def vs_floor(self) -> float | None:
        return self.time_us / self.floor_us if self.floor_us else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(tflops=self.tflops, gbps=self.gbps, vs_floor=self.vs_floor)
        return d


def time_us(fn: Callable[[], Any], *, cudagraph: bool = False, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median time of fn() in microseconds (CUDA events via triton.testing; graph replay for tiny kernels)."""
    import triton.testing as tt

    if cudagraph:
        with torch.cuda.stream(torch.cuda.Stream()):
            ms = tt.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")
    else:
        ms = tt.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    return float(ms) * 1e3


def _cpu_time_us(fn: Callable[[], Any], reps: int = 7) -> float:
    """Median wall time of fn() in microseconds (the CPU has no events to time with)."""
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def measure_ceilings(device: torch.device | str = "cuda", copy_bytes: int | None = None,
                     n: int | None = None) -> Ceilings:
    """Copy bandwidth and matmul rates of this device, measured now (on a CPU: smaller sizes, wall-clock
    medians, no FP8 rate)."""
    device = torch.device(device)
    cpu = device.type == "cpu"
    copy_bytes = copy_bytes or (64 << 20 if cpu else 2 << 30)
    n = n or (512 if cpu else 8192)
    timer = _cpu_time_us if cpu else (lambda fn: time_us(fn, rep_ms=200))
    src = torch.empty(copy_bytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src))
    copy_gbps = 2 * copy_bytes / t / 1e3
    del src, dst
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t = timer(lambda: a @ b)
    bf16 = 2 * n**3 / t / 1e6
    fp8 = None
    if cpu:
        return Ceilings(copy_gbps=copy_gbps, bf16_tflops=bf16, fp8_tflops=None,
                        device=platform.processor() or platform.machine() or "cpu")
    try:
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()  # _scaled_mm wants B column-major
        one = torch.ones((), device=device)
        t = time_us(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16), rep_ms=200)
        fp8 = 2 * n**3 / t / 1e6
    except (RuntimeError, TypeError) as e:  # not every build/device has FP8 GEMMs
        print(f"[bench] fp8 ceiling unavailable: {e}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return Ceilings(copy_gbps=copy_gbps, bf16_tflops=bf16, fp8_tflops=fp8, device=name)


def compiled_row(bench: str, body: Callable[..., Any], first_args: tuple, args: tuple, flops: float, nbytes: float,
                 floor: float, want: Any = None, cudagraph: bool = False) -> Row:
    """The "torch_compile" row of `body` (an op's reference body, compiled by Inductor: what an engine runs where
    no kernel exists): first call on `first_args` (compile), then timed on `args`; calc_diff to `want` when given.
    A compile failure is recorded in the row (time NaN) so the other rows of the run stay."""
    from v4compile.validate import calc_diff

    compiled = torch.compile(body, dynamic=False)
    try:
        out = compiled(*first_args)
        check = calc_diff(out, want) if want is not None else None
        return Row(bench, "torch_compile", time_us(lambda: compiled(*args), cudagraph=cudagraph), flops, nbytes, floor,
                   check)
    except Exception as e:  # torch.compile raises many types; keep the run going
        return Row(bench, "torch_compile", float("nan"), flops, nbytes, floor,
                   extra=dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"))


def floor_us(bytes_: float, flops: float, ceil: Ceilings, fp8: bool = False) -> float:
    """max(bytes / copy bandwidth, FLOPs / matmul rate): no implementation can be much faster."""
    rate = ceil.fp8_tflops if (fp8 and ceil.fp8_tflops) else ceil.bf16_tflops
    return max(bytes_ / (ceil.copy_gbps * 1e3), flops / (rate * 1e6))


def print_table(rows: list[Row], title: str) -> None:
    """One line per row; falls back to plain text where rich is missing."""
    head = ["bench", "impl", "time us", "TFLOP/s", "GB/s", "floor us", "x floor", "check"]
    lines = [[r.bench, r.impl, f"{r.time_us:.1f}", f"{r.tflops:.1f}", f"{r.gbps:.0f}",
              "" if r.floor_us is None else f"{r.floor_us:.1f}",
              "" if r.vs_floor is None else f"{r.vs_floor:.2f}",
              "" if r.check is None else f"{r.check:.1e}"] for r in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        for line in [head] + lines:
            print("  ".join(f"{c:>10}" for c in line))
        return
    table = Table(title=title)
    for h in head:
        table.add_column(h, justify="left" if h in ("bench", "impl") else "right")
    for line in lines:
        table.add_row(*line)
    Console(width=140).print(table)


def write_json(path: str | Path, rows: list[Row], ceil: Ceilings | None, **meta: Any) -> None:
    """Rows + ceilings + versions, one file."""
    import triton

    payload = dict(time=time.strftime("%Y-%m-%dT%H:%M:%S"), torch=torch.__version__, triton=triton.__version__,
                   ceilings=None if ceil is None else asdict(ceil), rows=[r.to_dict() for r in rows], **meta)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=1, default=str))

"""Compile Triton kernels for sm_90 on a machine without a GPU and print what ptxas reports (registers, spills).

    python scripts/ptxas_report.py            # compressor, Sinkhorn and FP8 linear kernels (V4-Flash widths)

Uses triton's own compiler and the ptxas it ships (triton/backends/nvidia/bin); nothing runs. A kernel that does
not compile, or spills, shows here before any device time is spent.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # the interpreter replaces @triton.jit kernels by Python

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402


def ptxas_info(fn, pointers: dict[str, str], constexprs: dict, num_warps: int, floats=("eps", "hd_scale"),
               num_stages: int = 3, ints: str = "i64") -> str:
    """ptxas -v's register / spill lines for `fn` compiled with these pointer types and constexprs (other
    arguments: fp32 if named in `floats`, else `ints`). Pointers and `stride*` arguments are marked divisible by
    16, as Triton's launcher specialises them at run time (without the hint the loads are scalarised and the
    kernels look worse than they run)."""
    sig = {n: "constexpr" if n in constexprs else pointers.get(n) or ("fp32" if n in floats else ints)
           for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n in pointers or n.startswith("stride")}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    ptxas = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as d:
        src = pathlib.Path(d) / "k.ptx"
        src.write_text(k.asm["ptx"])
        r = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(src), "-o", str(pathlib.Path(d) / "k.o")],
                           capture_output=True, text=True, check=True)
    keep = [ln.split("info    :")[-1].strip() for ln in r.stderr.splitlines() if "registers" in ln or "spill" in ln]
    return "; ".join(keep) + f"; shared {k.metadata.shared} B"


def compressor_report() -> list[tuple[str, str]]:
    from v4compile.plugins.triton import compressor as ck

    f32 = {n: "*fp32" for n in ("kvp_ptr", "gp_ptr", "ape_ptr", "invf_ptr", "kvs_ptr", "scs_ptr")}
    common = {**f32, "nw_ptr": "*bf16", "start_ptr": "*i64"}
    rows = []
    for label, m, c, d, rotate, sw in (("CSA main", 4, 2, 512, False, 8), ("CSA indexer", 4, 2, 128, True, 4),
                                       ("HCA", 128, 1, 512, False, 8)):
        cx = dict(M=m, C=c, D=d, DP=d, R=64, SB=min(ck.SLOTS_PER_STEP, m), ROTATE=rotate)
        warps = 4 if d <= 256 else 8
        rows.append((f"_pool_kernel {label}", ptxas_info(ck._pool_kernel, {**common, "cache_ptr": "*bf16"}, cx, warps)))
        rows.append((f"_pool_packed_kernel {label}",
                     ptxas_info(ck._pool_packed_kernel, {**common, "data_ptr": "*u8", "scale_ptr": "*u8"},
                                {**cx, "SW": sw}, warps)))
        if not rotate:
            sp = triton.next_power_of_2(c * m)
            cb = min(triton.next_power_of_2(c * d), max(16, ck.STATE_ELEMS // sp))
            rows.append((f"_state_kernel {label}",
                         ptxas_info(ck._state_kernel, {**f32, "start_ptr": "*i64"},
                                    dict(M=m, C=c, CW=c * d, SP=sp, CB=cb), 4)))
    return rows


def mhc_report() -> list[tuple[str, str]]:
    from v4compile.plugins.triton import mhc

    block = mhc.ELEMS_PER_PROGRAM // 16
    return [("_sinkhorn_kernel hc 4, 20 iterations",
             ptxas_info(mhc._sinkhorn_kernel, {"x_ptr": "*fp32", "o_ptr": "*fp32"}, dict(HC=4, ITERS=20, BLOCK=block),
                        4, floats=("eps",)))]


def linear_report() -> list[tuple[str, str]]:
    from v4compile.plugins.triton import fp8_linear as fl

    ptrs = {"q_ptr": "*fp8e4nv", "qs_ptr": "*fp32", "w_ptr": "*fp8e4nv", "s_ptr": "*fp32", "o_ptr": "*bf16"}
    return [(f"_fp8_linear_kernel {what} {c.block_m}x{c.block_n}",
             ptxas_info(fl._fp8_linear_kernel, ptrs, dict(BM=c.block_m, BN=c.block_n), c.num_warps, floats=(),
                        num_stages=c.num_stages, ints="i32"))
            for what, c in (("decode", fl.DECODE_CONFIG), ("prefill", fl.PREFILL_CONFIG))]


if __name__ == "__main__":
    for name, info in compressor_report() + mhc_report() + linear_report():
        print(f"{name:36s} {info}")
    sys.exit(0)

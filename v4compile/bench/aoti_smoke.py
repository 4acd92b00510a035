"""Bisect an AOTInductor load / run failure on a GPU: toy programs, each with one feature our engines use,
compiled here and loaded + run in a child process (a segfault there is reported, not fatal).

The h200 demo engine (session 3) builds, then segfaults while `AOTIModelPackageLoader` is constructed
(torch 2.11, docs/perf/engines.md). Each case below adds one ingredient of that engine to a plain program:

  aten          Linear + ReLU, one model in the package
  two-models    the same program packaged under two names (engines hold prefill + decode)
  fp8-consts    e4m3 weight + float32 scale + a uint8 constant (the widened UE8M0 scales and raw-byte copies)
  mutation      an input buffer updated in place (the caches)
  dynamic       dynamic batch and length dims
  triton-op     a torch.library.triton_op of our own (as plugins/triton registers)
  engine:NAME   with --engine DIR: that engine's model NAME loaded alone (prefill / decode)
  engine-so:NAME  the same model's wrapper .so loaded by AOTIModelContainerRunnerCuda directly (package
                extracted here), bypassing AOTIModelPackageLoader

    python -m v4compile.bench.aoti_smoke [--engine DIR] [--cases aten,two-models|none] [--json out.json]
    python -m v4compile.bench.aoti_smoke --device cpu     # dry run of the harness without a GPU
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import triton
import triton.language as tl
from torch import nn


@triton.jit
def _scale_kernel(x_ptr, o_ptr, n, s, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    tl.store(o_ptr + i, tl.load(x_ptr + i, mask=m) * tl.cast(s, tl.float32), mask=m)


@torch.library.triton_op("v4smoke::scale", mutates_args=())
def scale(x: torch.Tensor, s: float) -> torch.Tensor:
    out = torch.empty_like(x)
    n = x.numel()
    torch.library.wrap_triton(_scale_kernel)[(triton.cdiv(n, 256),)](x, out, n, s, BLOCK=256)
    return out


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 64)

    def forward(self, x):
        return torch.relu(self.lin(x))


class Fp8Consts(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("w", (torch.randn(64, 64) * 0.1).to(torch.float8_e4m3fn))
        self.register_buffer("s", torch.full((1, 64), 0.5))
        self.register_buffer("raw", torch.arange(64, dtype=torch.uint8))

    def forward(self, x):
        return x @ (self.w.float() * self.s).t() + self.raw.float()


class Mutation(nn.Module):
    def forward(self, x, cache):
        cache[:, : x.shape[1]].copy_(x)
        return cache.sum(1)


class TritonOp(nn.Module):
    def forward(self, x):
        return torch.ops.v4smoke.scale(x, 0.5) + 1


def _cases(dev):
    x = torch.randn(4, 64, device=dev)
    b = torch.export.Dim("b", min=1, max=8)
    return {
        "aten": (Plain().to(dev), (x,), None, ("model",)),
        "two-models": (Plain().to(dev), (x,), None, ("prefill", "decode")),
        "fp8-consts": (Fp8Consts().to(dev), (x,), None, ("model",)),
        "mutation": (Mutation(), (torch.randn(2, 8, 64, device=dev), torch.zeros(2, 16, 64, device=dev)),
                     ({0: b}, {0: b}), ("model",)),
        "dynamic": (Plain().to(dev), (torch.randn(3, 5, 64, device=dev),),
                    ({0: b, 1: torch.export.Dim("t", min=1, max=64)},), ("model",)),
        "triton-op": (TritonOp(), (x,), None, ("model",)),
    }


_SO_CHILD = """
import os, sys, zipfile, tempfile, torch
from pathlib import Path
path, name = sys.argv[1], sys.argv[2]
tmp = Path(tempfile.mkdtemp())
with zipfile.ZipFile(path) as z:
    members = [m for m in z.namelist() if f"/aotinductor/{name}/" in m]
    z.extractall(tmp, members)
model_dir = next(tmp.rglob(f"aotinductor/{name}"))
sos = sorted(model_dir.glob("*.so"))
if not os.environ.get("V4SMOKE_PLAIN_LOADER"):
    from v4compile.runtime.engine import _share_libstdcxx
    _share_libstdcxx()
print("files", sorted(p.name for p in model_dir.iterdir() if not p.name.endswith(".cubin"))[:12], flush=True)
runner = torch._C._aoti.AOTIModelContainerRunnerCuda(str(sos[0]), 1, "cuda", str(model_dir))
print("loaded", flush=True)
"""

_CHILD = """
import os, sys, torch
from pathlib import Path
import v4compile.bench.aoti_smoke  # registers v4smoke::scale
from v4compile.runtime.engine import load_model
path, name = sys.argv[1], sys.argv[2]
inputs = torch.load(sys.argv[3]) if sys.argv[3] != "none" else None
if os.environ.get("V4SMOKE_PLAIN_LOADER"):  # torch's own loader, as it was before the libstdc++ fix
    from torch._inductor.package import load_package
    m = load_package(path, model_name=name)
else:
    m = load_model(Path(path), name, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
print("loaded", flush=True)
if inputs is not None:
    out = m(*inputs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    print("ran", flush=True)
"""


def _child(path: Path, name: str, inputs_file: Path | None, timeout: int = 180, code: str = _CHILD) -> dict:
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code, str(path), name,
                            str(inputs_file) if inputs_file else "none"],
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"rc": None, "status": "timeout", "seconds": timeout}
    out = p.stdout.split()
    status = "ran" if "ran" in out else "loaded" if "loaded" in out else "failed"
    tail = [line for line in p.stderr.strip().splitlines() if line.strip()][-40:]
    return {"rc": p.returncode, "status": status, "seconds": round(time.perf_counter() - t0, 1),
            "stdout": p.stdout[-2000:], "stderr_tail": tail if p.returncode else []}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine")
    ap.add_argument("--json")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the harness (no triton-op case)")
    ap.add_argument("--cases", default="all", help="comma-separated toy cases to run, 'all' or 'none'")
    a = ap.parse_args(argv)
    from torch._inductor.package import package_aoti

    dev = a.device
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        wanted = None if a.cases == "all" else set(a.cases.split(",")) - {"none"}
        for case, (mod, args, dyn, names) in _cases(dev).items():
            if (dev == "cpu" and case == "triton-op") or (wanted is not None and case not in wanted):
                continue
            t0 = time.perf_counter()
            try:
                ep = torch.export.export(mod, args, dynamic_shapes=dyn)
                files = torch._inductor.aot_compile(ep.module(), args, options={"aot_inductor.package": True})
                pkg = Path(tmp) / f"{case}.pt2"
                package_aoti(str(pkg), {n: files for n in names})
            except Exception as e:  # a case that does not compile is a finding too
                rows[case] = {"status": f"compile failed: {type(e).__name__}: {str(e)[:200]}"}
                continue
            inp = Path(tmp) / f"{case}.inputs.pt"
            torch.save([t.clone() for t in args], inp)
            rows[case] = {"compile_s": round(time.perf_counter() - t0, 1),
                          **_child(pkg, names[-1], inp)}
        if a.engine:
            for name in ("prefill", "decode"):
                rows[f"engine:{name}"] = _child(Path(a.engine) / "model.pt2", name, None)
                if dev != "cpu":
                    rows[f"engine-so:{name}"] = _child(Path(a.engine) / "model.pt2", name, None, code=_SO_CHILD)
    for case, r in rows.items():
        print(f"{case:16s} {r.get('status'):10s} rc={r.get('rc')}  {' | '.join(r.get('stderr_tail', [])[-3:])[:300]}")
    if a.json:
        Path(a.json).write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()

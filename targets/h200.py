"""The h200 target (sm_90, 141 GB): same kernels as h100, larger limits."""

from v4compile.targets.base import Target
from v4compile.targets.h100 import GPU_OPS

H200 = Target(
    name="h200", arch="sm_90", device="cuda", precisions=("bf16", "fp8"), kernel_policy="registry", tested=False,
    # production by default since session 8: the tiny fp8 production-layout engine built and passed its parity check
    # on an H100 (docs/perf/engines.md) once Inductor's coalescing tiling analysis was switched off (targets/aoti.py)
    kv_layouts=("reference", "production"), default_kv_layout="production", separate_decode=True,
    max_batch=512, max_len=1 << 20, ops=GPU_OPS,
    notes="built and checked on GPUs by hand (docs/perf/engines.md), not by CI (no GPU there)",
)

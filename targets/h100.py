"""The h100 target (sm_90): plugins/triton kernels where the registry has one, reference bodies elsewhere."""

from v4compile.targets.base import Target

GPU_OPS = ("v4::sparse_attention", "v4::compress", "v4::indexer_scores", "v4::topk_select", "v4::moe_route",
           "v4::moe_experts", "v4::sparse_attention_fp8", "v4::indexer_scores_fp4", "v4::compress_packed",
           "v4::sinkhorn", "v4::fp8_linear")

H100 = Target(
    name="h100", arch="sm_90", device="cuda", precisions=("bf16", "fp8"), kernel_policy="registry", tested=False,
    # production by default since session 8: the tiny fp8 production-layout engine built and passed its parity check
    # on an H100 (docs/perf/engines.md) once Inductor's coalescing tiling analysis was switched off (targets/aoti.py)
    kv_layouts=("reference", "production"), default_kv_layout="production", separate_decode=True,
    max_batch=256, max_len=1 << 20, ops=GPU_OPS,
    notes="built and checked on GPUs by hand (docs/perf/engines.md), not by CI (no GPU there)",
)

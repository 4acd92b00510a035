"""The h100 target (sm_90): plugins/triton kernels where the registry has one, reference bodies elsewhere."""

from v4compile.targets.base import Target

GPU_OPS = ("v4::sparse_attention", "v4::compress", "v4::indexer_scores", "v4::topk_select", "v4::moe_route",
           "v4::moe_experts", "v4::sparse_attention_fp8", "v4::indexer_scores_fp4")

H100 = Target(
    name="h100", arch="sm_90", device="cuda", precisions=("bf16", "fp8"), kernel_policy="registry", tested=False,
    # production by request only: AOTInductor's compile of a production-layout prefill failed on an H100 in session 6
    # (InductorError: AssertionError, traceback not captured) while the lowered program ran and matched eager
    kv_layouts=("reference", "production"), default_kv_layout="reference", separate_decode=True,
    max_batch=256, max_len=1 << 20, ops=GPU_OPS,
    notes="declarative only: not built or run by this project's tests (no GPU time left)",
)

"""The cpu target: every v4 op decomposed to aten, AOTInductor emits plain C++ (runs in CI and in v4run)."""

from v4compile.targets.base import Target

CPU = Target(
    name="cpu", arch="cpu", device="cpu", precisions=("fp32", "bf16"), kernel_policy="decompose", tested=True,
    kv_layouts=("reference", "production"), default_kv_layout="production", separate_decode=False,
    max_batch=64, max_len=1 << 16,
    notes="reference bodies traced to aten; MoE experts run dense (every expert on every token, masked); "
          "decode runs the prefill program at T=1 (no CUDA graphs on cpu; halves the AOTInductor build)",
)

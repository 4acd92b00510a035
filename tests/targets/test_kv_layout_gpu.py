"""The production KV layout on a GPU (skipped without one): eager bf16 on CUDA gives the same logits with a
production cache as with a reference one, and lowering for the GPU target composes the _fp8 fused ops from the
Triton kernels (sparse_attention_fp8, indexer_scores_fp4) with results within the bf16 bound of eager.
tiny with 64 RoPE dims (as V4): the kernels' row layout needs them; the 32 of plain tiny fall back."""

import os

import pytest
import torch

from v4compile.model.config import ModelConfig
from v4compile.model.reference import ReferenceModel
from v4compile.validate import TOLERANCES, calc_diff

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                 reason="needs a CUDA GPU (sm_90) and TRITON_INTERPRET unset")]

MAX_LEN = 64


def rope64() -> ModelConfig:
    return ModelConfig.preset("tiny", head_dim=128, rope_head_dim=64, index_head_dim=128)


@torch.no_grad()
def test_cuda_eager_logits_equal_in_both_layouts():
    torch.use_deterministic_algorithms(True, warn_only=True)  # MoE's index_add_ uses atomics otherwise
    try:
        for cfg in (ModelConfig.preset("tiny"), rope64()):
            model = ReferenceModel(cfg, dtype=torch.bfloat16, device="cuda").eval()
            caches = {lay: model.new_cache(2, MAX_LEN, lay) for lay in ("reference", "production")}
            g = torch.Generator().manual_seed(0)
            steps = [(torch.randint(0, cfg.vocab_size, (2, 21), generator=g), torch.tensor([0, 0]))]
            steps += [(torch.randint(0, cfg.vocab_size, (2, 1), generator=g), torch.tensor([21 + i, 21 + i]))
                      for i in range(12)]
            for tok, sp in steps:
                out = {lay: model(tok.cuda(), sp.cuda(), c) for lay, c in caches.items()}
                a, b = out["reference"], out["production"]
                assert torch.equal(a, b), (cfg.head_dim, sp.tolist(), calc_diff(a, b))
    finally:
        torch.use_deterministic_algorithms(False)


def test_lowering_for_the_gpu_target_uses_the_fp8_layout_kernels():
    from v4compile.graph.capture import capture, example_inputs
    from v4compile.graph.passes import run_pipeline
    from v4compile.targets import get_target, machine_arch
    from v4compile.targets.lower import lower

    if machine_arch() != "sm_90":
        pytest.skip(f"the GPU targets are sm_90; this GPU is {machine_arch()}")
    target = get_target("h200" if "H200" in torch.cuda.get_device_name(0) else "h100")
    model = ReferenceModel(rope64(), dtype=torch.bfloat16, device="cuda").eval()
    g = run_pipeline(capture(model, "prefill", max_len=MAX_LEN, kv_layout="production"), verify=True)
    ex = example_inputs(model, "prefill", 2, 37, MAX_LEN, "production")
    lo = lower(g, target, ex, 4)
    csa = lo.kernels["v4::csa_attention_fp8"]
    assert "sparse_attention_fp8=v4triton::sparse_attention_fp8" in csa, csa
    assert "indexer_scores_fp4=v4triton::indexer_scores_fp4" in csa, csa
    assert lo.kernels["v4::sparse_attention_fp8"] == "v4triton::sparse_attention_fp8"  # the window layers' node
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 29), generator=torch.Generator().manual_seed(3)).cuda()
    caches = [torch.zeros_like(c) for c in ex[2:]]
    with torch.no_grad():
        got = lo.program.module()(tokens, torch.zeros(2, dtype=torch.int64, device="cuda"), *caches)
        want = model(tokens, 0, model.new_cache(2, MAX_LEN, "production"))
    assert calc_diff(got, want) < TOLERANCES["model_logits"]["bf16"], calc_diff(got, want)

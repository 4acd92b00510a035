"""Lowering for a registry target: fused ops without a kernel of their own are composed from the registry
kernels of their parts (targets/lower.py _KernelTable), and the manifest names what each part got.

The real Triton kernels cannot be traced on CPU (the interpreter runs kernels on FakeTensors during export),
so a test-only target registers plain-torch stand-ins that count their calls; the GPU run of the real kernels
is recorded in docs/perf/engines.md.
"""

import pytest
import torch

from v4compile.graph.capture import capture, example_inputs
from v4compile.graph.passes import run_pipeline
from v4compile.model.config import ModelConfig
from v4compile.model.ops import BODIES
from v4compile.model.reference import ReferenceModel
from v4compile.plugins import registry
from v4compile.targets.base import Target
from v4compile.targets.lower import lower
from v4compile.validate import calc_diff

TEST_TARGET = Target(name="test-registry", arch="cpu", device="cpu", precisions=("fp32",), kernel_policy="registry",
                     tested=True, separate_decode=False)
MAX_LEN = 48


@pytest.fixture(scope="module")
def stand_ins():
    """Stand-in kernels for sparse_attention and compress on the test target (both counted while tracing)."""
    calls = {"sparse_attention": 0, "compress": 0}

    def counting(name):
        def fn(*args, **kwargs):
            calls[name] += 1
            return BODIES[name](*args, **kwargs)
        return fn

    registry.register_kernel("v4::sparse_attention", TEST_TARGET.name, name="test::sparse_attention")(
        counting("sparse_attention"))
    # only the CSA-ratio compressor: the HCA one must fall back to the reference body
    registry.register_kernel("v4::compress", TEST_TARGET.name, name="test::compress",
                             supports=lambda *a, **k: a[9] == 4)(counting("compress"))
    yield calls
    registry.unregister_kernel("v4::sparse_attention", TEST_TARGET.name, "test::sparse_attention")
    registry.unregister_kernel("v4::compress", TEST_TARGET.name, "test::compress")


def test_fused_ops_are_composed_from_registry_kernels(stand_ins, one_thread):
    model = ReferenceModel(ModelConfig.preset("tiny"), dtype=torch.float32).eval()
    g = run_pipeline(capture(model, "prefill", max_len=MAX_LEN))
    ex = example_inputs(model, "prefill", 2, 37, MAX_LEN)
    lo = lower(g, TEST_TARGET, ex, 4)

    cfg = model.cfg
    n_csa = sum(cfg.layer_kind(i) == "csa" for i in range(cfg.n_layers))
    # every layer's attention (fused CSA / HCA, and the plain op of window layers) used the registry kernel
    assert stand_ins["sparse_attention"] == cfg.n_layers
    assert stand_ins["compress"] == 2 * n_csa  # main + indexer compressor of each CSA layer, not HCA's
    csa = lo.kernels["v4::csa_attention"]
    assert csa.startswith("composed: ") and "sparse_attention=test::sparse_attention" in csa
    assert "compress=test::compress" in csa and "topk_select=reference" in csa
    assert "compress=reference," in lo.kernels["v4::hca_attention"] + ","  # ratio 16: the stand-in refused it

    tokens = torch.randint(0, cfg.vocab_size, (2, 29), generator=torch.Generator().manual_seed(3))
    caches = [torch.zeros_like(c) for c in ex[2:]]
    got = lo.program.module()(tokens, torch.zeros(2, dtype=torch.int64), *caches)
    want = model(tokens, 0, model.new_cache(2, MAX_LEN))
    assert calc_diff(got, want) < 1e-12


def test_e8m0_constants_are_widened_exactly():
    """GPU targets hand AOTInductor float32 scales (torch 2.11's AOTI runtime has no e8m0 dtype): exact values."""
    from v4compile.targets.lower import widen_e8m0_constants

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            codes = torch.tensor([0, 1, 100, 127, 128, 200, 254, 255], dtype=torch.uint8)
            self.register_buffer("scale", codes.view(torch.float8_e8m0fnu))
            self.weight = torch.nn.Parameter(torch.ones(8).to(torch.float8_e8m0fnu), requires_grad=False)

        def forward(self, x):
            return x * self.scale.float() + self.weight.float()

    x = torch.randn(3, 8)
    gm = torch.export.export(Scaled(), (x,)).module()
    want = gm(x)
    assert widen_e8m0_constants(gm) == 2
    got = gm(x)
    assert all(t.dtype != torch.float8_e8m0fnu for t in list(gm.buffers()) + list(gm.parameters()))
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())


@pytest.fixture
def packed_stand_ins():
    """Stand-ins for the production-layout primitives on the test target (counted while tracing)."""
    calls = {"sparse_attention_fp8": 0, "indexer_scores_fp4": 0, "compress_packed": 0}

    def counting(name):
        def fn(*args, **kwargs):
            calls[name] += 1
            return BODIES[name](*args, **kwargs)
        return fn

    for name in calls:
        registry.register_kernel(f"v4::{name}", TEST_TARGET.name, name=f"test::{name}")(counting(name))
    yield calls
    for name in calls:
        registry.unregister_kernel(f"v4::{name}", TEST_TARGET.name, f"test::{name}")


def test_production_layout_fused_ops_are_composed_from_registry_kernels(packed_stand_ins, one_thread):
    """csa_attention_fp8 / hca_attention_fp8 have no kernel of their own: lowering composes them from the
    registry kernels of compress_packed, indexer_scores_fp4 and sparse_attention_fp8; bit-identical to eager."""
    model = ReferenceModel(ModelConfig.preset("tiny"), dtype=torch.bfloat16).eval()
    max_len = 32
    g = run_pipeline(capture(model, "prefill", max_len=max_len, kv_layout="production"))
    ex = example_inputs(model, "prefill", 2, 19, max_len, "production")
    lo = lower(g, TEST_TARGET, ex, 2)
    cfg = model.cfg
    n_csa = sum(cfg.layer_kind(i) == "csa" for i in range(cfg.n_layers))
    assert packed_stand_ins["sparse_attention_fp8"] == cfg.n_layers
    assert packed_stand_ins["compress_packed"] == 2 * n_csa + 1 and packed_stand_ins["indexer_scores_fp4"] == n_csa
    csa = lo.kernels["v4::csa_attention_fp8"]
    for part in ("compress_packed=test::compress_packed", "indexer_scores_fp4=test::indexer_scores_fp4",
                 "sparse_attention_fp8=test::sparse_attention_fp8", "topk_select=reference"):
        assert part in csa, csa
    assert "compress_packed=test::compress_packed" in lo.kernels["v4::hca_attention_fp8"]
    assert lo.kernels["v4::sparse_attention_fp8"] == "test::sparse_attention_fp8"  # the window layer's own node

    tokens = torch.randint(0, cfg.vocab_size, (2, 21), generator=torch.Generator().manual_seed(3))
    caches = [torch.zeros_like(c) for c in ex[2:]]
    got = lo.program.module()(tokens, torch.zeros(2, dtype=torch.int64), *caches)
    want_cache = model.new_cache(2, max_len, "production")
    want = model(tokens, 0, want_cache)
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(caches, want_cache.named_tensors().values()))


@pytest.fixture
def sinkhorn_stand_in():
    """A stand-in v4::sinkhorn kernel (the reference body captured here, counted while tracing)."""
    calls = {"sinkhorn": 0}
    ref = BODIES["sinkhorn"]

    def fn(*args, **kwargs):
        calls["sinkhorn"] += 1
        return ref(*args, **kwargs)

    registry.register_kernel("v4::sinkhorn", TEST_TARGET.name, name="test::sinkhorn")(fn)
    yield calls
    registry.unregister_kernel("v4::sinkhorn", TEST_TARGET.name, "test::sinkhorn")


def test_hc_pre_gets_the_registry_sinkhorn(sinkhorn_stand_in, one_thread):
    """hc_pre (unfused op) calls sinkhorn through BODIES: lowering for a registry target resolves it through the
    registry too (one kernel for the whole normalisation instead of Inductor's per-step kernels); the manifest
    names it; without a kernel the reference body is composed in (same program as before)."""
    model = ReferenceModel(ModelConfig.preset("tiny"), dtype=torch.float32).eval()
    g = run_pipeline(capture(model, "decode", max_len=MAX_LEN))
    ex = example_inputs(model, "decode", 2, 1, MAX_LEN)
    before = BODIES["sinkhorn"]
    lo = lower(g, TEST_TARGET, ex, 4)
    assert BODIES["sinkhorn"] is before  # the replacement is undone after the export
    assert sinkhorn_stand_in["sinkhorn"] == 2 * model.cfg.n_layers  # attention and FFN maps of every layer
    assert lo.kernels["v4::hc_pre"] == "composed: sinkhorn=test::sinkhorn"
    registry.unregister_kernel("v4::sinkhorn", TEST_TARGET.name, "test::sinkhorn")
    lo2 = lower(run_pipeline(capture(model, "decode", max_len=MAX_LEN)), TEST_TARGET, ex, 4)
    assert lo2.kernels["v4::hc_pre"] == "composed: sinkhorn=reference"
    caches = [torch.zeros_like(c) for c in ex[2:]]
    tok, sp = torch.tensor([[5], [9]]), torch.tensor([3, 7])
    a = lo.program.module()(tok, sp, *[c.clone() for c in caches])
    b = lo2.program.module()(tok, sp, *[c.clone() for c in caches])
    assert torch.equal(a, b)

"""v4triton::sparse_attention against the model's reference op (torch.ops.v4.sparse_attention), V4-SPEC 3.4.

CPU runs use the Triton interpreter (conftest.py sets TRITON_INTERPRET and patches its bf16 bugs); outputs
are poisoned with NaN so an unwritten element fails the inf/NaN-position check.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import v4compile.model.ops  # noqa: E402,F401  (torch.ops.v4.sparse_attention: THE reference)
from v4compile.plugins.triton import sparse_attention as sa  # noqa: E402
from v4compile.quant.formats import fake_quant_fp8  # noqa: E402
from v4compile.quant.kv_layout import pack_kv_cache  # noqa: E402
from v4compile.validate import assert_kernel_close  # noqa: E402

CPU_CFG = sa.AttnConfig(16, 4, 1)


def _fq(x: torch.Tensor) -> torch.Tensor:
    """Rows as the model stores them (FP8 fake-quantised nope, RoPE untouched), bf16."""
    nope = x.shape[-1] - 64
    return torch.cat((fake_quant_fp8(x[..., :nope].float(), 64), x[..., nope:].float()), -1).to(torch.bfloat16)


def make_inputs(B, T, H, D, N, K, N2, K2, dtype=torch.bfloat16, seed=0, p_invalid=0.2):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g).to(dtype)
    kv = torch.randn(B, N, D, generator=g).to(dtype)
    kv2 = torch.randn(B, N2, D, generator=g).to(dtype)
    idx = torch.randint(0, max(N, 1), (B, T, K), generator=g, dtype=torch.int32)
    idx2 = torch.randint(0, max(N2, 1), (B, T, K2), generator=g, dtype=torch.int32)
    idx = torch.where(torch.rand(B, T, K, generator=g) < p_invalid, -1, idx).to(torch.int32)
    idx2 = torch.where(torch.rand(B, T, K2, generator=g) < p_invalid, -1, idx2).to(torch.int32)
    sink = torch.randn(H, generator=g)
    return q, kv, idx, kv2, idx2, sink, D**-0.5


def reference(*args):
    return torch.ops.v4.sparse_attention(*args)


def run_kernel(*args, num_splits=None, config=CPU_CFG):
    q = args[0]
    out = torch.full_like(q, float("nan"))
    return sa.sparse_attention_launch(*args, config=config, num_splits=num_splits, out=out)


SHAPES = [  # B, T, H, D, N, K, N2, K2
    (1, 1, 8, 96, 1, 1, 0, 0),  # one entry, no second source (window-only layer)
    (2, 3, 8, 96, 40, 17, 9, 5),
    (1, 2, 16, 128, 127, 33, 129, 17),  # awkward sizes around block multiples
    (1, 1, 64, 512, 129, 16, 300, 48),  # real head count and width, one decode token
    (2, 1, 20, 64, 3, 3, 257, 64),  # H not a power of two
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("splits", [1, 3])
def test_matches_reference_bf16(shape, splits):
    args = make_inputs(*shape)
    assert_kernel_close(run_kernel(*args, num_splits=splits), reference(*args), "bf16", f"bf16 {shape}")


@pytest.mark.parametrize("shape", SHAPES[1:3], ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_fp32_tightly(shape):
    args = make_inputs(*shape, dtype=torch.float32)
    out, ref = run_kernel(*args, num_splits=2), reference(*args)
    assert_kernel_close(out, ref, "fp32", f"fp32 {shape}")
    assert (out - ref).abs().max() < 1e-5  # same math in fp32: only summation order differs


def test_queries_without_valid_entries_are_zero_and_others_unaffected():
    q, kv, idx, kv2, idx2, sink, scale = make_inputs(2, 4, 8, 96, 30, 20, 10, 6, p_invalid=0.0)
    idx[0, 1] = -1
    idx2[0, 1] = -1  # no valid entry at all -> 0 (V4-SPEC 3.4)
    idx[1, 2] = -1  # only the second source is valid
    idx2[1, 3] = -1  # only the first source is valid
    idx[0, 3, ::2] = 29  # duplicates count twice, like the reference
    args = (q, kv, idx, kv2, idx2, sink, scale)
    out = run_kernel(*args, num_splits=2)
    assert torch.equal(out[0, 1], torch.zeros_like(out[0, 1]))
    assert_kernel_close(out, reference(*args), "bf16", "masked queries")


def test_large_sink_and_large_scores_stay_finite():
    q, kv, idx, kv2, idx2, sink, scale = make_inputs(1, 2, 16, 96, 20, 16, 20, 16)
    sink = torch.linspace(-30, 30, 16)  # sink dominating or negligible
    args = (q * 8, kv, idx, kv2, idx2, sink, scale)  # scores ~ 8x larger: online max must rescale
    out = run_kernel(*args, num_splits=2)
    assert torch.isfinite(out).all()
    assert_kernel_close(out, reference(*args), "bf16", "large sink/scores")


def test_split_counts_agree():
    args = make_inputs(1, 2, 16, 128, 200, 96, 50, 40)
    one = run_kernel(*args, num_splits=1)
    for s in (2, 5, 100):  # 100 > number of blocks: clamped
        assert_kernel_close(run_kernel(*args, num_splits=s), one, "bf16", f"splits={s}")


def test_strided_sources_are_read_correctly():
    """A compressed cache slice [:, :n] (non-contiguous rows) and a ring view, as the model passes them."""
    q, kv, idx, kv2, idx2, sink, scale = make_inputs(2, 1, 8, 96, 24, 16, 40, 8)
    big = torch.randn(2, 64, 96).to(torch.bfloat16)
    big[:, :40] = kv2
    args = (q, kv, idx, big[:, :40], idx2, sink, scale)
    assert big[:, :40].stride(1) == 96 and not big[:, :40].is_contiguous()
    assert_kernel_close(run_kernel(*args), reference(q, kv, idx, kv2, idx2, sink, scale), "bf16", "strided kv2")


@pytest.mark.parametrize("D", [128, 192])
def test_fp8_layout_kernel_equals_bf16_kernel(D):
    q, kv, idx, kv2, idx2, sink, scale = make_inputs(2, 3, 16, D, 37, 20, 11, 6)
    kv, kv2 = _fq(kv.float()), _fq(kv2.float())
    (d1, s1), (d2, s2) = pack_kv_cache(kv), pack_kv_cache(kv2)
    out8 = sa.sparse_attention_fp8_launch(q, d1, s1, idx, d2, s2, idx2, sink, scale, config=CPU_CFG,
                                          num_splits=2, out=torch.full_like(q, float("nan")))
    out = run_kernel(q, kv, idx, kv2, idx2, sink, scale, num_splits=2)
    assert torch.equal(out8, out)  # dequantised rows are exactly the fake-quantised bf16 rows
    assert_kernel_close(out8, reference(q, kv, idx, kv2, idx2, sink, scale), "bf16", f"fp8 layout D={D}")


def test_triton_op_runs_and_matches():
    args = make_inputs(1, 2, 8, 96, 20, 16, 10, 4)
    assert_kernel_close(torch.ops.v4triton.sparse_attention(*args), reference(*args), "bf16", "triton_op")


@pytest.mark.parametrize("bad, match", [
    (dict(idx=lambda t: t.long()), "idx must be int32"),
    (dict(kv=lambda t: t[..., :64]), "kv must be"),
    (dict(kv2=lambda t: t.float()), "kv2 dtype"),
    (dict(sink=lambda t: t[:3]), "sink must be float32"),
    (dict(q=lambda t: t[0]), r"q must be \[B, T, H, D\]"),
    (dict(idx2=lambda t: t[:, :1]), "idx2 must be"),
    (dict(kv=lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)), "contiguous in its last dim"),
])
def test_launcher_rejects_bad_inputs(bad, match):
    names = ("q", "kv", "idx", "kv2", "idx2", "sink")
    args = dict(zip(names, make_inputs(1, 2, 8, 96, 20, 16, 10, 4)[:6]))
    for k, f in bad.items():
        args[k] = f(args[k])
    with pytest.raises(ValueError, match=match):
        sa.sparse_attention_launch(*(args[n] for n in names), 96**-0.5)


def test_registered_for_gpu_targets_with_capability_check():
    from v4compile.errors import UnsupportedOpError
    from v4compile.plugins.registry import lookup, select_kernels

    meta = [t.to("meta") if isinstance(t, torch.Tensor) else t for t in make_inputs(1, 2, 8, 96, 20, 16, 10, 4)]
    assert lookup("v4::sparse_attention", "h200", *meta) is None  # not a CUDA tensor: unsupported
    with pytest.raises(UnsupportedOpError, match="sparse_attention"):
        select_kernels([("attn0", "v4::sparse_attention", tuple(meta), {})], "h100")

    class FakeCuda:  # only what the predicate reads
        def __init__(self, t):
            self.device, self.dtype, self.shape = torch.device("cuda"), t.dtype, t.shape

        def dim(self):
            return len(self.shape)

    fake = [FakeCuda(t) if isinstance(t, torch.Tensor) else t for t in meta]
    for target in ("h100", "h200"):
        entry = lookup("v4::sparse_attention", target, *fake)
        assert entry is not None and entry.fn is torch.ops.v4triton.sparse_attention.default


# ------------------------------------------------------------------------------ on the GPU, real V4 shapes

gpu = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                         reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("B, T, N2, K2", [(4, 1, 1024, 512), (1, 1, 8192, 8192), (1, 300, 75, 64)])
def test_gpu_real_shapes(B, T, N2, K2):
    args = make_inputs(B, T, 64, 512, 129 + T, 128, N2, K2)
    args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    q, kv, idx, kv2, idx2, sink, scale = args
    kv, kv2 = _fq(kv.float()), _fq(kv2.float())
    args = (q, kv, idx, kv2, idx2, sink, scale)
    ref = reference(*args)
    out = sa.sparse_attention_launch(*args, out=torch.full_like(q, float("nan")))
    assert_kernel_close(out, ref, "bf16", f"gpu {B}x{T} N2={N2}")
    (d1, s1), (d2, s2) = pack_kv_cache(kv), pack_kv_cache(kv2)
    out8 = sa.sparse_attention_fp8_launch(q, d1, s1, idx, d2, s2, idx2, sink, scale,
                                          out=torch.full_like(q, float("nan")))
    assert_kernel_close(out8, ref, "bf16", f"gpu fp8 layout {B}x{T} N2={N2}")


@pytest.mark.gpu
@gpu
def test_gpu_export_keeps_the_op_and_runs():
    """torch.export keeps v4triton::sparse_attention as one node (AOTInductor lowers its wrap_triton body)."""

    class Attn(torch.nn.Module):
        def forward(self, q, kv, idx, kv2, idx2, sink):
            return torch.ops.v4triton.sparse_attention(q, kv, idx, kv2, idx2, sink, 512**-0.5)

    args = tuple(a.cuda() for a in make_inputs(2, 1, 64, 512, 129, 128, 256, 64)[:6])
    ep = torch.export.export(Attn(), args)
    assert "v4triton.sparse_attention.default" in str(ep.graph)
    assert_kernel_close(ep.module()(*args), reference(*args, 512**-0.5), "bf16", "exported")


_TRACE_SCRIPT = """
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from v4compile.plugins.triton import sparse_attention as sa
B, T, H, D = 2, 1, 16, 128
q = torch.randn(B, T, H, D).bfloat16(); kv = torch.randn(B, 40, D).bfloat16(); kv2 = torch.randn(B, 20, D).bfloat16()
idx = torch.zeros(B, T, 16, dtype=torch.int32); idx2 = torch.zeros(B, T, 8, dtype=torch.int32); sink = torch.zeros(H)
f = lambda *a: sa.sparse_attention_launch(*a, 0.1, num_splits=2)
gm = make_fx(f, tracing_mode="fake")(q, kv, idx, kv2, idx2, sink)
print(",".join(str(n.target) for n in gm.graph.nodes if n.op == "call_function"))
"""


def test_tracing_records_both_kernels_as_wrap_triton_nodes():
    """Under tracing the launcher must go through wrap_triton (direct launches only for plain eager tensors).

    Runs in a subprocess without TRITON_INTERPRET: interpreted kernels cannot be traced; the kernel never
    executes here (fake tensors), so no GPU is needed."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _TRACE_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    targets = res.stdout.strip().splitlines()[-1].split(",")
    assert targets.count("triton_kernel_wrapper_mutation") == 2, targets  # attention + combine


def test_one_tensor_as_both_sources_is_accepted():
    """kv2 / idx2 may be the caller's kv / idx object itself (read-only): the launch passes a second view, which
    the launch guard (one tensor never two pointer arguments) accepts; same result as two copies."""
    from v4compile.plugins.triton.sparse_attention import sparse_attention_launch

    g = torch.Generator().manual_seed(0)
    B, T, H, D, N, K = 1, 3, 4, 64, 8, 4
    q = torch.randn(B, T, H, D, generator=g)
    kv = torch.randn(B, N, D, generator=g)
    idx = torch.randint(0, N, (B, T, K), generator=g, dtype=torch.int32)
    sink = torch.zeros(H)
    same = sparse_attention_launch(q, kv, idx, kv, idx, sink, 0.125)
    copies = sparse_attention_launch(q, kv, idx, kv.clone(), idx.clone(), sink, 0.125)
    assert torch.equal(same, copies)

"""v4triton::sinkhorn against the v4::sinkhorn reference body (TRITON_INTERPRET on CPU), output NaN-poisoned."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from v4compile.model import ops as v4ops
from v4compile.plugins.triton import mhc
from v4compile.validate import assert_kernel_close, calc_diff

REF = v4ops.BODIES["sinkhorn"]


@pytest.mark.parametrize("lead,hc,iters", [((3, 5), 4, 20), ((1,), 4, 1), ((2, 1, 7), 2, 3), ((300,), 4, 20),
                                           ((5,), 8, 6), ((1, 1), 1, 2)])
def test_sinkhorn_matches_the_reference(lead, hc, iters):
    g = torch.Generator().manual_seed(hc * 100 + iters)
    logits = torch.randn(*lead, hc, hc, generator=g) * 3
    want = REF(logits, iters, 1e-6)
    out = torch.full_like(logits, float("nan"))
    got = mhc.sinkhorn_launch(logits, iters, 1e-6, out=out)
    assert got is out and torch.isfinite(got).all()
    assert_kernel_close(got, want, "fp32", f"sinkhorn {lead} hc={hc} iters={iters}")
    assert torch.allclose(got.sum(-2), torch.ones(()), atol=1e-4)  # column sums 1 after the last column step


def test_non_contiguous_logits_and_the_registered_op():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 6, 4, 4, generator=g).transpose(0, 1)  # [6, 4, hc, hc], not contiguous
    want = REF(logits, 20, 1e-6)
    got = torch.ops.v4triton.sinkhorn(logits, 20, 1e-6)
    assert calc_diff(got, want) < 1e-10 and got.shape == logits.shape


def test_extreme_logits_stay_finite_like_the_reference():
    logits = torch.tensor([[[80.0, -80.0, 0.0, 0.0], [0.0] * 4, [-1e4, 1e4, 3.0, -3.0], [1e-30] * 4]])
    want, got = REF(logits, 20, 1e-6), mhc.sinkhorn_launch(logits, 20, 1e-6)
    assert torch.isfinite(got).all() and calc_diff(got, want) < 1e-10


@pytest.mark.parametrize("bad,match", [
    (dict(logits=torch.zeros(2, 4, 3)), r"\[\.\.\., hc, hc\]"),
    (dict(logits=torch.zeros(2, 3, 3)), "power of two"),
    (dict(logits=torch.zeros(2, 4, 4, dtype=torch.bfloat16)), "float32"),
    (dict(iters=0), "iters"),
    (dict(eps=1), "eps"),
])
def test_input_errors(bad, match):
    args = dict(logits=torch.zeros(2, 4, 4), iters=20, eps=1e-6)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        mhc.sinkhorn_launch(**args)
    assert not mhc.supports_sinkhorn(*args.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs a CUDA GPU and TRITON_INTERPRET=0")
def test_sinkhorn_gpu_at_decode_and_prefill_sizes():
    """V4 hc = 4, 20 iterations: one token (decode) and 64K tokens x 2 maps, against the reference on the GPU."""
    for n in (1, 2 * 65536):
        logits = torch.randn(n, 4, 4, device="cuda") * 3
        assert_kernel_close(torch.ops.v4triton.sinkhorn(logits, 20, 1e-6), REF(logits, 20, 1e-6), "fp32",
                            f"sinkhorn gpu n={n}")

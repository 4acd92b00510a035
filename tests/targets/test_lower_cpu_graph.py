"""The cpu lowering's graph-size measures: Sinkhorn as one while_loop, export's `.to()` noise removed."""

from __future__ import annotations

import pytest
import torch

from v4compile.model.ops import BODIES
from v4compile.targets.lower import drop_export_noise, sinkhorn_loop


@pytest.mark.parametrize("shape", [(3, 7, 4, 4), (1, 1, 4, 4), (2, 5, 3, 3)])
@pytest.mark.parametrize("iters", [1, 2, 20])
def test_sinkhorn_loop_is_bit_identical_to_the_reference_body(shape, iters):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(iters)) * 3
    assert torch.equal(sinkhorn_loop(x, iters, 1e-6), BODIES["sinkhorn"](x, iters, 1e-6))


def test_sinkhorn_loop_exports_as_one_loop_whatever_the_iteration_count():
    class M(torch.nn.Module):
        def __init__(self, iters):
            super().__init__()
            self.iters = iters

        def forward(self, x):
            return sinkhorn_loop(x, self.iters, 1e-6)

    x = torch.randn(2, 3, 4, 4)
    sizes = [len(torch.export.export(M(n), (x,)).graph.nodes) for n in (3, 20)]
    assert sizes[0] == sizes[1]  # the unrolled body grows by 6 nodes per iteration


class _Casts(torch.nn.Module):
    def forward(self, x, y):
        a = x.float() * 2  # x is already float32: a no-op cast
        b = y.to(torch.bfloat16)  # a real cast, kept
        return a + b.float(), b


def test_drop_export_noise_removes_metadata_asserts_and_no_op_casts_only():
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    ep = torch.export.export(_Casts(), (x, y))
    targets = lambda: [n.target for n in ep.graph.nodes if n.op == "call_function"]  # noqa: E731
    to_before = targets().count(torch.ops.aten.to.dtype)
    dropped = drop_export_noise(ep)
    after = targets()
    assert torch.ops.aten._assert_tensor_metadata.default not in after
    assert after.count(torch.ops.aten.to.dtype) == to_before - 1  # x.float() gone, both bf16 <-> f32 casts kept
    assert dropped >= 1
    out, ref = ep.module()(x, y), _Casts()(x, y)
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(out, ref))

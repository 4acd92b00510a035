"""plugins/triton/launch.py: one tensor passed as two pointer arguments is refused before any launch (traced through
wrap_triton, functionalisation would give each argument its own buffer and lose one's stores: session 7's
AOTInductor-compiled indexer scores were garbage that way)."""

import pytest
import torch

from v4compile.plugins.triton.launch import launcher, unused_arg


class _Kernel:
    """Stands in for a @triton.jit kernel: records launches."""

    def __init__(self) -> None:
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args))


def test_same_tensor_twice_is_refused_and_distinct_dummies_pass():
    k = _Kernel()
    scores = torch.zeros(4)
    with pytest.raises(ValueError, match="arguments 0 and 2 are the same tensor"):
        launcher(k)[(1,)](scores, 3, scores)
    assert k.calls == []
    launcher(k)[(1,)](scores, 3, unused_arg(scores.device), unused_arg(scores.device))  # two dummies: distinct
    assert len(k.calls) == 1
    views = (scores[:2], scores[2:])  # distinct tensor objects (views) are the kernels' own business
    launcher(k)[(1,)](*views)
    assert len(k.calls) == 2

"""How every Triton kernel here is launched: directly when eager, through `wrap_triton` while tracing."""

from __future__ import annotations

from typing import Any

import torch

FORCE_WRAP = False  # tests: launch through torch.library.wrap_triton even when not tracing


def _tracing(tensors: tuple[Any, ...]) -> bool:
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return (FORCE_WRAP or torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None
            or any(isinstance(t, torch.Tensor) and type(t) is not torch.Tensor for t in tensors))


class _Launch:
    """`launcher(kernel)[grid](*args)`: decides at the call, looking at every argument of the launch."""

    def __init__(self, kernel, tensors: tuple[Any, ...]) -> None:
        self.kernel, self.tensors = kernel, tensors

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            if _tracing(self.tensors + args + tuple(kwargs.values())):
                return torch.library.wrap_triton(self.kernel)[grid](*args, **kwargs)
            return self.kernel[grid](*args, **kwargs)

        return run


def launcher(kernel, *tensors: torch.Tensor) -> _Launch:
    """`kernel` itself for eager calls on plain tensors; `torch.library.wrap_triton(kernel)` while tracing
    (a dispatch mode is active, or any launch argument is a FakeTensor / FunctionalTensor / other subclass).

    Outside a triton_op body, `wrap_triton(k)[grid](...)` dispatches through a higher-order op that cost ~0.2 ms
    per launch on the H200 (measured); under torch.export / torch.compile / fake tensors the wrapper is required
    so that the launch is recorded in the graph (and AOTInductor embeds the kernel).
    """
    return _Launch(kernel, tensors)

"""How every Triton kernel here is launched: directly when eager, through `wrap_triton` while tracing."""

from __future__ import annotations

import torch

FORCE_WRAP = False  # tests: launch through torch.library.wrap_triton even when not tracing


def launcher(kernel, *tensors: torch.Tensor):
    """`kernel` itself for eager calls on plain tensors; `torch.library.wrap_triton(kernel)` while tracing.

    Outside a triton_op body, `wrap_triton(k)[grid](...)` dispatches through a higher-order op that cost ~0.2 ms
    per launch on the H200 (measured); under torch.export / torch.compile / fake tensors the wrapper is required
    so that the launch is recorded in the graph (and AOTInductor embeds the kernel).
    """
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    tracing = (FORCE_WRAP or torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None
               or any(type(t) is not torch.Tensor for t in tensors))
    return torch.library.wrap_triton(kernel) if tracing else kernel

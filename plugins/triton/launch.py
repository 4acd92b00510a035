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
            _check_distinct(self.kernel, args)
            if _tracing(self.tensors + args + tuple(kwargs.values())):
                return torch.library.wrap_triton(self.kernel)[grid](*args, **kwargs)
            return self.kernel[grid](*args, **kwargs)

        return run


def _check_distinct(kernel, args: tuple[Any, ...]) -> None:
    """One tensor object passed as two pointer arguments is refused, in eager calls too (where it would work):
    traced through `wrap_triton`, functionalisation treats each argument the kernel may store to as its own
    buffer, so one of the two becomes a copy and the other's stores can be lost. Session 7: the indexer score
    kernel got `scores` as its unused workspace too, and its AOTInductor-compiled scores were garbage (calc_diff
    1.0 vs the eager launch) while eager launches were exact (docs/perf/engines.md)."""
    seen: dict[int, int] = {}
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            j = seen.setdefault(id(a), i)
            if j != i:
                name = getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel))
                raise ValueError(f"{name}: arguments {j} and {i} are the same tensor; pass a distinct (dummy) "
                                 "tensor for an argument the kernel does not use (see plugins/triton/launch.py)")


def accepts(check, *args) -> bool:
    """Whether a launcher's input `check` accepts these arguments (the kernel registry's `supports` predicates:
    real tensors or the FakeTensors of an FX node; a check raises ValueError / TypeError / AttributeError)."""
    try:
        check(*args)
    except (ValueError, TypeError, AttributeError):
        return False
    return True


def unused_arg(device: torch.device, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """A one-element tensor for a pointer argument that a kernel's constexpr flags leave unused."""
    return torch.empty(1, dtype=dtype, device=device)


def launcher(kernel, *tensors: torch.Tensor) -> _Launch:
    """`kernel` itself for eager calls on plain tensors; `torch.library.wrap_triton(kernel)` while tracing
    (a dispatch mode is active, or any launch argument is a FakeTensor / FunctionalTensor / other subclass).

    Outside a triton_op body, `wrap_triton(k)[grid](...)` dispatches through a higher-order op that cost ~0.2 ms
    per launch on the H200 (measured); under torch.export / torch.compile / fake tensors the wrapper is required
    so that the launch is recorded in the graph (and AOTInductor embeds the kernel).
    """
    return _Launch(kernel, tensors)

"""Building blocks of the reference model: tensors declared from the schema, linears, norms, op dispatch.

Every module takes `(spec, prefix)`: `spec` maps state_dict keys to TensorSpec (the model schema, or its
float variant for quantized=False) and the module registers exactly the keys under `prefix`, so the
model's state_dict equals the schema by construction. Float tensors (bf16 / fp32) are Parameters; quantised
storage (e4m3, e8m0, packed int8) and integer tables are buffers. All start with requires_grad=False.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from v4compile.model import ops as v4ops
from v4compile.model.numerics import linear_acc
from v4compile.model.schema import TensorSpec
from v4compile.quant.formats import dequant_fp8_block

FP8 = torch.float8_e4m3fn
_QUANT_STORAGE = (torch.float8_e4m3fn, torch.float8_e8m0fnu, torch.int8)


class OpTable:
    """Resolves op names to torch.ops.v4.* (default: one graph node each) or, when `differentiable`, to the
    plain bodies of ops.BODIES (autograd flows through them; used for training with quantized=False)."""

    def __init__(self) -> None:
        self.differentiable = False

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return v4ops.BODIES[name] if self.differentiable else getattr(torch.ops.v4, name)


def declare(module: nn.Module, attr: str, spec: dict[str, TensorSpec], key: str,
            device: torch.device | str | None) -> None:
    """Register tensor `key` of the schema as `module.<attr>` (empty; the model loads values afterwards)."""
    ts = spec[key]
    t = torch.empty(ts.shape, dtype=ts.dtype, device=device)
    if ts.dtype in _QUANT_STORAGE or not ts.dtype.is_floating_point:
        module.register_buffer(attr, t)
    else:
        module.register_parameter(attr, nn.Parameter(t, requires_grad=False))


class Linear(nn.Module):
    """y = x W^T: FP8 weights (e4m3 + 128x128 scales) through v4::fp8_linear, plain weights through linear_acc."""

    def __init__(self, spec: dict[str, TensorSpec], prefix: str, ops: OpTable, device=None) -> None:
        super().__init__()
        self.ops = ops
        declare(self, "weight", spec, f"{prefix}.weight", device)
        self.quantized = f"{prefix}.scale" in spec
        if self.quantized:
            declare(self, "scale", spec, f"{prefix}.scale", device)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., in] act -> [..., out] act."""
        if self.quantized:
            return self.ops.fp8_linear(x, self.weight, self.scale)
        return linear_acc(x, self.weight, x.dtype).to(x.dtype)

    def forward_fp32(self, x: Tensor) -> Tensor:
        """x [..., in] act -> float32 [..., out] with the weight upcast (compressor projections, section 4.1)."""
        return linear_acc(x, self.dense(torch.float32), x.dtype)

    def dense(self, dtype: torch.dtype) -> Tensor:
        """The weight as a plain `dtype` matrix (FP8 dequantised; exact in bf16 for e4m3 x power-of-two)."""
        if self.quantized:
            return dequant_fp8_block(self.weight, self.scale, block=(128, 128)).to(dtype)
        return self.weight.to(dtype)


class RMSNorm(nn.Module):
    """weight * x * rsqrt(mean(x^2) + eps), fp32 compute, result in the input dtype (v4::rms_norm)."""

    def __init__(self, spec: dict[str, TensorSpec], prefix: str, eps: float, ops: OpTable, device=None) -> None:
        super().__init__()
        self.ops, self.eps = ops, eps
        declare(self, "weight", spec, f"{prefix}.weight", device)

    def forward(self, x: Tensor) -> Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)


class Embedding(nn.Module):
    """Token table [V, d] (bf16 in the checkpoint); lookup cast to the activation dtype."""

    def __init__(self, spec: dict[str, TensorSpec], prefix: str, device=None) -> None:
        super().__init__()
        declare(self, "weight", spec, f"{prefix}.weight", device)

    def forward(self, tokens: Tensor, dtype: torch.dtype) -> Tensor:
        return F.embedding(tokens, self.weight).to(dtype)

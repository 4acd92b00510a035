"""The reference model's seeded weights: the random official-format checkpoint, keyed like its state_dict.

There is one random initialiser (`random_weights.random_tensors`: per-tensor generators, the scaling is
documented there). `quantized=False` gives the same checkpoint with every FP8/FP4 weight dequantised exactly
to float32 (that variant then skips the FP8 activation quantisation of the linears, see ReferenceModel).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from v4compile.model.config import ModelConfig
from v4compile.model.random_weights import random_tensors, stack_experts
from v4compile.model.schema import TensorSpec, model_key, model_schema
from v4compile.quant.formats import dequant_fp4_block, dequant_fp8_block

_QUANT = (torch.float8_e4m3fn, torch.int8)


def _logical_shape(spec: TensorSpec) -> tuple[int, ...]:
    """Unpacked shape of a weight (packed FP4 stores two values per int8)."""
    if spec.dtype == torch.int8:
        return (*spec.shape[:-1], 2 * spec.shape[-1])
    return spec.shape


def reference_schema(cfg: ModelConfig, quantized: bool = True) -> dict[str, TensorSpec]:
    """The ReferenceModel's state_dict: `model_schema(cfg)`, or with quantized=False every FP8/FP4 weight as
    float32 of its logical shape and no `.scale` tensors (other tensors keep their schema dtypes)."""
    spec = model_schema(cfg)
    if quantized:
        return spec
    out: dict[str, TensorSpec] = {}
    for key, ts in spec.items():
        if key.endswith(".scale"):
            continue
        out[key] = TensorSpec(_logical_shape(ts), torch.float32) if ts.dtype in _QUANT else ts
    return out


def iter_init(cfg: ModelConfig, seed: int = 0, quantized: bool = True, device: str | torch.device = "cpu"
              ) -> Iterator[tuple[str, int | None, Tensor]]:
    """(model key, expert index or None, tensor), one tensor at a time, in checkpoint order, drawn on `device`
    (values depend on its type: random_tensors)."""
    pending: tuple[str, int | None, Tensor] | None = None  # a quantised weight waiting for its scale
    for name, t in random_tensors(cfg, seed, device):
        key, e = model_key(name)
        if quantized:
            yield key, e, t
        elif t.dtype in _QUANT:
            pending = (key, e, t)
        elif pending is not None and key == pending[0].removesuffix(".weight") + ".scale":
            wkey, we, w = pending
            pending = None
            yield wkey, we, (dequant_fp4_block(w, t) if w.dtype == torch.int8 else dequant_fp8_block(w, t))
        else:
            yield key, e, t
    assert pending is None, f"{pending[0]} had no scale"


def init_state_dict(cfg: ModelConfig, seed: int = 0, quantized: bool = True) -> dict[str, Tensor]:
    """Seeded weights keyed like ReferenceModel.state_dict() (`reference_schema(cfg, quantized)`), on the CPU."""
    return stack_experts(iter_init(cfg, seed, quantized), reference_schema(cfg, quantized))

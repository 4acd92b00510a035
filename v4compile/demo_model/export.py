"""Trained float weights -> the official checkpoint format (FP8 / MXFP4 / BF16 as the config says)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from v4compile.errors import CheckpointError
from v4compile.model.checkpoint import save_state_dict
from v4compile.model.config import ModelConfig
from v4compile.model.schema import TensorSpec, model_schema
from v4compile.quant.formats import quant_fp4_block, quant_fp8_block

FP8, E8M0 = torch.float8_e4m3fn, torch.float8_e8m0fnu


def _encode(key: str, w: Tensor, spec: TensorSpec, scale: TensorSpec | None) -> list[tuple[str, Tensor]]:
    base = key.removesuffix(".weight")
    if scale is None:
        if spec.dtype.is_floating_point:
            return [(key, w.detach().cpu().to(spec.dtype))]
        return [(key, w.detach().cpu().clone())]  # integer tables (tid2eid)
    if spec.dtype == FP8 and scale.dtype == E8M0:
        q, s = quant_fp8_block(w.detach().float().cpu(), (128, 128), scale_fmt="ue8m0")
    elif spec.dtype == FP8 and scale.dtype == torch.float32:
        q, s = quant_fp8_block(w.detach().float().cpu(), (128, 128), scale_fmt="fp32")
    elif spec.dtype == torch.int8 and scale.dtype == E8M0:
        q, s = quant_fp4_block(w.detach().float().cpu(), 32)
    else:
        raise CheckpointError(f"{key}: no encoder for {spec} with scale {scale}")
    return [(key, q), (f"{base}.scale", s)]


def quantize_state(float_state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """A quantized=False reference state dict (float weights) -> a state dict of `model_schema(cfg)`."""
    schema = model_schema(cfg)
    out: dict[str, Tensor] = {}
    for key, spec in schema.items():
        if key.endswith(".scale") and key.removesuffix(".scale") + ".weight" in schema:
            continue
        if key not in float_state:
            raise CheckpointError(f"trained state lacks {key} (config mismatch?)")
        scale = schema.get(key.removesuffix(".weight") + ".scale") if key.endswith(".weight") else None
        for k, t in _encode(key, float_state[key], spec, scale):
            if tuple(t.shape) != tuple(schema[k].shape) or t.dtype != schema[k].dtype:
                raise CheckpointError(f"{k}: encoded {t.dtype} {list(t.shape)}, schema wants {schema[k]}")
            out[k] = t.cpu()
    return out


def write_demo_checkpoint(float_state: dict[str, Tensor], cfg: ModelConfig, path: str | Path,
                          weight_dtype: str, expert_dtype: str) -> Path:
    """Write the trained weights as an official checkpoint with the given storage formats (overwrites)."""
    out_cfg = cfg.replace(weight_dtype=weight_dtype, expert_dtype=expert_dtype, torch_dtype="bfloat16")
    return save_state_dict(quantize_state(float_state, out_cfg), out_cfg, path, overwrite=True)

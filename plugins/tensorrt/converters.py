"""Torch-TensorRT route: converters from the functional v4trt ops to their plugins, compile, save as .pt2.

Torch-TensorRT's generate_plugin_converter maps the torch op "<ns>::<name>" to the registered TensorRT plugin of
the same id, which is why the plugins use the functional ops' namespace (specs.NAMESPACE). Everything else in the
lowered program (aten) goes through Torch-TensorRT's own converters. Written to the documented torch_tensorrt 2.x
API; not executable on this project's machines (no torch_tensorrt, no TensorRT).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from v4compile.errors import TargetError
from v4compile.plugins.tensorrt.specs import SPECS

_CONVERTERS: set[str] = set()


def register_converters(bodies: dict[str, Any]) -> list[str]:
    """Register the v4 plugins (JIT bodies: plugin name -> functional body) and one generated Torch-TensorRT
    converter per plugin op (idempotent)."""
    try:
        from torch_tensorrt.dynamo.conversion.plugins import generate_plugin_converter
    except Exception as e:
        raise TargetError(f"the Torch-TensorRT route needs torch_tensorrt >= 2.6 ({type(e).__name__}: {e})") from e
    from v4compile.plugins.tensorrt.trt_plugins import register_plugins

    register_plugins(bodies)
    done = []
    for spec in SPECS.values():
        if spec.plugin_id not in _CONVERTERS:
            generate_plugin_converter(spec.plugin_id, supports_dynamic_shapes=True)
            _CONVERTERS.add(spec.plugin_id)
            done.append(spec.plugin_id)
    return done


def input_ranges(example: tuple[Any, ...], max_batch: int, max_len: int) -> list[Any]:
    """torch_tensorrt.Input per program input: batch 1..max_batch, tokens length 1..max_len, other dims static."""
    import torch_tensorrt

    out = []
    for i, t in enumerate(example):
        lo, opt, hi = list(t.shape), list(t.shape), list(t.shape)
        lo[0], hi[0] = 1, max_batch
        if i == 0:  # tokens [B, T]
            lo[1], hi[1] = 1, max_len
        out.append(torch_tensorrt.Input(min_shape=lo, opt_shape=opt, max_shape=hi, dtype=t.dtype))
    return out


def compile_and_save(program: Any, example: tuple[Any, ...], path: Path, bodies: dict[str, Any], *, precision: str,
                     max_batch: int, max_len: int) -> Path:
    """torch_tensorrt.dynamo.compile the functional lowered program (explicitly typed: the graph's dtypes decide),
    then torch_tensorrt.save as an AOTInductor package."""
    import torch_tensorrt

    register_converters(bodies)
    inputs = input_ranges(example, max_batch, max_len)
    try:
        trt_gm = torch_tensorrt.dynamo.compile(program, arg_inputs=inputs, use_explicit_typing=True,
                                               min_block_size=1)
        cuda_example = [t.cuda() for t in example]
        torch_tensorrt.save(trt_gm, str(path), output_format="aot_inductor", retrace=True, arg_inputs=cuda_example)
    except Exception as e:
        raise TargetError(f"Torch-TensorRT compile/save failed ({precision}): {type(e).__name__}: {e}") from e
    return path

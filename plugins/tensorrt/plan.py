"""TensorRT plan from a tensorrt-target model.onnx (TensorRT >= 10.9; not executable on this project's machines).

The ONNX file carries each plugin node twice over: the node (domain "v4.trt", op_type = plugin name, attributes
plugin_version / plugin_namespace) and a local function with its reference semantics for onnxruntime. TensorRT's
parser would inline a local function of the same name, so the functions are dropped before parsing: unknown op
types then go to the parser's plugin importer, which finds v4trt::<name> in the registry (registered here).
The network is strongly typed (the ONNX types decide every layer's precision); one optimization profile spans
batch 1..max_batch and length 1..max_len from the manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from v4compile.errors import ExportError, TargetError


def profile_shapes(name: str, shape: list[int], max_batch: int, max_len: int) -> tuple[tuple, tuple, tuple]:
    """(min, opt, max) of one network input: dim 0 is the batch, dim 1 of `tokens` the length, others static."""
    dims = list(shape)
    lo, opt, hi = list(dims), list(dims), list(dims)
    lo[0], opt[0], hi[0] = 1, max(1, max_batch // 2), max_batch
    if name == "tokens":
        lo[1], opt[1], hi[1] = 1, max(1, max_len // 2), max_len
    for d in (lo, opt, hi):
        if any(x < 0 for x in d):
            raise ExportError(f"network input {name} {shape}: a dynamic dim other than batch / length")
    return tuple(lo), tuple(opt), tuple(hi)


def build_serialized_plan(onnx_path: Path, manifest: dict[str, Any], bodies: dict[str, Any], *,
                          workspace_gib: float | None = None) -> bytes:
    """Register the plugins (JIT bodies: plugin name -> functional body), parse, build; returns the plan bytes."""
    import onnx
    import tensorrt as trt

    from v4compile.plugins.tensorrt.trt_plugins import register_plugins

    register_plugins(bodies)
    model = onnx.load(str(onnx_path), load_external_data=False)
    del model.functions[:]  # plugin nodes must reach the plugin importer, not their reference functions
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString(), str(onnx_path)):  # the path resolves the external data
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    max_batch, max_len = manifest["build"]["max_batch"], manifest["build"]["max_len"]
    for i in range(network.num_inputs):
        t = network.get_input(i)
        profile.set_shape(t.name, *profile_shapes(t.name, list(t.shape), max_batch, max_len))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TargetError(f"TensorRT failed to build a plan from {onnx_path} (see the TensorRT log above)")
    return bytes(plan)

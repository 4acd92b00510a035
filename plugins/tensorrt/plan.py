"""TensorRT plan from a tensorrt-target model.onnx (TensorRT >= 10.9; not executable on this project's machines).

The ONNX file carries each fused plugin node with a local function holding its reference semantics (onnxruntime
runs those) and, for the fused ops that have a per-kernel composition, an EXPANSION function (domain
"v4.trt.expand": kernel plugin nodes of domain "v4.trt.aot" plus ONNX glue; targets/onnx_functions.py).

kind="aot" (default): `prepare_aot_model` switches every fused node to its expansion and inlines it, and inlines
the reference function of the fused nodes without one (moe_experts: dequantised float experts, computed by
TensorRT layers as the h200 target computes non-FP8 experts with the reference). What the parser then sees is
standard ops plus one "v4.trt.aot" plugin node per Triton kernel launch, found as v4trt_aot::<name> in the
registry (AOT implementations only): the plan runs without Python.
kind="jit": every function is dropped, the fused nodes reach the plugin importer as v4trt::<name> with JIT
implementations (Python at run time, functional reference bodies with torch).
The network is strongly typed (the ONNX types decide every layer's precision); one optimization profile spans
batch 1..max_batch and length 1..max_len from the manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from v4compile.errors import ExportError, InputError, TargetError
from v4compile.plugins.tensorrt.specs import (AOT_BY_REFERENCE, DOMAIN, EXPAND_DOMAIN, KERNEL_DOMAIN, KERNEL_SPECS,
                                              SPECS)

PLAN_KINDS = ("aot", "jit")


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


def prepare_aot_model(model: Any) -> tuple[Any, dict[str, int]]:
    """The model TensorRT parses for an AOT plan (module doc); returns (model, {kernel plugin: node count}).
    ExportError when a fused node would be left, or a kernel node is not a known AOT plugin."""
    import onnx.inliner

    expansions = {(f.name, f.overload) for f in model.functions if f.domain == EXPAND_DOMAIN}
    selected = set()
    for node in model.graph.node:
        if node.domain != DOMAIN:
            continue
        if (node.op_type, node.overload) in expansions:
            node.domain = EXPAND_DOMAIN
            selected.add((EXPAND_DOMAIN, node.op_type))
        elif node.op_type in AOT_BY_REFERENCE:
            selected.add((DOMAIN, node.op_type))
        else:
            raise ExportError(f"AOT plan: plugin node {node.name} ({node.op_type}, overload {node.overload}) has no "
                              "expansion function in the file; re-export with expansions=True")
    if not any(o.domain == EXPAND_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(EXPAND_DOMAIN, 1))
    if not any(o.domain == KERNEL_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(KERNEL_DOMAIN, 1))
    model = onnx.inliner.inline_selected_functions(model, sorted(selected))
    keep = [f for f in model.functions if f.domain not in (DOMAIN, EXPAND_DOMAIN)]
    del model.functions[:]
    model.functions.extend(keep)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.domain in (DOMAIN, EXPAND_DOMAIN):
            raise ExportError(f"AOT plan: node {node.name} ({node.domain}::{node.op_type}) was not expanded")
        if node.domain == KERNEL_DOMAIN:
            if node.op_type not in KERNEL_SPECS:
                raise ExportError(f"AOT plan: unknown kernel plugin node {node.op_type}")
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return model, counts


def prepare_jit_model(model: Any) -> Any:
    """The model TensorRT parses for a JIT plan: no local functions, fused nodes go to the plugin importer."""
    del model.functions[:]
    unknown = sorted({n.op_type for n in model.graph.node if n.domain == DOMAIN and n.op_type not in SPECS})
    if unknown:
        raise ExportError(f"JIT plan: plugin nodes without a spec: {unknown}")
    return model


def build_serialized_plan(onnx_path: Path, manifest: dict[str, Any], bodies: dict[str, Any], *, kind: str = "aot",
                          workspace_gib: float | None = None) -> bytes:
    """Register the plugins, parse, build; returns the plan bytes. `bodies` (plugin name -> functional body) serve
    the JIT plugins."""
    import onnx
    import tensorrt as trt

    from v4compile.plugins.tensorrt.trt_plugins import register_kernel_plugins, register_plugins

    model = onnx.load(str(onnx_path), load_external_data=False)
    if kind == "aot":
        register_kernel_plugins()
        model, _ = prepare_aot_model(model)
    elif kind == "jit":
        register_plugins(bodies)
        model = prepare_jit_model(model)
    else:
        raise InputError(f"plan kind {kind!r}; expected one of {', '.join(PLAN_KINDS)}")
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

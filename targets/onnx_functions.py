"""The plugin nodes of model.onnx and their ONNX local functions (the reference semantics onnxruntime runs).

translation_table(): torch.onnx translation of each v4trt op to ONE node of domain "v4.trt", op_type = plugin
name, with the op's attributes plus `plugin_version` / `plugin_namespace` (what TensorRT's ONNX parser reads
to find the plugin v4::<name> in its registry).

attach_functions(): for every distinct (op, attribute values) in the graph, the op's functional reference body
(targets/trt_ops.BODIES_TRT) is exported to ONNX on the node's own example inputs, with the dims that are
symbolic in the graph dynamic, and wrapped as a FunctionProto (domain "v4.trt", name = op, overload = a digest
of the attribute values); every plugin node gets the overload of its attribute set. Attribute values that change
the body's structure (a compress ratio, top-k) are baked into each overload's body, which is why one function
per attribute set rather than one function referencing attributes.

With `expansions=True` (the default of export_onnx), every fused node with an AOT composition
(targets/trt_ops.AOT_BODIES) also gets an EXPANSION function: domain "v4.trt.expand", same name and overload,
exported from the composition, whose body is the per-kernel plugin nodes (domain "v4.trt.aot", one node per
Triton kernel launch) and the glue between them as standard ONNX ops. onnxruntime never calls it (no node has
that domain); plugins/tensorrt/plan.py switches the fused nodes to it and inlines it to build an AOT plan.
"""

from __future__ import annotations

import hashlib
import inspect
import re
import struct
from typing import Any

import onnx
import torch
import torch.fx.experimental._config as fx_config
from onnx import helper
from torch import Tensor, nn
from torch.export import Dim

from v4compile.errors import ExportError
from v4compile.plugins.tensorrt.specs import (DOMAIN, EXPAND_DOMAIN, KERNEL_DOMAIN, KERNEL_NAMESPACE, KERNEL_SPECS,
                                              NAMESPACE, SPECS, VERSION, PluginSpec)
from v4compile.targets import trt_ops
from v4compile.targets.lower import _whole_chunk_bodies, drop_size_oblivious_asserts

_ALL_TYPES = [f"tensor({t})" for t in ("float", "double", "float16", "bfloat16", "int64", "int32", "int8", "uint8",
                                       "bool", "float8e4m3fn")]
_ATTR_TYPES = {"float": onnx.defs.OpSchema.AttrType.FLOAT, "int": onnx.defs.OpSchema.AttrType.INT,
               "bool": onnx.defs.OpSchema.AttrType.INT}
PLUGIN_ATTRS = ("plugin_version", "plugin_namespace")


def onnx_schema(spec: PluginSpec, domain: str = DOMAIN) -> onnx.defs.OpSchema:
    """An (unregistered) OpSchema for the plugin node: one type variable per input and output."""
    D = onnx.defs.OpSchema
    ins = [D.FormalParameter(n, f"T_{n}") for n in spec.inputs]
    outs = [D.FormalParameter(n, f"U_{n}") for n in spec.output_names]
    constraints = [(f"T_{n}", _ALL_TYPES, "") for n in spec.inputs] + \
                  [(f"U_{n}", _ALL_TYPES, "") for n in spec.output_names]
    attrs = [D.Attribute(n, _ATTR_TYPES[k], "", required=True) for n, k in spec.attrs]
    attrs += [D.Attribute(n, D.AttrType.STRING, "", required=True) for n in PLUGIN_ATTRS]
    return D(spec.name, domain, 1, inputs=ins, outputs=outs, type_constraints=constraints, attributes=attrs,
             doc=spec.doc)


def onnx_attr_values(spec: PluginSpec, values: tuple[Any, ...]) -> dict[str, Any]:
    """Op arguments (spec attribute order) -> the values stored on the ONNX node (bool as int)."""
    return {n: (int(v) if k == "bool" else float(v) if k == "float" else int(v))
            for (n, k), v in zip(spec.attrs, values, strict=True)}


def _translate(spec: PluginSpec, domain: str = DOMAIN, namespace: str = NAMESPACE):
    from onnxscript._internal.values import Op, Opset

    op = Op(Opset(domain, 1), spec.name, onnx_schema(spec, domain))
    params = [inspect.Parameter(p, inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in (*spec.inputs, *spec.attr_names)]

    def translate(*args: Any, **kwargs: Any) -> Any:
        bound = inspect.Signature(params).bind(*args, **kwargs).arguments
        tensors = [bound[p] for p in spec.inputs]
        spec.check_attrs({a: bound[a] for a in spec.attr_names})
        attrs = onnx_attr_values(spec, tuple(bound[a] for a in spec.attr_names))
        return op(*tensors, **attrs, plugin_version=VERSION, plugin_namespace=namespace)

    translate.__signature__ = inspect.Signature(params)
    translate.__name__ = f"v4trt_{spec.name}"
    return translate


def sort_stable(self: Any, stable: Any = None, dim: int = -1, descending: bool = False) -> Any:
    """aten.sort.stable (not in torch.onnx's table, torch 2.13): ONNX TopK over the whole axis, which orders equal
    values by ascending index (the ONNX spec's tie rule) = a stable sort, the order topk_lowest_first relies on."""
    from onnxscript import opset20 as op

    k = op.Shape(self, start=dim) if dim == -1 else op.Shape(self, start=dim, end=dim + 1)
    values, indices = op.TopK(self, k, axis=dim, largest=int(bool(descending)), sorted=1)
    return values, indices


def softplus(self: Any, beta: float = 1.0, threshold: float = 20.0) -> Any:
    """aten.softplus without ONNX Softplus, which onnxruntime implements for float only (our fp32 mode routes in
    float64): torch's rule x if beta x > threshold else log1p(exp(beta x)) / beta, log1p by Goldberg's exact
    correction log(u) * y / (u - 1) with u = 1 + y."""
    from onnxscript import opset20 as op

    bx = op.Mul(self, op.CastLike(beta, self))
    y = op.Exp(bx)
    u = op.Add(y, op.CastLike(1.0, self))
    one = op.Equal(u, op.CastLike(1.0, self))
    log1p = op.Where(one, y, op.Div(op.Mul(op.Log(u), y), op.Sub(u, op.CastLike(1.0, self))))
    soft = op.Div(log1p, op.CastLike(beta, self))
    return op.Where(op.Greater(bx, op.CastLike(threshold, self)), self, soft)


def aten_translations() -> dict[Any, Any]:
    """Translations of aten ops our bodies use that torch.onnx lacks or onnxruntime cannot run in float64."""
    return {torch.ops.aten.sort.stable: sort_stable, torch.ops.aten.softplus.default: softplus}


def translation_table() -> dict[Any, Any]:
    """{torch.ops.v4trt.<name>.default: translation} (+ aten_translations) for torch.onnx's custom_translation_table."""
    return {**aten_translations(), **{trt_ops.op(name): _translate(spec) for name, spec in SPECS.items()}}


def kernel_translation_table() -> dict[Any, Any]:
    """aten_translations + {torch.ops.v4trt_aot.<name>.default: ONE node of domain "v4.trt.aot"} (expansions)."""
    return {**aten_translations(), **{trt_ops.kernel_op(name): _translate(spec, KERNEL_DOMAIN, KERNEL_NAMESPACE)
                                      for name, spec in KERNEL_SPECS.items()}}


def overload_key(spec: PluginSpec, attrs: dict[str, Any]) -> str:
    """Function overload id of an attribute set as stored on the node (floats compared as float32)."""
    parts = []
    for n, k in spec.attrs:
        v = attrs[n]
        parts.append(f"{n}={struct.pack('<f', float(v)).hex()}" if k == "float" else f"{n}={int(v)}")
    return "a" + hashlib.sha1(";".join(parts).encode()).hexdigest()[:12]


def node_attrs(node: onnx.NodeProto) -> dict[str, Any]:
    """Attributes of an ONNX node as Python values."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _dim_name(expr: Any) -> str:
    return "d_" + re.sub(r"[^0-9A-Za-z]+", "_", str(expr)).strip("_")


def dynamic_shapes(node: torch.fx.Node, n: int) -> tuple[dict[int, Dim], ...]:
    """Per tensor input: the dims that are symbolic in the graph, as export Dims (one Dim per expression)."""
    dims: dict[str, Dim] = {}
    out = []
    for arg in node.args[:n]:
        val = arg.meta.get("val") if isinstance(arg, torch.fx.Node) else None
        spec = {}
        for i, s in enumerate(val.shape if isinstance(val, Tensor) else ()):
            if not isinstance(s, int):
                name = _dim_name(s)
                spec[i] = dims.setdefault(name, Dim(name, min=1))
        out.append(spec)
    return tuple(out)


class _Body(nn.Module):
    def __init__(self, body: Any, attrs: tuple[Any, ...]) -> None:
        super().__init__()
        self.body, self.attrs = body, attrs

    def forward(self, *tensors: Tensor) -> Any:
        return self.body(*tensors, *self.attrs)


def function_proto(spec: PluginSpec, args: tuple[Any, ...], dynamic: tuple[dict[int, Dim], ...], key: str,
                   opset: int, expansion: bool = False) -> tuple[onnx.FunctionProto, list[onnx.FunctionProto]]:
    """Export the plugin's reference body (expansion: its AOT composition, trt_ops.AOT_BODIES) on `args` (a
    recorded call) with `dynamic` dims per tensor input as FunctionProto (domain, name, overload `key`)."""
    from v4compile.targets.onnx_export import exportable_scales

    n = len(spec.inputs)
    tensors, attrs = tuple(args[:n]), tuple(args[n:])
    body = (trt_ops.AOT_BODIES if expansion else trt_ops.BODIES_TRT)[spec.name]
    table = kernel_translation_table() if expansion else aten_translations()
    try:
        with torch.no_grad(), _whole_chunk_bodies(), exportable_scales(), \
                fx_config.patch(backed_size_oblivious=True):
            ep = torch.export.export(_Body(body, attrs), tensors, dynamic_shapes=(dynamic,),
                                     prefer_deferred_runtime_asserts_over_guards=True)
        drop_size_oblivious_asserts(ep)
        sub = torch.onnx.export(ep, dynamo=True, opset_version=opset, optimize=True, verbose=False,
                                custom_translation_table=table).model_proto
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        what = "AOT kernel composition" if expansion else "reference body"
        raise ExportError(f"exporting the {what} of plugin {spec.plugin_id} (attributes {attrs}) to an "
                          f"ONNX function failed: {type(e).__name__}: {first}") from e
    g = sub.graph
    if len(g.input) != n or len(g.output) != len(spec.outputs):
        raise ExportError(f"plugin {spec.plugin_id}: its reference body exported with {len(g.input)} inputs / "
                          f"{len(g.output)} outputs, the plugin has {n} / {len(spec.outputs)}")
    consts = [helper.make_node("Constant", [], [t.name], value=t) for t in g.initializer]
    fn = helper.make_function(EXPAND_DOMAIN if expansion else DOMAIN, spec.name, [i.name for i in g.input],
                              [o.name for o in g.output],
                              [*consts, *g.node], list(sub.opset_import),
                              attributes=[*spec.attr_names, *PLUGIN_ATTRS], doc_string=spec.doc)
    fn.overload = key
    return fn, list(sub.functions)


def attach_functions(model: onnx.ModelProto, fp: Any, expansions: bool = True) -> dict[str, int]:
    """Add one local function per (plugin, attribute set) of `fp` (a FunctionalProgram) to `model` and set the
    overload of every plugin node, plus (expansions) the AOT expansion functions of the fused plugins that have
    one; returns {plugin name: number of reference functions}."""
    from v4compile.targets.onnx_export import OPSET, plugin_nodes

    with torch.no_grad(), trt_ops.record_calls() as calls:
        fp.program.module()(*fp.example)
    nodes = plugin_nodes(fp.program)
    if [n.target._opname for n in nodes] != [name for name, _ in calls]:
        raise ExportError("plugin calls recorded while running the lowered program do not match its plugin nodes")
    done: dict[tuple[str, str], onnx.FunctionProto] = {}
    expand: dict[tuple[str, str], onnx.FunctionProto] = {}
    extra: dict[tuple[str, str, str], onnx.FunctionProto] = {}
    for node, (name, args) in zip(nodes, calls):
        spec = SPECS[name]
        key = overload_key(spec, onnx_attr_values(spec, tuple(args[len(spec.inputs):])))
        if (name, key) in done:
            continue
        dynamic = dynamic_shapes(node, len(spec.inputs))
        done[name, key], more = function_proto(spec, args, dynamic, key, OPSET)
        if expansions and name in trt_ops.AOT_BODIES:
            expand[name, key], more2 = function_proto(spec, args, dynamic, key, OPSET, expansion=True)
            more = [*more, *more2]
        for f in more:
            extra.setdefault((f.domain, f.name, f.overload), f)
    for node in model.graph.node:
        if node.domain == DOMAIN:
            spec = SPECS[node.op_type]
            node.overload = overload_key(spec, node_attrs(node))
            if (node.op_type, node.overload) not in done:
                raise ExportError(f"plugin node {node.name} ({node.op_type}) has attributes {node_attrs(node)} "
                                  "that no recorded call had")
    functions = [*done.values(), *expand.values(), *extra.values()]
    model.functions.extend(functions)
    have = {o.domain for o in model.opset_import}
    for f in functions:
        for o in f.opset_import:
            if o.domain not in have:
                model.opset_import.append(o)
                have.add(o.domain)
    counts: dict[str, int] = {}
    for name, _ in done:
        counts[name] = counts.get(name, 0) + 1
    return counts

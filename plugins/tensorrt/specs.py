"""What each V4 TensorRT plugin is, as plain data (no tensorrt, no torch): inputs, attributes, outputs and the
shape / dtype rule. The ONNX exporter (targets/onnx_export.py), the Torch-TensorRT converters and the
`tensorrt.plugin` definitions (plugins/tensorrt/trt_plugins.py) all read this one table, so a plugin node, its
ONNX local function and its TensorRT descriptor cannot disagree on names or order.

Plugins are FUNCTIONAL (TensorRT and ONNX have no in-place inputs): a fused op that mutates caches in our torch
graphs returns the updated caches as extra outputs, in `updates` order, after its own results. The same op name keys
the graph node (v4::<name>), its functional form (torch op v4trt::<name>), the plugin (v4trt::<name> in
TensorRT's registry: Torch-TensorRT's generated converters map a torch op to the plugin of the same id; op_type
<name> in ONNX domain "v4.trt") and the Triton kernels (DESIGN.md section 5).

Shape rules work on any dim objects (ints, sympy expressions, TensorRT ShapeExpr): they only select and
combine input dims, so the same rule serves the tests (ints), torch fake tensors and TensorRT descriptors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from v4compile.errors import UnsupportedOpError

DOMAIN = "v4.trt"  # ONNX domain of plugin nodes and their local functions
NAMESPACE = "v4trt"  # TensorRT plugin namespace = the functional torch ops' namespace: ids "v4trt::<name>"
VERSION = "1"  # plugin_version attribute TensorRT's ONNX parser reads

Shape = tuple[Any, ...]


@dataclass(frozen=True)
class OutputRule:
    """One output: its name, shape from the inputs' shapes and the attributes, dtype ('same:<input>' or a name)."""

    name: str
    shape: Callable[[dict[str, Shape], dict[str, Any]], Shape]
    dtype: str


@dataclass(frozen=True)
class PluginSpec:
    """One V4 plugin: tensor inputs in call order, attributes (name -> 'float' | 'int' | 'bool'), outputs."""

    name: str
    inputs: tuple[str, ...]
    attrs: tuple[tuple[str, str], ...]
    outputs: tuple[OutputRule, ...]
    updates: tuple[str, ...] = ()  # inputs returned updated (the LAST len(updates) outputs), in this order
    doc: str = ""

    @property
    def plugin_id(self) -> str:
        return f"{NAMESPACE}::{self.name}"

    @property
    def n_results(self) -> int:
        """Outputs of the op itself (before the updated inputs)."""
        return len(self.outputs) - len(self.updates)

    @property
    def attr_names(self) -> tuple[str, ...]:
        return tuple(a for a, _ in self.attrs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.outputs)

    def output_shapes(self, shapes: Sequence[Shape], attrs: dict[str, Any]) -> list[Shape]:
        """Output shapes for input shapes given in `inputs` order."""
        named = self._named(shapes)
        return [tuple(o.shape(named, attrs)) for o in self.outputs]

    def output_dtypes(self, dtypes: Sequence[str]) -> list[str]:
        """Output dtype names ('float32', 'bfloat16', 'int64', ...) for input dtype names in `inputs` order."""
        named = dict(zip(self.inputs, dtypes, strict=True))
        return [named[o.dtype.removeprefix("same:")] if o.dtype.startswith("same:") else o.dtype
                for o in self.outputs]

    def check_attrs(self, attrs: dict[str, Any]) -> None:
        """Raise UnsupportedOpError naming the attribute that is missing or of the wrong type."""
        kinds = {"float": (float, int), "int": (int,), "bool": (bool, int)}
        for name, kind in self.attrs:
            if name not in attrs:
                raise UnsupportedOpError(f"plugin {self.plugin_id}: attribute {name!r} missing (have {sorted(attrs)})")
            if not isinstance(attrs[name], kinds[kind]):
                raise UnsupportedOpError(f"plugin {self.plugin_id}: attribute {name}={attrs[name]!r} is not {kind}")

    def _named(self, shapes: Sequence[Shape]) -> dict[str, Shape]:
        if len(shapes) != len(self.inputs):
            raise UnsupportedOpError(f"plugin {self.plugin_id}: {len(shapes)} input shapes, expected "
                                     f"{len(self.inputs)} ({', '.join(self.inputs)})")
        return dict(zip(self.inputs, shapes))


def _same(name: str) -> Callable[[dict[str, Shape], dict[str, Any]], Shape]:
    return lambda s, a: s[name]


def _updated(names: Sequence[str]) -> tuple[OutputRule, ...]:
    return tuple(OutputRule(f"{n}_out", _same(n), f"same:{n}") for n in names)


_CSA_INPUTS = ("q", "kv", "start_pos", "ring", "kv_proj", "gate_proj", "ape", "norm_weight", "inv_freq", "kv_state",
               "score_state", "kv_cache", "idx_q", "idx_weights", "idx_kv_proj", "idx_gate_proj", "idx_ape",
               "idx_norm_weight", "idx_kv_state", "idx_score_state", "idx_cache", "sink")
_CSA_UPDATES = ("ring", "kv_state", "score_state", "kv_cache", "idx_kv_state", "idx_score_state", "idx_cache")
_HCA_INPUTS = ("q", "kv", "start_pos", "ring", "kv_proj", "gate_proj", "ape", "norm_weight", "inv_freq", "kv_state",
               "score_state", "kv_cache", "sink")
_HCA_UPDATES = ("ring", "kv_state", "score_state", "kv_cache")

CSA_ATTENTION = PluginSpec(
    name="csa_attention", inputs=_CSA_INPUTS,
    attrs=(("scale", "float"), ("norm_eps", "float"), ("topk", "int")),
    outputs=(OutputRule("out", _same("q"), "same:q"),
             OutputRule("picks", lambda s, a: (s["q"][0], s["q"][1], a["topk"]), "int32"), *_updated(_CSA_UPDATES)),
    updates=_CSA_UPDATES,
    doc="compressors (main + indexer) + lightning indexer + top-k + window/sink sparse attention + ring write; "
        "outputs the attention result, the indexer picks (int32, -1 = none), then the updated caches",
)
HCA_ATTENTION = PluginSpec(
    name="hca_attention", inputs=_HCA_INPUTS,
    attrs=(("scale", "float"), ("ratio", "int"), ("norm_eps", "float")),
    outputs=(OutputRule("out", _same("q"), "same:q"), *_updated(_HCA_UPDATES)), updates=_HCA_UPDATES,
    doc="compressor (ratio m) + attention over window + every complete block + sink + ring write",
)
MOE_ROUTE = PluginSpec(
    name="moe_route", inputs=("x", "gate_w", "bias", "tid2eid", "token_ids"),
    attrs=(("topk", "int"), ("route_scale", "float"), ("hash", "bool")),
    outputs=(OutputRule("weights", lambda s, a: (s["x"][0], a["topk"]), "float32"),
             OutputRule("ids", lambda s, a: (s["x"][0], a["topk"]), "int64")),
    doc="sqrt-softplus scores, hash table or biased top-k, renormalised weights x route_scale",
)
MOE_EXPERTS = PluginSpec(
    name="moe_experts", inputs=("x", "weights", "ids", "w1", "w3", "w2"),
    attrs=(("swiglu_limit", "float"),),
    outputs=(OutputRule("y", lambda s, a: (s["x"][0], s["w2"][1]), "float32"),),
    doc="routed experts: FP8 rows x expert weights (stored dequantised in this version), SwiGLU clamp, combine",
)

SPECS: dict[str, PluginSpec] = {s.name: s for s in (CSA_ATTENTION, HCA_ATTENTION, MOE_ROUTE, MOE_EXPERTS)}
"""Plugin name -> spec. compress / indexer_scores / topk_select are not separate nodes in our graphs after
PIPELINE (fuse_csa_attention / fuse_hca_attention absorb them), so they are parts of the two attention plugins."""


def get_spec(name: str) -> PluginSpec:
    if name not in SPECS:
        raise UnsupportedOpError(f"no TensorRT plugin {name!r}; plugins: {', '.join(SPECS)}")
    return SPECS[name]

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
from v4compile.plugins.tensorrt.dims import cdiv, smax, smin

DOMAIN = "v4.trt"  # ONNX domain of plugin nodes and their local functions
NAMESPACE = "v4trt"  # TensorRT plugin namespace = the functional torch ops' namespace: ids "v4trt::<name>"
VERSION = "1"  # plugin_version attribute TensorRT's ONNX parser reads
KERNEL_DOMAIN = "v4.trt.aot"  # ONNX domain of the per-kernel (AOT) plugin nodes of the TensorRT expansion
KERNEL_NAMESPACE = "v4trt_aot"  # their TensorRT plugin namespace = their torch ops' namespace
EXPAND_DOMAIN = "v4.trt.expand"  # ONNX domain of each fused node's expansion into kernel plugin nodes (AOT plans)

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
    doc="routed experts: FP8 rows x expert weights (dequantised float: fp32 / bf16 builds), SwiGLU clamp, combine",
)
MOE_EXPERTS_FP8 = PluginSpec(
    name="moe_experts_fp8", inputs=("x", "weights", "ids", "w1", "s1", "w3", "s3", "w2", "s2"),
    attrs=(("swiglu_limit", "float"),),
    outputs=(OutputRule("y", lambda s, a: (s["x"][0], s["w2"][1]), "float32"),),
    doc="routed experts of an fp8 build: e4m3 experts w1/w3 [E, I, d], w2 [E, d, I] with float32 block scales "
        "[E, O/b, K/c] (b a power of two <= 128, c in 32/64/128), FP8 activations per 128 channels, SwiGLU clamp, "
        "combine = v4::moe_experts on e4m3 experts",
)

SPECS: dict[str, PluginSpec] = {s.name: s for s in (CSA_ATTENTION, HCA_ATTENTION, MOE_ROUTE, MOE_EXPERTS,
                                                    MOE_EXPERTS_FP8)}
"""Plugin name -> spec. compress / indexer_scores / topk_select are not separate nodes in our graphs after
PIPELINE (fuse_csa_attention / fuse_hca_attention absorb them), so they are parts of the two attention plugins."""


def get_spec(name: str) -> PluginSpec:
    if name not in SPECS:
        raise UnsupportedOpError(f"no TensorRT plugin {name!r}; plugins: {', '.join(SPECS)}")
    return SPECS[name]


# ---------------------------------------------------------------------------------------------- AOT kernel plugins


@dataclass(frozen=True)
class KernelSpec(PluginSpec):
    """An AOT plugin: exactly ONE Triton kernel launch (TensorRT's `trtp.aot_impl` returns one compiled kernel).

    The kernel receives, in this order, the input pointers (`inputs`), the int32 scalars `extras` (TensorRT
    SymInt32 expressions of the input shapes), then the output pointers (`outputs`), which is the argument order
    TensorRT's AOT plugin launch uses. Outputs named in `updates` are ALIASED to the input of the same name
    (`TensorDesc.aliased()`): the kernel updates that buffer in place, as the plugins/triton launcher does.
    Attributes are baked into the compiled kernel (AOT attributes are not serialised into the engine)."""

    kernel: str = ""  # the plugins/triton kernel this launch runs, "<module>.<function>"
    extras: tuple[str, ...] = ()

    @property
    def plugin_id(self) -> str:
        return f"{KERNEL_NAMESPACE}::{self.name}"

    @property
    def arg_names(self) -> tuple[str, ...]:
        """Runtime parameters of the compiled kernel, in launch order (excluding Triton's two hidden scratch
        pointers, which TensorRT pads with null)."""
        return (*self.inputs, *self.extras, *self.output_names)


TOPK_MAX_CHUNKS = 256  # chunks per score row in the top-k passes = radix_topk.MAX_CHUNKS (tested equal)
TOPK_WS_INTS = 1024  # int32 per score row of the top-k workspace = radix_topk.WS_INTS (tested equal)


def topk_chunks(rows: Any, n: Any, block: int, n_sms: int) -> tuple[Any, Any]:
    """(chunk, n_chunks) of the top-k passes over `rows` score rows of `n` keys: the formula of
    radix_topk.launch_select (about two programs per SM, at most TOPK_MAX_CHUNKS chunks, whole blocks)."""
    n_chunks = smax(1, smin(smin(cdiv(n, block), TOPK_MAX_CHUNKS), cdiv(2 * n_sms, rows)))
    chunk = cdiv(cdiv(n, n_chunks), block) * block
    return chunk, smax(1, cdiv(n, chunk))


_TOPK_ATTRS = (("k", "int"), ("ratio", "int"), ("n_sms", "int"), ("capacity", "int"))
_TOPK_EXTRAS = ("T", "N", "chunk", "n_chunks")


def _rows(name: str, width: Callable[[dict[str, Any]], Any]) -> OutputRule:
    """An int32 [score rows, width] output."""
    return OutputRule(name, lambda s, a: (s["scores"][0], width(a)), "int32")


_KERNELS = (
    KernelSpec(
        name="compress_pool", kernel="compressor._pool_kernel",
        inputs=("kv_proj", "gate_proj", "ape", "norm_weight", "inv_freq", "start_pos", "kv_state", "score_state",
                "cache"),
        attrs=(("ratio", "int"), ("norm_eps", "float"), ("rotate", "bool")), extras=("T", "N1"),
        outputs=_updated(("cache",)), updates=("cache",),
        doc="compressor pass 1: pool every block that completes in this chunk into its cache row (in place)"),
    KernelSpec(
        name="compress_state", kernel="compressor._state_kernel",
        inputs=("kv_proj", "gate_proj", "ape", "start_pos", "kv_state", "score_state", "after"),
        attrs=(("ratio", "int"),), extras=("T",),
        outputs=_updated(("kv_state", "score_state")), updates=("kv_state", "score_state"),
        doc="compressor pass 2: rewrite the state rows in place; `after` (compress_pool's output, not read) orders "
            "it after the pass that reads the old rows"),
    KernelSpec(
        name="indexer_scores", kernel="indexer_topk._scores_kernel",
        inputs=("q", "weights", "k_cache", "positions"), attrs=(("ratio", "int"), ("n_sms", "int")),
        extras=("T", "N", "tiles"),
        outputs=(OutputRule("scores", lambda s, a: (s["q"][0] * s["q"][1], s["k_cache"][1] - 1), "float32"),
                 OutputRule("ws", lambda s, a: (s["q"][0] * s["q"][1], TOPK_WS_INTS), "int32")),
        doc="lightning-indexer scores [B*T, N] of the visible blocks (k_cache is the whole cache, its last row the "
            "scratch row; entries past a row's visible blocks are not written and never read), and the top-k "
            "workspace ws [B*T, 1024] zeroed"),
    KernelSpec(
        name="topk_hist", kernel="radix_topk._hist_kernel",
        inputs=("scores", "positions", "ws"), attrs=(("level", "int"), *_TOPK_ATTRS), extras=_TOPK_EXTRAS[:3],
        outputs=_updated(("ws",)), updates=("ws",),
        doc="radix top-k pass `level` (1..3): histogram of one byte of the keys whose higher bytes match, added "
            "into the workspace in place (level 3 does nothing unless the 16-bit prefix leaves more than `capacity` keys)"),
    KernelSpec(
        name="topk_compact", kernel="radix_topk._compact_kernel",
        inputs=("scores", "positions", "ws"), attrs=_TOPK_ATTRS, extras=_TOPK_EXTRAS,
        outputs=(_rows("runs", lambda a: 3 * TOPK_MAX_CHUNKS), _rows("cand", lambda a: 2 * a["capacity"]),
                 *_updated(("ws",))), updates=("ws",),
        doc="radix top-k: every chunk appends its keys at or above the 16-bit threshold prefix to the row's "
            "candidate list (`capacity` keys) as one run; the run count lives in ws"),
    KernelSpec(
        name="topk_finish", kernel="radix_topk._finish_kernel",
        inputs=("scores", "positions", "ws", "runs", "cand"), attrs=_TOPK_ATTRS,
        extras=_TOPK_EXTRAS,
        outputs=(OutputRule("idx", lambda s, a: (s["scores"][0], a["k"]), "int32"), *_updated(("runs", "cand"))),
        updates=("runs", "cand"),
        doc="radix top-k, one program per row: sort the runs, resolve the last two bytes, write the picks (above "
            "the threshold ascending, then the lowest-index ties, then -1); reorders runs / cand in place"),
    KernelSpec(
        name="sparse_attention", kernel="sparse_attention._sparse_attn_kernel",
        inputs=("q", "kv", "idx", "kv2", "idx2", "sink"), attrs=(("scale", "float"),),
        extras=("T", "H", "D", "N", "N2", "K", "K2"), outputs=(OutputRule("out", _same("q"), "same:q"),),
        doc="one softmax over kv[idx] and kv2[idx2] plus the sink, unsplit (one program per query and head block)"),
    KernelSpec(
        name="moe_route", kernel="moe_route._router_kernel",
        inputs=MOE_ROUTE.inputs, attrs=MOE_ROUTE.attrs, extras=("N", "E", "D"), outputs=MOE_ROUTE.outputs,
        doc="the router in one launch (hidden dim unsplit): " + MOE_ROUTE.doc),
)


def moe_tiles(routes: Any, block_m: int, n_experts: int) -> Any:
    """Row tiles of the expert-grouped routes: moe_gemm.sort_routes' t_max = min(R, cdiv(R, BM) + E) (every tile
    holds >= 1 route, each expert group adds < 1 padding tile), a shape expression of the route count R."""
    return smin(routes, cdiv(routes, block_m) + n_experts)


def _moe_rows(s: dict[str, Shape], a: dict[str, Any]) -> Any:
    """Rows of the grouped buffers (sroute, h): t_max * BM, from the routes = ids rows x k."""
    return moe_tiles(s["ids"][0] * s["ids"][1], a["block_m"], a["n_experts"]) * a["block_m"]


_KERNELS += (
    KernelSpec(
        name="moe_quant_act", kernel="moe_gemm._quant_act_kernel", inputs=("x",), attrs=(("n_experts", "int"),),
        extras=("N",),
        outputs=(OutputRule("xq", lambda s, a: (s["x"][0], s["x"][1]), "float8_e4m3fn"),
                 OutputRule("xs", lambda s, a: (s["x"][0], cdiv(s["x"][1], 128)), "float32"),
                 OutputRule("counts", lambda s, a: (a["n_experts"],), "int32")),
        doc="FP8 e4m3 rows of x with power-of-two scales per 128 channels; also zeroes the per-expert route "
            "counts [E] that moe_count adds into (TensorRT outputs start uninitialised)"),
    KernelSpec(
        name="moe_count", kernel="moe_gemm._count_kernel", inputs=("ids", "counts"), attrs=(), extras=("R",),
        outputs=(OutputRule("rank", lambda s, a: (s["ids"][0] * s["ids"][1],), "int32"), *_updated(("counts",))),
        updates=("counts",),
        doc="routes per expert (atomics into counts, in place) and each route's row inside its expert group"),
    KernelSpec(
        name="moe_scatter", kernel="moe_gemm._scatter_kernel", inputs=("ids", "counts", "rank"),
        attrs=(("block_m", "int"),), extras=("R",),
        outputs=(OutputRule("sroute", lambda s, a: (_moe_rows(s, {**a, "n_experts": s["counts"][0]}),), "int32"),),
        doc="route ids grouped by expert, groups padded to block_m rows: [t_max * block_m] int32 (padding slots "
            "unwritten, never read)"),
    KernelSpec(
        name="moe_gemm1", kernel="moe_gemm._gemm1_kernel",
        inputs=("x", "xq", "xs", "w1", "w3", "s1", "s3", "weights", "ids", "counts", "sroute"),
        attrs=(("swiglu_limit", "float"), ("block_m", "int")), extras=("I", "D"),
        outputs=(OutputRule("h", lambda s, a: (s["sroute"][0], s["w1"][1]), "float8_e4m3fn"),
                 OutputRule("hs", lambda s, a: (s["sroute"][0], cdiv(s["w1"][1], 128)), "float32")),
        doc="grouped GEMM1: h = SwiGLU(x W1^T, x W3^T) x routing weight per grouped row, FP8-quantised per 128 "
            "channels in the epilogue; x is not read (its dtype decides the bf16 rounding of g, u and h)"),
    KernelSpec(
        name="moe_gemm2", kernel="moe_gemm._gemm2_kernel",
        inputs=("x", "h", "hs", "w2", "s2", "ids", "counts", "sroute"), attrs=(("block_m", "int"),),
        extras=("D", "I"),
        outputs=(OutputRule("o", lambda s, a: (s["ids"][0] * s["ids"][1], s["w2"][1]), "same:x"),),
        doc="grouped GEMM2: each route's expert output row (act dtype); x is not read (it gives the act dtype)"),
    KernelSpec(
        name="moe_combine", kernel="moe_gemm._combine_kernel", inputs=("o", "ids"), attrs=(("n_experts", "int"),),
        extras=(), outputs=(OutputRule("y", lambda s, a: (s["ids"][0], s["o"][1]), "float32"),),
        doc="y[n] = sum of the token's route rows in slot order, fp32"),
)
AOT_BY_REFERENCE = ("moe_experts",)
"""Fused plugins an AOT plan computes with their reference function (TensorRT layers) instead of kernel plugins:
`moe_experts` of fp32 / bf16 builds, whose network holds dequantised float experts (the Triton MoE kernels take
FP8 experts only). An fp8 build has `moe_experts_fp8` nodes instead, composed of the six MoE kernel plugins, so
nothing of an fp8 AOT plan is computed by reference. Every other fused plugin has a per-kernel composition
(targets/trt_ops.AOT_BODIES)."""
KERNEL_SPECS: dict[str, KernelSpec] = {k.name: k for k in _KERNELS}
"""Kernel plugin name -> spec: the per-kernel plugins TensorRT gets when the fused nodes are expanded for an AOT
plan (targets/trt_ops.AOT_BODIES composes each fused op from them)."""


def get_kernel_spec(name: str) -> KernelSpec:
    if name not in KERNEL_SPECS:
        raise UnsupportedOpError(f"no AOT kernel plugin {name!r}; kernel plugins: {', '.join(KERNEL_SPECS)}")
    return KERNEL_SPECS[name]

"""ONNX export for the tensorrt target: the lowered graph with every fused V4 op as ONE plugin node.

Steps: captured + PIPELINE'd entry point -> fold the weight-only math as the cpu target does (dequantised FP8/FP4
weights, constant subgraphs) -> each plugin op (plugins/tensorrt/specs.py) becomes its functional v4trt op plus
copies into the caches, every other v4 op its reference body -> torch.export of a wrapper that returns the caches
(so the program is functional) -> torch.onnx (dynamo exporter) with a translation table that emits the plugin
nodes in domain "v4.trt" -> one ONNX local function per distinct (op, attributes), exported from the op's
reference body (targets/onnx_functions.py), so onnxruntime executes the same file.

I/O contract of model.onnx (one graph serves prefill and decode: decode is T = 1):
  inputs   tokens int64 [batch, seq], start_pos int64 [batch], then every cache tensor under its manifest name
           ("blocks.<i>.<field>", Cache.named_tensors order), batch dim dynamic;
  outputs  logits float [batch, seq, vocab], then "<cache name>.next" for every cache tensor, same order: the
           updated cache, which the caller feeds back as the input of the next call (ONNX has no in-place inputs).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx.experimental._config as fx_config
from torch import Tensor, nn
from torch.export import Dim, ExportedProgram

from v4compile.errors import ExportError, UnsupportedOpError
from v4compile.graph.capture import Captured
from v4compile.plugins.tensorrt.specs import SPECS
from v4compile.targets import trt_ops
from v4compile.targets.const_fold import fold_constants
from v4compile.targets.cpu_fold import fold_weight_dequant, moe_experts_dequantized
from v4compile.targets.lower import _whole_chunk_bodies, drop_size_oblivious_asserts, reference_impl

log = logging.getLogger(__name__)

OPSET = 20  # ai.onnx opset of model.onnx; TensorRT 10.x parses opsets up to 22
IR_VERSION = 10  # function overloads (one local function per attribute set) need IR 10
DATA_FILE = "model.onnx.data"  # external weight data, next to model.onnx


def output_name(cache_name: str) -> str:
    """Name of the updated-cache output for cache input `cache_name`."""
    return f"{cache_name}.next"


class _ReturnCaches(nn.Module):
    """(tokens, start_pos, *caches) -> (logits, *updated caches): clones, then the in-place graph runs on them."""

    def __init__(self, gm: nn.Module) -> None:
        super().__init__()
        self.gm = gm

    def forward(self, tokens: Tensor, start_pos: Tensor, *caches: Tensor) -> tuple[Tensor, ...]:
        caches = tuple(c.clone() for c in caches)
        return (self.gm(tokens, start_pos, *caches), *caches)


def ue8m0_scale_arith(amax: Tensor, qmax: float, min_amax: float) -> Tensor:
    """quant.formats.ue8m0_scale without float<->int bit casts (ONNX before opset 26 and TensorRT have none):
    2^ceil(log2 r) from an approximate log2, corrected by exact power-of-two comparisons; equal for every input
    (tests/targets/test_onnx_export.py checks it bit for bit around powers of two, subnormals, inf and NaN)."""
    a = torch.clamp(amax.float(), min=min_amax)
    r = a * torch.tensor(1.0 / qmax, dtype=torch.float32, device=a.device)  # the same fp32 product
    e = torch.ceil(torch.log2(r)).clamp(-126.0, 128.0)  # the bit version yields 2^-126 for subnormal r
    e = torch.where(torch.exp2(e) < r, e + 1, e)
    e = torch.where((torch.exp2(e - 1) >= r) & (e > -126.0), e - 1, e)
    s = torch.exp2(e)
    return torch.where(torch.isfinite(r), s, torch.full_like(s, float("nan")))


def round_e2m1_arith(x: Tensor) -> Tensor:
    """quant.formats.round_e2m1 without nibble codes and bit operations (torch.onnx mistypes uint8 shifts, TensorRT
    has no integer bit operations): grid index by threshold counts, sign from x < 0 or x = -0; same values and
    signs (tested bit for bit)."""
    from v4compile.quant import formats as qf

    xf = x.float()
    a = xf.abs().nan_to_num(0.0)
    idx = torch.zeros(a.shape, dtype=torch.int64, device=a.device)
    for mid, tie_up in qf._E2M1_MIDS:
        idx = idx + (a >= mid if tie_up else a > mid).to(torch.int64)
    mag = torch.tensor(qf.E2M1_GRID, dtype=torch.float32, device=x.device)[idx]
    negative = (xf < 0) | ((xf == 0) & (1.0 / xf < 0))
    return torch.where(torch.isnan(xf), xf, torch.where(negative, -mag, mag))


@contextlib.contextmanager
def exportable_scales() -> Iterator[None]:
    """While tracing for ONNX, fake-quantisation uses ue8m0_scale_arith and round_e2m1_arith (no bit casts or
    integer bit operations). Safe: identical values (tested); remove once the ONNX opset used has BitCast and
    TensorRT parses integer bit operations."""
    from v4compile.quant import formats as qf

    saved = qf.ue8m0_scale, qf.round_e2m1
    qf.ue8m0_scale, qf.round_e2m1 = ue8m0_scale_arith, round_e2m1_arith
    try:
        yield
    finally:
        qf.ue8m0_scale, qf.round_e2m1 = saved


def _plugin_call(name: str):
    """Python callable replacing a mutating fused node: functional plugin op, then copy the updates back."""
    spec = SPECS[name]
    fn = trt_ops.op(name)

    def call(*args: Any) -> Any:
        outs = fn(*args)
        k = spec.n_results
        for u, new in zip(spec.updates, outs[k:], strict=True):
            args[spec.inputs.index(u)].copy_(new)
        return outs[0] if k == 1 else tuple(outs[:k])

    call.__name__ = f"v4trt_{name}"
    return call


def _swap_v4_nodes(gm: torch.fx.GraphModule) -> dict[str, str]:
    """Fused ops -> plugin ops, every other v4 op -> its reference body; returns op -> implementation."""
    kinds: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is moe_experts_dequantized:  # fold_weight_dequant's MoE form: float experts
            node.target, kinds["v4::moe_experts"] = trt_ops.op("moe_experts"), "plugin v4::moe_experts"
        elif isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "v4":
            name = node.target._opname
            if node.kwargs:
                raise UnsupportedOpError(f"v4::{name} node {node.name} has keyword arguments {sorted(node.kwargs)}")
            if name in SPECS and SPECS[name].updates:
                node.target, kinds[f"v4::{name}"] = _plugin_call(name), f"plugin v4::{name}"
            elif name in SPECS:
                node.target, kinds[f"v4::{name}"] = trt_ops.op(name), f"plugin v4::{name}"
            else:
                node.target, kinds[f"v4::{name}"] = reference_impl(name), "reference (aten)"
    gm.recompile()
    return kinds


def capture_for_tensorrt(model: Any, entry: str, max_len: int, precision: str = "fp32") -> Captured:
    """capture + pipeline_for(precision) with exportable_scales (the model's own fake-quantisation, e.g. of the KV
    rows, is traced into the captured graph: it must not hold bit casts either); fp8 adds quantize_moe_experts."""
    from v4compile.graph.capture import capture
    from v4compile.graph.passes import run_pipeline

    with exportable_scales():
        return run_pipeline(capture(model, entry, max_len=max_len), precision=precision)


def keep_fp8_experts(gm: torch.fx.GraphModule) -> int:
    """fp8 builds: every v4::moe_experts node whose experts are constant e4m3 (quantize_moe_experts' result)
    becomes the plugin op v4trt::moe_experts_fp8 with the SAME e4m3 weights (ONNX FLOAT8E4M3FN initialisers) and
    float32 block scales (UE8M0 scales widened, exact: ONNX opset 20 and the kernels' f32 path take no e8m0);
    runs before fold_weight_dequant, which then leaves these nodes alone. Returns the number of nodes."""
    import functools

    def attr(node: Any) -> Tensor | None:
        if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
            return None
        return functools.reduce(getattr, node.target.split("."), gm)

    n = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.v4.moe_experts.default:
            continue
        ws = [attr(node.args[i]) for i in range(3, 9)]
        if any(w is None for w in ws) or any(ws[i].dtype != torch.float8_e4m3fn for i in (0, 2, 4)):
            continue
        args = list(node.args)
        for i in (4, 6, 8):  # the scales
            if ws[i - 3].dtype != torch.float32:
                name = f"_v4_fp8_scale_{n}_{i}"
                gm.register_buffer(name, ws[i - 3].float().contiguous())
                with gm.graph.inserting_before(node):
                    args[i] = gm.graph.get_attr(name)
        node.args, node.target = tuple(args), trt_ops.op("moe_experts_fp8")
        n += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return n


@dataclass
class FunctionalProgram:
    """The lowered entry point: (tokens, start_pos, *caches) -> (logits, *updated caches), plugin ops as nodes."""

    program: ExportedProgram
    cache_names: list[str]
    kernels: dict[str, str]
    example: tuple[Tensor, ...]


def lower_for_plugins(g: Captured, example: tuple[Tensor, ...], max_batch: int,
                      fp8_experts: bool = False) -> FunctionalProgram:
    """Lower a captured + PIPELINE'd entry point for the tensorrt target (module doc); `example` sized so no dim
    is 0/1-specialised (as for targets/lower.lower). fp8_experts (fp8 builds): keep_fp8_experts first."""
    try:
        gm = g.program.module(check_guards=False)
    except TypeError:  # torch < 2.13 has no check_guards argument
        gm = g.program.module()
    kernels = {}
    if fp8_experts:
        if not keep_fp8_experts(gm):
            raise UnsupportedOpError("fp8 tensorrt build: no v4::moe_experts node with constant e4m3 experts after "
                                     "quantize_moe_experts")
        kernels["v4::moe_experts"] = "plugin v4trt::moe_experts_fp8 (e4m3 experts, float32 block scales)"
    kernels.update({op: "reference (weights dequantised at build)" for op in fold_weight_dequant(gm)})
    fold_constants(gm)
    kernels.update(_swap_v4_nodes(gm))
    b = Dim("batch", min=1, max=max_batch)
    tok = {0: b, 1: Dim("seq", min=1, max=g.max_len)} if g.entry == "prefill" else {0: b}
    dynamic = (tok, {0: b}, tuple({0: b} for _ in g.cache_names))  # forward(tokens, start_pos, *caches)
    try:
        with torch.no_grad(), _whole_chunk_bodies(), exportable_scales(), \
                fx_config.patch(backed_size_oblivious=True):
            program = torch.export.export(_ReturnCaches(gm), example, dynamic_shapes=dynamic,
                                          prefer_deferred_runtime_asserts_over_guards=True)
    except Exception as e:  # torch raises many unrelated types here; surface one typed error
        raise ExportError(f"lowering the {g.entry} entry point for target tensorrt failed: "
                          f"{type(e).__name__}: {_first_line(e)}") from e
    left = sorted({str(n.target) for n in program.graph.nodes if n.op == "call_function"
                   and isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "v4"})
    if left:
        raise UnsupportedOpError(f"target tensorrt: v4 ops left after lowering: {', '.join(left)}")
    drop_size_oblivious_asserts(program)
    return FunctionalProgram(program, list(g.cache_names), kernels, example)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def plugin_nodes(program: ExportedProgram) -> list[torch.fx.Node]:
    """The v4trt nodes of a lowered program, in graph order."""
    return [n for n in program.graph.nodes if n.op == "call_function"
            and isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == trt_ops.NAMESPACE]


def export_onnx(fp: FunctionalProgram, path: str | Path, expansions: bool = True) -> Path:
    """Write model.onnx (+ DATA_FILE external weights) for a lowered program; returns the .onnx path.
    `expansions`: also store each fused node's per-kernel expansion (AOT TensorRT plans, onnx_functions doc)."""
    import onnx

    from v4compile.targets.onnx_functions import attach_functions, translation_table

    path = Path(path)
    names = ["tokens", "start_pos", *fp.cache_names]
    outs = ["logits", *(output_name(n) for n in fp.cache_names)]
    t0 = time.perf_counter()
    try:
        with _quiet():
            onnx_program = torch.onnx.export(fp.program, dynamo=True, input_names=names, output_names=outs,
                                             custom_translation_table=translation_table(), opset_version=OPSET,
                                             optimize=True, verbose=False)
    except Exception as e:
        raise ExportError(f"torch.onnx export of the tensorrt graph failed: {type(e).__name__}: {_first_line(e)}") from e
    model = onnx_program.model_proto
    attach_functions(model, fp, expansions)
    model.ir_version = max(model.ir_version, IR_VERSION)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)
    log.info("ONNX export in %.1fs: %d nodes, %d local functions", time.perf_counter() - t0, len(model.graph.node),
             len(model.functions))
    return path


@contextlib.contextmanager
def _quiet():
    """torch.onnx logs every stage at WARNING/INFO; keep build output to our own stage lines."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)

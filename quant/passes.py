"""Quantisation passes (they change numerics on purpose, so they live here and not in graph/passes):
`quantize_moe_experts` turns every `v4::moe_experts` node's routed-expert weights into FP8 e4m3 + block scales.

Per source format of a stacked expert weight [E, O, I] (V4-SPEC 12.3):
- MXFP4 (int8 packed e2m1 + UE8M0 per 32 inputs): the exact repack of quant/repack.py, expert by expert, each
  verified element by element. `block=None` (default) picks, per node, the coarsest block of `AUTO_BLOCKS`
  that is exact for every expert (w1 and w3 share one block: the kernel reads them as one stack): experts whose
  per-32 scales lie close get the fast 128x128 blocks, wide scale spreads fall back to finer, still exact, ones.
  An explicit `block` that loses values raises LossyRepackError unless allow_lossy=True (then it is reported).
- BF16 / float: block-scaled FP8 (power-of-two scales), with per-block max / RMS error and per-expert calc_diff.
- FP8 e4m3 already (-Base checkpoints, FP32 128x128 scales): kept as is.
New weights are registered as NEW buffers of the ExportedProgram (`<old name>_fp8`: `...experts.w1.weight_fp8`,
`...experts.w1.scale_fp8`); the old constants are removed once no node reads them (the MTP block's experts,
which no entry point runs, are left alone). The shared expert needs nothing: its linears are FP8 in official
checkpoints (v4::fp8_linear); a bf16-weight model keeps every dense projection, shared expert included, in
bf16 (quantising only the shared expert would buy little and mix formats).
The report is returned by `rewrite_moe_experts` and kept on the graph (`moe_quant_report(g)`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, InputSpec, TensorArgument

from v4compile.errors import ExportError, InputError
from v4compile.graph.capture import Captured
from v4compile.model.config import ModelConfig
from v4compile.quant.formats import e8m0_to_float, infer_block
from v4compile.quant.repack import (LossyRepackError, QuantReport, RepackReport, quantize_bf16_to_fp8,
                                    repack_mxfp4_to_fp8)

log = logging.getLogger(__name__)

AUTO_BLOCKS: tuple[tuple[int, int], ...] = ((128, 128), (1, 128), (1, 32))
"""Blocks tried for an MXFP4 repack when none is requested, coarsest first; (1, 32) is exact by construction."""
BF16_BLOCK = (128, 128)  # BF16 -> FP8 default (DeepSeek's weight block)
REPORT_KEY = "v4compile.moe_quant_report"  # graph_module.meta key holding the last report
_WEIGHTS = {"w1": 3, "w3": 5, "w2": 7}  # moe_experts argument index of each weight (its scale follows)


@dataclass
class TensorQuantReport:
    """One stacked expert weight of one MoE node."""

    node: str  # graph node name (moe_experts_3)
    layer: str  # module path (model.layers.3.ffn; "" at the root)
    tensor: str  # w1 | w3 | w2
    source: str  # mxfp4 | bf16 | float32 | float16 | fp8 (kept)
    shape: tuple[int, ...]  # logical [E, O, I]
    block: tuple[int, int]  # FP8 scale block of the result
    mismatches: int | None  # values changed (repack; None for a float source, where every value may move)
    lossy_blocks: int
    max_abs_err: float
    rms_err: float | None  # worst block RMS error (float source)
    calc_diff: float  # worst expert
    experts: list[RepackReport | QuantReport] = field(default_factory=list, repr=False)  # per expert

    def line(self) -> str:
        what = (f"{self.mismatches} mismatches in {self.lossy_blocks} blocks" if self.mismatches is not None
                else f"worst block RMS {self.rms_err:.3g}")
        return (f"{tensor_name(self.layer, self.tensor)} [{self.node}]: {self.source} -> fp8 "
                f"{self.block[0]}x{self.block[1]}, {what}, max abs {self.max_abs_err:.3g}, worst expert calc_diff "
                f"{self.calc_diff:.3g}")

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("node", "layer", "tensor", "source", "shape", "block", "mismatches",
                                              "lossy_blocks", "max_abs_err", "rms_err", "calc_diff")}


@dataclass
class MoEQuantReport:
    tensors: list[TensorQuantReport]

    @property
    def mismatches(self) -> int:
        """Values changed by repacks (float sources are not counted: quantising them is lossy by design)."""
        return sum(t.mismatches or 0 for t in self.tensors)

    def summary(self) -> str:
        return "\n".join(t.line() for t in self.tensors) or "no v4::moe_experts node"

    def to_dict(self) -> dict:
        return {"mismatches": self.mismatches, "tensors": [t.to_dict() for t in self.tensors]}


def _source(w: torch.Tensor) -> str:
    if w.dtype == torch.int8:
        return "mxfp4"
    elif w.dtype == torch.float8_e4m3fn:
        return "fp8"
    elif w.dtype in (torch.bfloat16, torch.float32, torch.float16):
        return str(w.dtype).removeprefix("torch.").replace("bfloat16", "bf16")
    else:
        raise ExportError(f"expert weight of dtype {w.dtype}: expected int8 (MXFP4), e4m3, bf16, f16 or f32")


def check_block(block: tuple[int, int]) -> tuple[int, int]:
    """A block the FP8 MoE kernel can read: rows a power of two <= 128, columns 32, 64 or 128."""
    if (len(block) != 2 or not all(isinstance(b, int) for b in block) or not 1 <= block[0] <= 128
            or block[0] & (block[0] - 1) or block[1] not in (32, 64, 128)):
        raise InputError(f"expert FP8 block {block!r}: expected (rows, cols) with rows a power of two <= 128 and "
                         "cols 32, 64 or 128")
    return block


# ----------------------------------------------------------------------------- per tensor


def _repack(w: torch.Tensor, s: torch.Tensor, block: tuple[int, int], name: str
            ) -> tuple[torch.Tensor, torch.Tensor, list[RepackReport]]:
    """Stacked MXFP4 -> e4m3 + e8m0 scales, expert by expert (bounded memory), never raising on loss."""
    qs, ss, reps = [], [], []
    for e in range(w.shape[0]):
        q, sc, rep = repack_mxfp4_to_fp8(w[e], s[e], block, allow_lossy=True, name=f"{name}[{e}]")
        qs.append(q)
        ss.append(sc)
        reps.append(rep)
    return torch.stack(qs), torch.stack(ss), reps


def _quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, list[QuantReport]]:
    qs, ss, reps = [], [], []
    for e in range(w.shape[0]):
        q, sc, rep = quantize_bf16_to_fp8(w[e], block)
        qs.append(q)
        ss.append(sc)
        reps.append(rep)
    return torch.stack(qs), torch.stack(ss), reps


def _report(node: fx.Node, layer: str, tensor: str, source: str, w: torch.Tensor, block: tuple[int, int],
            reps: list) -> TensorQuantReport:
    shape = (w.shape[0], w.shape[1], w.shape[2] * (2 if source == "mxfp4" else 1))
    if source == "mxfp4":
        return TensorQuantReport(node.name, layer, tensor, source, shape, block, sum(r.mismatches for r in reps),
                                 sum(r.lossy_blocks for r in reps), max(r.max_abs_err for r in reps), None,
                                 max(r.calc_diff for r in reps), reps)
    return TensorQuantReport(node.name, layer, tensor, source, shape, block, None, 0,
                             max(float(r.max_abs_err.max()) for r in reps),
                             max(float(r.rms_err.max()) for r in reps), max(r.calc_diff for r in reps), reps)


def _kept(node: fx.Node, layer: str, tensor: str, w: torch.Tensor, s: torch.Tensor) -> TensorQuantReport:
    block = (infer_block(w.shape[1], s.shape[1]), infer_block(w.shape[2], s.shape[2]))
    return TensorQuantReport(node.name, layer, tensor, "fp8", tuple(w.shape), block, 0, 0, 0.0, None, 0.0)


# ----------------------------------------------------------------------------- per node


def _convert_node(node: fx.Node, layer: str, weights: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  block: tuple[int, int] | None, allow_lossy: bool
                  ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[TensorQuantReport]]:
    """{w1/w3/w2: (weight, scale)} -> the same in e4m3 + scales, and one report per tensor."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    reports: dict[str, TensorQuantReport] = {}
    for group in (("w1", "w3"), ("w2",)):  # w1 and w3 share one block (one stack in the kernel)
        fp4 = [t for t in group if _source(weights[t][0]) == "mxfp4"]
        candidates = [block] if block is not None else list(AUTO_BLOCKS)
        for i, b in enumerate(candidates):
            done = {t: _repack(*weights[t], b, tensor_name(layer, t)) for t in fp4}
            if i == len(candidates) - 1 or all(r.exact for t in fp4 for r in done[t][2]):
                break
        for t in group:
            w, s = weights[t]
            src = _source(w)
            if src == "mxfp4":
                q, sc, reps = done[t]
                reports[t] = _report(node, layer, t, src, w, b, reps)
                if reports[t].mismatches and not allow_lossy:
                    r = reports[t]
                    raise LossyRepackError(f"{tensor_name(layer, t)} ({node.name}): MXFP4 -> FP8 {b[0]}x{b[1]} is "
                                           f"lossy: {r.mismatches} values changed in {r.lossy_blocks} blocks, max abs "
                                           f"error {r.max_abs_err:.3g}; worst expert {_worst(reps)} (use a finer "
                                           "block, block=None, or allow_lossy=True)")
                out[t] = (q, sc)
            elif src == "fp8":
                out[t] = (w, s)
                reports[t] = _kept(node, layer, t, w, s)
            else:
                fb = block if block is not None else BF16_BLOCK
                q, sc, reps = _quantize(w, fb)
                out[t] = (q, sc)
                reports[t] = _report(node, layer, t, src, w, fb, reps)
    if len({s.dtype for _, s in out.values()}) > 1:  # a kept -Base tensor has f32 scales: the kernel wants one dtype
        out = {t: (q, e8m0_to_float(s) if s.dtype == torch.float8_e8m0fnu else s) for t, (q, s) in out.items()}
    return out, [reports[t] for t in _WEIGHTS]


def _worst(reps: list[RepackReport]) -> str:
    e = max(range(len(reps)), key=lambda i: reps[i].max_abs_err)
    return f"{e}: {reps[e].summary()}"


# ----------------------------------------------------------------------------- program constants


def _specs(ep: ExportedProgram) -> dict[str, InputSpec]:
    return {s.arg.name: s for s in ep.graph_signature.input_specs if isinstance(s.arg, TensorArgument)}


def constant_value(ep: ExportedProgram, node: fx.Node) -> torch.Tensor | None:
    """The tensor behind a parameter / buffer / constant placeholder of `ep` (None for a user input)."""
    spec = _specs(ep).get(node.name) if node.op == "placeholder" else None
    if spec is None or spec.kind == InputKind.USER_INPUT or spec.target is None:
        return None
    return ep.state_dict[spec.target] if spec.target in ep.state_dict else ep.constants.get(spec.target)


def add_buffer(ep: ExportedProgram, target: str, value: torch.Tensor) -> fx.Node:
    """Register `value` as a new persistent buffer `target` of `ep`: placeholder (with fake meta) and input spec
    before the first user input, as torch.export orders lifted inputs."""
    graph, sig = ep.graph, ep.graph_signature
    if target in ep.state_dict or target in ep.constants:
        raise ExportError(f"cannot add buffer {target}: the program already has it")
    specs = sig.input_specs
    first_user = next(i for i, s in enumerate(specs) if s.kind == InputKind.USER_INPUT)
    anchor = next(n for n in graph.nodes if n.op == "placeholder" and n.name == specs[first_user].arg.name)
    fake_mode = next(n.meta["val"].fake_mode for n in graph.nodes
                     if n.op == "placeholder" and hasattr(n.meta.get("val"), "fake_mode"))
    with graph.inserting_before(anchor):
        node = graph.placeholder("b_" + target.replace(".", "_"))
    node.meta["val"] = fake_mode.from_tensor(value, static_shapes=True)
    specs.insert(first_user, InputSpec(kind=InputKind.BUFFER, arg=TensorArgument(name=node.name), target=target,
                                       persistent=True))
    ep.state_dict[target] = value
    return node


def remove_if_unused(ep: ExportedProgram, node: fx.Node) -> bool:
    """Erase a parameter / buffer / constant placeholder nobody reads, with its input spec and its tensor."""
    spec = _specs(ep).get(node.name)
    if node.users or spec is None or spec.kind == InputKind.USER_INPUT:
        return False
    ep.graph.erase_node(node)
    ep.graph_signature.input_specs.remove(spec)
    ep.state_dict.pop(spec.target, None)
    ep.constants.pop(spec.target, None)
    return True


def _layer(node: fx.Node) -> str:
    """Module path of the MoE a node belongs to ("" for a node of the root module)."""
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


def tensor_name(layer: str, tensor: str) -> str:
    return f"{layer}.experts.{tensor}" if layer else f"experts.{tensor}"


# ----------------------------------------------------------------------------- the pass


def rewrite_moe_experts(ep: ExportedProgram, *, block: tuple[int, int] | None = None,
                        allow_lossy: bool = False, memo: dict | None = None) -> MoEQuantReport:
    """Swap every v4::moe_experts node's expert weights for e4m3 + block scales (new buffers) in `ep`, in place.
    memo: a dict shared by the programs of one build: experts already converted (the same source tensors, block
    and allow_lossy) are reused, not converted again, so the programs share one copy."""
    if block is not None:
        check_block(tuple(block))
        block = tuple(block)
    reports: list[TensorQuantReport] = []
    for node in [n for n in ep.graph.nodes if n.op == "call_function" and n.target is torch.ops.v4.moe_experts.default]:
        layer, args = _layer(node), list(node.args)
        weights = {}
        for t, i in _WEIGHTS.items():
            w, s = constant_value(ep, args[i]), constant_value(ep, args[i + 1])
            if w is None or s is None:
                raise ExportError(f"{node.name} ({layer}): expert {t} weight / scale is not a program constant "
                                  f"({args[i]}, {args[i + 1]}); quantize_moe_experts rewrites constant experts only")
            weights[t] = (w, s)
        key = (block, allow_lossy, *((w.data_ptr(), tuple(w.shape), w.dtype, s.data_ptr(), tuple(s.shape))
                                      for w, s in weights.values()))
        if memo is not None and key in memo:
            new, reps = memo[key]
        else:
            new, reps = _convert_node(node, layer, weights, block, allow_lossy)
            if memo is not None:
                memo[key] = (new, reps)
        reports.extend(reps)
        old = [args[i] for i in _WEIGHTS.values()] + [args[i + 1] for i in _WEIGHTS.values()]
        for t, i in _WEIGHTS.items():
            if new[t][0] is weights[t][0] and new[t][1] is weights[t][1]:
                continue  # already FP8: keep the original constants
            for j, value in ((i, new[t][0]), (i + 1, new[t][1])):
                args[j] = add_buffer(ep, _specs(ep)[args[j].name].target + "_fp8", value.contiguous())
        node.args = tuple(args)
        for ph in dict.fromkeys(old):
            remove_if_unused(ep, ph)
    ep.graph.lint()
    ep.graph_module.recompile()
    return MoEQuantReport(reports)


def quantize_moe_experts(g: Captured, cfg: ModelConfig, *, block: tuple[int, int] | None = None,
                         allow_lossy: bool = False, memo: dict | None = None) -> Captured:
    """Every v4::moe_experts node's expert weights -> FP8 e4m3 + block scales (report: moe_quant_report(g));
    memo: see rewrite_moe_experts."""
    report = rewrite_moe_experts(g.program, block=block, allow_lossy=allow_lossy, memo=memo)
    g.graph_module.meta[REPORT_KEY] = report
    srcs = sorted({t.source for t in report.tensors})
    log.info("quantize_moe_experts: %d expert tensors (%s) -> fp8, %d repack mismatches", len(report.tensors),
             ", ".join(srcs), report.mismatches)
    return g


def moe_quant_report(g: Captured) -> MoEQuantReport | None:
    """The report of the last quantize_moe_experts run on `g` (None if it has not run)."""
    return g.graph_module.meta.get(REPORT_KEY)


__all__ = ["quantize_moe_experts", "rewrite_moe_experts", "moe_quant_report", "MoEQuantReport", "TensorQuantReport",
           "AUTO_BLOCKS", "BF16_BLOCK", "check_block", "add_buffer", "remove_if_unused", "constant_value"]

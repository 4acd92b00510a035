"""cpu lowering step: dequantise constant FP8 / FP4 weights once, at build time.

The reference bodies dequantise each weight on every call (bit operations on the packed codes, then a scale
multiply): thousands of aten nodes per model that only depend on constants, which make export and
AOTInductor slow. Dequantisation is exact (codes times powers of two), so computing it once and storing the
float32 weight gives bit-identical results; the FP8 quantisation of the ACTIVATIONS stays in the graph.
Costs memory (float32 weights): the cpu target serves CI-sized models.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, fx

from v4compile.model import ops as v4ops
from v4compile.model.numerics import linear_acc
from v4compile.model.ops import BODIES, fp8_act_dequant
from v4compile.quant import formats as qf

_QUANT = (torch.int8, torch.float8_e4m3fn)


def fp8_linear_dequantized(x: Tensor, w: Tensor) -> Tensor:
    """v4::fp8_linear with the weight already dequantised (float32 [O, K])."""
    return linear_acc(fp8_act_dequant(x), w, x.dtype).to(x.dtype)


def rms_norm_fp8_linear_dequantized(x: Tensor, norm_weight: Tensor, eps: float, w: Tensor) -> Tensor:
    """v4::rms_norm_fp8_linear with the weight already dequantised."""
    return fp8_linear_dequantized(BODIES["rms_norm"](x, norm_weight, eps), w)


def moe_experts_dequantized(x: Tensor, weights: Tensor, ids: Tensor, w1: Tensor, w3: Tensor, w2: Tensor,
                            swiglu_limit: float) -> Tensor:
    """v4::moe_experts for FP8 / FP4 experts dequantised to float32 [E, ...], every expert on every token
    (no data-dependent shapes) in one batched matmul per projection; outputs of unrouted (token, expert)
    pairs are masked and the experts are added in ascending order, as the reference accumulates."""
    act = x.dtype
    xin = fp8_act_dequant(x)  # [N, d], per row: the same for every expert
    acc = v4ops.acc_dtype(act)
    gate = torch.einsum("nd,eid->eni", xin.to(acc), w1.to(acc)).float().to(act)  # [E, N, I]
    up = torch.einsum("nd,eid->eni", xin.to(acc), w3.to(acc)).float().to(act)
    E = w1.shape[0]
    hit = ids.unsqueeze(0) == torch.arange(E, device=ids.device).view(E, 1, 1)  # [E, N, k]
    w_e = torch.where(hit, weights.float().unsqueeze(0), 0.0).sum(-1, keepdim=True)  # [E, N, 1]
    h = (v4ops.swiglu(gate, up, swiglu_limit) * w_e).to(act)
    out = torch.einsum("eni,edi->end", fp8_act_dequant(h).to(acc), w2.to(acc)).float().to(act).float()
    out = torch.where(hit.any(-1, keepdim=True), out, 0.0)
    y = torch.zeros_like(out[0])
    for e in range(E):
        y = y + out[e]
    return y


def _attr(gm: fx.GraphModule, node) -> Tensor | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    return functools.reduce(getattr, node.target.split("."), gm)


def _dequant(w: Tensor, s: Tensor) -> Tensor:
    if w.dtype == torch.int8:
        return qf.dequant_fp4_block(w, s, block=32)
    return qf.dequant_fp8_block(w, s, block=(128, 128))


def fold_weight_dequant(gm: fx.GraphModule) -> list[str]:
    """Rewrite fp8_linear / rms_norm_fp8_linear / moe_experts nodes whose weights are constants to take
    dequantised float32 buffers (registered on gm). Returns the op names of the nodes rewritten."""
    folded: list[str] = []
    graph = gm.graph

    def buffer(w: Tensor, s: Tensor, like: fx.Node) -> fx.Node:
        name = f"_v4_dequant_{len([b for b in gm._buffers if b.startswith('_v4_dequant_')])}"
        gm.register_buffer(name, _dequant(w, s))
        with graph.inserting_before(like):
            return graph.get_attr(name)

    for node in list(graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if node.target.namespace != "v4":
            continue
        name, args = node.target._opname, node.args
        if name == "fp8_linear" and _attr(gm, args[1]) is not None:
            node.args = (args[0], buffer(_attr(gm, args[1]), _attr(gm, args[2]), node))
            node.target = fp8_linear_dequantized
        elif name == "rms_norm_fp8_linear" and _attr(gm, args[3]) is not None:
            node.args = (*args[:3], buffer(_attr(gm, args[3]), _attr(gm, args[4]), node))
            node.target = rms_norm_fp8_linear_dequantized
        elif name == "moe_experts" and _attr(gm, args[3]) is not None and _attr(gm, args[3]).dtype in _QUANT:
            ws = [buffer(_attr(gm, args[i]), _attr(gm, args[i + 1]), node) for i in (3, 5, 7)]
            node.args = (*args[:3], *ws, args[9])
            node.target = moe_experts_dequantized
        else:
            continue
        folded.append(f"v4::{name}")
    graph.eliminate_dead_code()
    gm.recompile()
    return folded

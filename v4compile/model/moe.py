"""MoE of every V4 block (V4-SPEC section 8): router, stacked routed experts, one shared expert.

Legend: N tokens (B T flattened), d hidden, E routed experts, k experts per token, I moe_inter_dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from v4compile.model.config import ModelConfig
from v4compile.model.layers import Linear, OpTable, declare
from v4compile.model.numerics import fn_acc, linear_acc
from v4compile.model.ops import swiglu
from v4compile.model.schema import TensorSpec


class Gate(nn.Module):
    """Router: `weight` [E, d] bf16; `bias` f32 [E] (bias-routed layers) or `tid2eid` int64 [V, k] (hash layers)."""

    def __init__(self, spec: dict[str, TensorSpec], prefix: str, cfg: ModelConfig, layer_id: int,
                 device=None) -> None:
        super().__init__()
        self.hash = cfg.is_hash_layer(layer_id)
        declare(self, "weight", spec, f"{prefix}.weight", device)
        declare(self, "tid2eid" if self.hash else "bias", spec, f"{prefix}.{'tid2eid' if self.hash else 'bias'}",
                device)

    def selection_scores(self, x: Tensor) -> Tensor:
        """f32 [N, E] scores the top-k is taken over (sqrt(softplus) + bias); for traces and tie analysis."""
        s = fn_acc(F.softplus, linear_acc(x, self.weight, x.dtype), x.dtype).sqrt()
        return s if self.hash else s + self.bias.float()


class ExpertWeights(nn.Module):
    """One stacked projection of the routed experts: `weight` [E, out, in(/2)] and its `scale` if quantised."""

    def __init__(self, spec: dict[str, TensorSpec], prefix: str, device=None) -> None:
        super().__init__()
        declare(self, "weight", spec, f"{prefix}.weight", device)
        if f"{prefix}.scale" in spec:
            declare(self, "scale", spec, f"{prefix}.scale", device)
        else:
            self.register_buffer("scale", torch.empty(0, device=device), persistent=False)


class Experts(nn.Module):
    def __init__(self, spec: dict[str, TensorSpec], prefix: str, device=None) -> None:
        super().__init__()
        for name in ("w1", "w2", "w3"):
            setattr(self, name, ExpertWeights(spec, f"{prefix}.{name}", device))


class SharedExpert(nn.Module):
    """SwiGLU expert with FP8 (or plain) linears and the same clamp as the routed experts."""

    def __init__(self, spec: dict[str, TensorSpec], prefix: str, limit: float, ops: OpTable, device=None) -> None:
        super().__init__()
        self.limit = limit
        for name in ("w1", "w2", "w3"):
            setattr(self, name, Linear(spec, f"{prefix}.{name}", ops, device))

    def forward(self, x: Tensor) -> Tensor:
        """x [N, d] act -> [N, d] act; gate/up leave the linear in the act dtype before the clamp (14.3)."""
        return self.w2(swiglu(self.w1(x), self.w3(x), self.limit).to(x.dtype))


class MoE(nn.Module):
    def __init__(self, spec: dict[str, TensorSpec], prefix: str, cfg: ModelConfig, layer_id: int, ops: OpTable,
                 device=None) -> None:
        super().__init__()
        self.ops, self.cfg = ops, cfg
        self.gate = Gate(spec, f"{prefix}.gate", cfg, layer_id, device)
        self.experts = Experts(spec, f"{prefix}.experts", device)
        self.shared_experts = SharedExpert(spec, f"{prefix}.shared_experts", cfg.swiglu_limit, ops, device)

    def forward(self, x: Tensor, tokens: Tensor, trace: dict | None = None, layer_id: int = -1) -> Tensor:
        """x [B, T, d] act (ffn_norm-ed), tokens [B, T] -> [B, T, d] act."""
        cfg, g, ex = self.cfg, self.gate, self.experts
        B, T, d = x.shape
        xf = x.reshape(B * T, d)
        empty = torch.zeros(0, device=x.device)
        bias = empty if g.hash else g.bias
        table = g.tid2eid if g.hash else torch.zeros(0, cfg.n_activated_experts, dtype=torch.int64, device=x.device)
        weights, ids = self.ops.moe_route(xf, g.weight, bias, table, tokens.reshape(-1), cfg.n_activated_experts,
                                          cfg.route_scale, g.hash)
        y = self.ops.moe_experts(xf, weights, ids, ex.w1.weight, ex.w1.scale, ex.w3.weight, ex.w3.scale,
                                 ex.w2.weight, ex.w2.scale, cfg.swiglu_limit)
        if trace is not None:
            trace.setdefault("experts", {})[layer_id] = ids.view(B, T, -1).clone()
            trace.setdefault("router_scores", {})[layer_id] = g.selection_scores(xf).view(B, T, -1)
        return (y + self.shared_experts(xf).float()).to(x.dtype).view(B, T, d)

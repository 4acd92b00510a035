"""Muon (momentum orthogonalised by a Newton-Schulz iteration) for 2-D weights, AdamW for everything else.

V4-SPEC does not give V4's Newton-Schulz schedule, so this uses the widely used quintic coefficients
(a, b, c) = (3.4445, -4.7750, 2.0315) for 5 iterations: they push every singular value of the normalised
update into roughly [0.7, 1.2] (not exactly 1: the iteration trades accuracy for speed). Updates are
scaled by 0.2 * sqrt(max(rows, cols)) so their RMS matches AdamW's and one learning rate serves both.
Stacked expert weights [E, out, in] are orthogonalised per expert.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def newton_schulz(g: Tensor, steps: int = NS_STEPS, eps: float = 1e-7) -> Tensor:
    """Approximately orthogonalise g [..., m, n] (U V^T of its SVD), computed in float32; same shape."""
    if g.dim() < 2:
        raise ValueError(f"newton_schulz needs a matrix [..., m, n], got shape {list(g.shape)}")
    a, b, c = NS_COEFFS
    x = g.float()
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.transpose(-2, -1)
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        m = x @ x.transpose(-2, -1)
        x = a * x + (b * m + c * m @ m) @ x
    return x.transpose(-2, -1) if tall else x


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, orthogonalised by `newton_schulz`, decoupled weight decay; params must be >= 2-D."""

    def __init__(self, params: Iterable[Tensor], lr: float = 2e-3, momentum: float = 0.95,
                 weight_decay: float = 0.0, ns_steps: int = NS_STEPS) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() < 2:
                    raise ValueError(f"Muon takes matrices only; got a parameter of shape {list(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch.optim signature
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                buf.mul_(mu).add_(p.grad)
                u = newton_schulz(p.grad.add(buf, alpha=mu), group["ns_steps"])
                scale = 0.2 * max(p.shape[-2], p.shape[-1]) ** 0.5
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(u.to(p.dtype), alpha=-lr * scale)
        return loss


def is_muon_param(name: str, p: Tensor) -> bool:
    """Hidden-layer matrices: linear / expert / router weights; not embeddings, the head, mHC mixers or ape."""
    leaf = name.rsplit(".", 1)[-1]
    if p.dim() < 2 or leaf != "weight":
        return False
    return not (name.startswith(("embed.", "head.")) or "hc_" in name)


def build_optimizers(named: Iterable[tuple[str, Tensor]], lr: float, adam_lr: float, weight_decay: float = 0.0
                     ) -> tuple[Muon, torch.optim.AdamW, list[str]]:
    """(Muon over hidden matrices, AdamW over the rest, names given to Muon) for the trainable parameters."""
    muon, adam, names = [], [], []
    for n, p in named:
        if not p.requires_grad:
            continue
        if is_muon_param(n, p):
            muon.append(p)
            names.append(n)
        else:
            adam.append(p)
    return (Muon(muon, lr=lr, weight_decay=weight_decay),
            torch.optim.AdamW(adam, lr=adam_lr, betas=(0.9, 0.95), weight_decay=0.0), names)

"""Muon: Newton-Schulz orthogonalisation and one optimiser step."""

import pytest
import torch

from v4compile.demo_model.muon import Muon, build_optimizers, is_muon_param, newton_schulz


@pytest.mark.parametrize("shape", [(64, 16), (16, 64), (3, 48, 24), (96, 96)])
def test_newton_schulz_singular_values_near_one(shape):
    g = torch.Generator().manual_seed(0)
    # a well-conditioned random matrix (square Gaussians have near-zero singular values 5 steps cannot lift)
    u = torch.linalg.qr(torch.randn(*shape[:-2], shape[-2], shape[-2], generator=g))[0]
    v = torch.linalg.qr(torch.randn(*shape[:-2], shape[-1], shape[-1], generator=g))[0]
    k = min(shape[-2:])
    s = torch.logspace(-1, 1, k)  # condition number 100
    m = u[..., :, :k] @ torch.diag_embed(s.expand(*shape[:-2], k)) @ v[..., :, :k].transpose(-2, -1)
    sv = torch.linalg.svdvals(newton_schulz(m))
    assert newton_schulz(m).shape == m.shape
    assert float(sv.min()) > 0.6 and float(sv.max()) < 1.25, (sv.min(), sv.max())
    assert float(torch.linalg.svdvals(m).max() / torch.linalg.svdvals(m).min()) > 50  # the input was not


def test_muon_step_decreases_loss_and_rejects_vectors():
    g = torch.Generator().manual_seed(1)
    target = torch.randn(32, 16, generator=g)
    x = torch.randn(64, 16, generator=g)
    w = torch.nn.Parameter(torch.zeros(32, 16))
    opt = Muon([w], lr=0.1)

    def loss():
        return ((x @ w.T - x @ target.T) ** 2).mean()

    before = loss().item()
    loss().backward()
    opt.step()  # one step: the orthogonalised direction still points downhill
    assert loss().item() < 0.99 * before, (before, loss().item())
    assert w.grad is not None and opt.state[w]["momentum"].abs().sum() > 0
    with pytest.raises(ValueError, match="matrices only"):
        Muon([torch.nn.Parameter(torch.zeros(4))])


def test_parameter_split():
    named = [("embed.weight", torch.zeros(8, 4)), ("layers.0.attn.wq_a.weight", torch.zeros(4, 4)),
             ("layers.0.hc_attn_fn", torch.zeros(4, 4)), ("layers.0.attn_norm.weight", torch.zeros(4)),
             ("layers.0.ffn.experts.w1.weight", torch.zeros(2, 4, 4)), ("head.weight", torch.zeros(8, 4))]
    got = {n for n, p in named if is_muon_param(n, p)}
    assert got == {"layers.0.attn.wq_a.weight", "layers.0.ffn.experts.w1.weight"}
    params = [(n, torch.nn.Parameter(p)) for n, p in named]
    muon, adam, names = build_optimizers(params, 1e-3, 1e-3)
    assert set(names) == got and len(adam.param_groups[0]["params"]) == 4

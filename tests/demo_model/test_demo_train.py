"""Training smoke test at tiny size: losses finite, the indexer and the main path get gradients, weights move,
and the trained state exports to a loadable official checkpoint."""

import torch

from v4compile.demo_model.export import write_demo_checkpoint
from v4compile.demo_model.task import sample
from v4compile.demo_model.train import TrainConfig, balance_experts, make_model, straight_through, train_step
from v4compile.demo_model.muon import build_optimizers
from v4compile.model.checkpoint import load_checkpoint
from v4compile.model.config import ModelConfig


def test_two_steps_and_export(tmp_path, one_thread):
    cfg = ModelConfig.preset("tiny", n_mtp_layers=0, compress_ratios=(0, 4, 16, 4))
    model = make_model(cfg, torch.float32, torch.device("cpu"), 0)
    muon, adam, names = build_optimizers(model.named_parameters(), 3e-3, 3e-3)
    assert "layers.1.attn.indexer.wq_b.weight" in names and "embed.weight" not in names
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tc = TrainConfig(preset="tiny")
    with straight_through():
        for step in range(2):
            b = sample(2, 96, n_records=4, n_queries=2, window=cfg.window_size, seed=step, with_answer=True)
            loss, ce, aux, experts = train_step(model, b, tc)
            assert torch.isfinite(loss) and aux.item() > 0 and ce.item() > 0
            for opt in (muon, adam):
                opt.zero_grad()
            loss.backward()
            grads = {n: p.grad for n, p in model.named_parameters()}
            for n in ("layers.1.attn.indexer.wq_b.weight", "layers.1.attn.indexer.compressor.wkv.weight",
                      "layers.1.attn.compressor.wkv.weight", "layers.0.attn.wq_a.weight", "embed.weight"):
                assert grads[n] is not None and float(grads[n].abs().max()) > 0, n
            muon.step()
            adam.step()
            balance_experts(model, experts)
    after = model.state_dict()
    for k in ("layers.1.attn.indexer.wq_b.weight", "head.weight", "layers.2.ffn.gate.bias"):
        assert not torch.equal(before[k], after[k]), k
    assert torch.equal(before["layers.0.ffn.gate.tid2eid"], after["layers.0.ffn.gate.tid2eid"])
    # straight-through rounding is restored: fake-quant has no gradient path outside training
    from v4compile.quant import formats as qf
    x = torch.randn(4, 64, requires_grad=True)
    with straight_through():
        (g_ste,) = torch.autograd.grad(qf.fake_quant_fp4(x).sum(), x)
    (g_exact,) = torch.autograd.grad(qf.fake_quant_fp4(x).sum(), x, allow_unused=True)
    assert float(g_ste.abs().min()) > 0.5
    assert g_exact is None or float(g_exact.abs().max()) == 0
    path = write_demo_checkpoint(model.state_dict(), cfg, tmp_path / "ck", "fp8", "fp4")
    loaded = load_checkpoint(path, dtype=torch.float32)
    tok = sample(1, 96, n_records=4, window=cfg.window_size, seed=9).tokens
    with torch.no_grad():
        ref = model(tok)[:, -1]
        got = loaded(tok)[:, -1]
    assert torch.isfinite(got).all() and float(torch.nn.functional.cosine_similarity(ref, got).min()) > 0.9

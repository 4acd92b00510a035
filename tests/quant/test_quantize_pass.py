"""quantize_moe_experts: MXFP4 and BF16 experts -> FP8 e4m3 + block scales as new program constants, the verifier
rule after it, the fp8 pipeline, the lossy-block refusal.

Bounds. MXFP4: the repack is exact (0 mismatches), so each dequantised FP8 weight equals the dequantised FP4
weight element for element, and v4::moe_experts computes the same fp32 matmuls on the same fp32 operands (the
activation is FP8-quantised by the same per-row rule for int8 and e4m3 weights): the MoE outputs and the
model's logits must be bitwise EQUAL (stronger than the table's fp8 model bound, also checked). BF16: each
expert weight's calc_diff < 1e-3 (the table's fp8 kernel bound; measured 3.6e-4) and each block's max error
<= amax / 14 (half an e4m3 ulp at the top binade, where amax/scale > 224). The whole FP8 MoE block (weights AND
activations FP8) vs the BF16-weight reference (unquantised activations) measures ~2.2e-3 on tiny, not < 1e-3
as issue 5 hoped: ~1.1e-3 from the three weight roundings and ~1.1e-3 from the two activation roundings, with
128x128 UE8M0 or FP32 scales alike (e4m3's 3 mantissa bits, not the block, set it); the table's
moe_block_fp8_vs_bf16 bound (4e-3) is checked.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from v4compile.errors import InputError
from v4compile.graph.capture import capture
from v4compile.graph.passes import PIPELINE, pipeline_for, run_pipeline
from v4compile.graph.spec import GraphSpecError, verify_graph
from v4compile.model.checkpoint import load_checkpoint, random_checkpoint
from v4compile.model.config import ModelConfig
from v4compile.quant.formats import _blocks_2d, dequant_fp8_block
from v4compile.quant.passes import (AUTO_BLOCKS, add_buffer, constant_value, moe_quant_report, quantize_moe_experts,
                                    rewrite_moe_experts)
from v4compile.quant.repack import LossyRepackError
from v4compile.validate import TOLERANCES, calc_diff

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_LEN = 64
MOE = torch.ops.v4.moe_experts.default
WEIGHT_ARGS = (3, 5, 7)  # w1, w3, w2 (each scale follows)


def moe_nodes(g) -> list[torch.fx.Node]:
    return [n for n in g.graph_module.graph.nodes if n.op == "call_function" and n.target is MOE]


def layer_experts(model, i: int) -> list[torch.Tensor]:
    ex = model.layers[i].ffn.experts
    return [ex.w1.weight, ex.w1.scale, ex.w3.weight, ex.w3.scale, ex.w2.weight, ex.w2.scale]


def routed_inputs(model, i: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [n, d] ~ N(0, 1) (an ffn_norm-ed input) and the layer's own routing of it (hash layers: random tokens)."""
    cfg, gate = model.cfg, model.layers[i].ffn.gate
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.dim, generator=g)
    tokens = torch.randint(0, cfg.vocab_size, (n,), generator=g)
    bias = torch.zeros(0) if gate.hash else gate.bias
    table = gate.tid2eid if gate.hash else torch.zeros(0, cfg.n_activated_experts, dtype=torch.int64)
    weights, ids = torch.ops.v4.moe_route(x, gate.weight, bias, table, tokens, cfg.n_activated_experts,
                                          cfg.route_scale, gate.hash)
    return x, weights, ids


def run(g, tokens: torch.Tensor, cache_like) -> torch.Tensor:
    flat = [t.clone() for t in cache_like.named_tensors().values()]
    with torch.no_grad():
        return g.module()(tokens, torch.zeros(tokens.shape[0], dtype=torch.int64), *flat)


class OneMoE(nn.Module):
    """A program holding one v4::moe_experts node over constant experts (fast to export: lossy / BF16 cases)."""

    def __init__(self, experts: list[torch.Tensor], limit: float) -> None:
        super().__init__()
        self.limit = limit
        for name, t in zip(("w1", "s1", "w3", "s3", "w2", "s2"), experts):
            self.register_buffer(name, t.detach().clone())

    def forward(self, x, weights, ids):
        return torch.ops.v4.moe_experts(x, weights, ids, self.w1, self.s1, self.w3, self.s3, self.w2, self.s2,
                                        self.limit)


def export_one(experts: list[torch.Tensor], limit: float, example) -> torch.export.ExportedProgram:
    return torch.export.export(OneMoE(experts, limit), example)


@pytest.fixture(scope="module")
def fp4(tmp_path_factory):
    """(model from an MXFP4 checkpoint, graph after the fp32 pipeline, graph after the fp8 pipeline)."""
    cfg = ModelConfig.preset("tiny")
    assert cfg.expert_dtype == "fp4"
    model = load_checkpoint(random_checkpoint(cfg, 3, tmp_path_factory.mktemp("ck") / "fp4"),
                            dtype=torch.float32).eval()
    g = capture(model, "prefill", max_len=MAX_LEN)
    base = run_pipeline(copy.deepcopy(g), precision="fp32")
    fp8 = run_pipeline(g, precision="fp8", verify=True)  # the verifier's e4m3 rule runs after the pass here
    return model, base, fp8


def test_fp8_pipeline_selection():
    assert pipeline_for("fp32") == pipeline_for("bf16") == PIPELINE
    assert pipeline_for("fp8") == [*PIPELINE, quantize_moe_experts]
    with pytest.raises(InputError, match="precision 'int4'"):
        pipeline_for("int4")
    with pytest.raises(InputError, match="unknown passes"):
        run_pipeline(None, precision="fp8", pass_options={"quantize_everything": {}})
    with pytest.raises(InputError, match="the fp32 pipeline is"):
        run_pipeline(None, stop_after="quantize_moe_experts")


def test_mxfp4_graph_holds_only_e4m3_experts(fp4):
    model, base, g = fp4
    nodes = moe_nodes(g)
    assert len(nodes) == model.cfg.n_layers
    old_targets = {k for k in base.program.state_dict if k.startswith("model.layers.") and ".ffn.experts." in k}
    assert len(old_targets) == 6 * model.cfg.n_layers
    assert not old_targets & set(g.program.state_dict)  # the MXFP4 constants are gone (MTP's: unused, kept)
    placeholders = {n.name for n in g.graph_module.graph.nodes if n.op == "placeholder"}
    assert not any(p.startswith("b_model_layers_") and "_ffn_experts_w" in p and not p.endswith("_fp8")
               for p in placeholders)
    for n in nodes:
        for i in WEIGHT_ARGS:
            w, s = constant_value(g.program, n.args[i]), constant_value(g.program, n.args[i + 1])
            assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu, (n.name, i, w.dtype, s.dtype)
    report = moe_quant_report(g)
    assert len(report.tensors) == 3 * model.cfg.n_layers
    assert report.mismatches == 0
    assert {t.source for t in report.tensors} == {"mxfp4"}
    assert {t.block for t in report.tensors} == {(128, 128)}  # random checkpoints: the fast block is exact
    assert all(r.mismatches == 0 and r.calc_diff == 0.0 for t in report.tensors for r in t.experts)
    g.program.validate()  # torch.export's own signature / state-dict checks


def test_verifier_rejects_fp4_or_bf16_experts_left(fp4):
    model, _, g = fp4
    for bad_w, bad_s in ((layer_experts(model, 1)[0], layer_experts(model, 1)[1]),  # MXFP4 left in layer 1
                         (torch.randn(8, 128, 256).to(torch.bfloat16), torch.zeros(0))):  # BF16 left in layer 1
        bad = copy.deepcopy(g)
        node = moe_nodes(bad)[1]
        args = list(node.args)
        args[3] = add_buffer(bad.program, "bad.w1.weight", bad_w)
        args[4] = add_buffer(bad.program, "bad.w1.scale", bad_s)
        node.args = tuple(args)
        verify_graph(bad, after="remove_dead_code")  # the rule holds only once quantize_moe_experts has run
        with pytest.raises(GraphSpecError, match=rf"node {node.name} .*model\.layers\.1\.ffn reads w1 .*"
                                                 rf"{str(bad_w.dtype).removeprefix('torch.')}"):
            verify_graph(bad, after="quantize_moe_experts")


def test_mxfp4_moe_block_equals_dequantised_fp4_reference(fp4):
    model, _, g = fp4
    for i, node in enumerate(moe_nodes(g)):
        x, weights, ids = routed_inputs(model, i, 48, seed=i)
        new = [constant_value(g.program, a) for a in node.args[3:9]]
        want = MOE(x, weights, ids, *layer_experts(model, i), model.cfg.swiglu_limit)
        got = MOE(x, weights, ids, *new, model.cfg.swiglu_limit)
        assert want.abs().max() > 0
        assert torch.equal(got, want), f"layer {i}: max abs diff {(got - want).abs().max().item():.3g}"


def test_mxfp4_logits_before_and_after_the_pass(fp4):
    model, base, g = fp4
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(5))
    cache = model.new_cache(2, MAX_LEN)
    before, after = run(base, tokens, cache), run(g, tokens, cache)
    assert calc_diff(after, before) < TOLERANCES["model_logits"]["fp8"]
    assert torch.equal(after, before), f"max abs diff {(after - before).abs().max().item():.3g}"


def test_coarse_block_on_spread_scales_is_lossy(fp4):
    """2^10 next to 2^-20 inside one 128x128 block: 128x128 loses values (refused unless allow_lossy); the
    automatic choice falls back to a finer block and stays exact (the reference body reads finer blocks)."""
    model, _, _ = fp4
    experts = [t.clone() for t in layer_experts(model, 3)]
    s1 = experts[1].view(torch.uint8)
    s1[0, 0, 0], s1[0, 1, 0] = 127 + 10, 127 - 20  # expert 0, rows 0 and 1, first 32 inputs
    x, weights, ids = routed_inputs(model, 3, 16, seed=7)
    example = (x, weights, ids)
    with pytest.raises(LossyRepackError, match=r"experts\.w1 .*128x128 is lossy"):
        rewrite_moe_experts(export_one(experts, 10.0, example), block=(128, 128))
    lossy = rewrite_moe_experts(export_one(experts, 10.0, example), block=(128, 128), allow_lossy=True)
    w1 = lossy.tensors[0]
    assert w1.tensor == "w1" and w1.mismatches > 0 and w1.lossy_blocks >= 1 and w1.experts[0].worst[0].index == (0, 0)
    assert lossy.tensors[1].mismatches == 0  # w3 untouched: exact in the same block
    ep = export_one(experts, 10.0, example)
    exact = rewrite_moe_experts(ep)
    assert exact.mismatches == 0 and exact.tensors[0].block in AUTO_BLOCKS[1:]
    assert exact.tensors[0].block == exact.tensors[1].block  # w1 / w3 share one block
    assert exact.tensors[2].block == (128, 128)
    want = MOE(x, weights, ids, *experts, 10.0)
    assert torch.equal(ep.module()(x, weights, ids), want)
    with pytest.raises(InputError, match="expert FP8 block"):
        rewrite_moe_experts(export_one(experts, 10.0, example), block=(256, 256))


def test_bf16_experts_report_and_moe_block(tmp_path):
    cfg = ModelConfig.preset("tiny", expert_dtype="bf16")
    model = load_checkpoint(random_checkpoint(cfg, 4, tmp_path / "bf16"), dtype=torch.float32).eval()
    i = cfg.n_layers - 1
    experts = layer_experts(model, i)
    assert experts[0].dtype == torch.bfloat16
    x, weights, ids = routed_inputs(model, i, 64, seed=11)
    ep = export_one(experts, cfg.swiglu_limit, (x, weights, ids))
    report = rewrite_moe_experts(ep)
    node = next(n for n in ep.graph.nodes if n.op == "call_function" and n.target is MOE)
    for t, a in zip(report.tensors, WEIGHT_ARGS):
        q, s = constant_value(ep, node.args[a]), constant_value(ep, node.args[a + 1])
        assert t.source == "bf16" and t.block == (128, 128) and t.mismatches is None
        assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu
        ref = experts[a - 3].float()
        for e, r in enumerate(t.experts):  # per block: the reported error is the real one, and within half an ulp
            err = _blocks_2d((dequant_fp8_block(q[e], s[e]) - ref[e]).abs(), 128, 128).amax((-3, -1))
            amax = _blocks_2d(ref[e].abs(), 128, 128).amax((-3, -1))
            assert torch.equal(r.max_abs_err, err) and (err > 0).all() and (err <= amax / 14).all()
            assert (r.rms_err <= r.max_abs_err).all() and 0 < r.calc_diff < TOLERANCES["kernel"]["fp8"]
    want = MOE(x, weights, ids, *experts, cfg.swiglu_limit)
    got = ep.module()(x, weights, ids)
    diff = calc_diff(got, want)  # measured 2.2e-3: see the module docstring for why not < 1e-3
    assert 0 < diff < TOLERANCES["moe_block_fp8_vs_bf16"]["fp8"], f"MoE block calc_diff {diff:.3e}"


def test_memo_shares_converted_experts_between_programs():
    """Two programs over the same expert tensors (a build's prefill and decode) with one memo: the second gets
    the first's FP8 tensors (one copy in memory and in the weights file); without a memo each converts its own."""
    g = torch.Generator().manual_seed(5)
    E, d, inter = 4, 256, 128
    experts = []
    for O, K in ((inter, d), (inter, d), (d, inter)):
        experts += [torch.randn(E, O, K, generator=g).to(torch.bfloat16), torch.zeros(0)]
    mod = OneMoE(experts, 10.0)
    example = (torch.randn(3, d).to(torch.bfloat16), torch.rand(3, 2), torch.randint(0, E, (3, 2)))
    fp8 = lambda ep: [v for k, v in ep.state_dict.items() if k.endswith("_fp8")]
    memo: dict = {}
    a, b, c = (torch.export.export(mod, example) for _ in range(3))
    rewrite_moe_experts(a, memo=memo)
    rewrite_moe_experts(b, memo=memo)
    rewrite_moe_experts(c)
    assert len(fp8(a)) == 6 and all(x is y for x, y in zip(fp8(a), fp8(b)))
    assert not any(x.data_ptr() == y.data_ptr() for x, y in zip(fp8(a), fp8(c)))
    assert all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(fp8(a), fp8(c)))

"""The trace entry point (prefill + per-layer outputs for `validate`) keeps every fusion of the prefill graph:
the verifier's fused-op counts (from the config, as for prefill) hold and its indexer outputs come from
v4::csa_attention's picks output."""

import operator

import pytest
import torch

from v4compile.graph.capture import capture, trace_outputs
from v4compile.graph.passes import run_pipeline
from v4compile.graph.passes._common import op_counts
from v4compile.model.config import ModelConfig
from v4compile.model.reference import ReferenceModel


@pytest.mark.parametrize("layout", ["reference", "production"])
def test_trace_graph_fuses_like_prefill_and_outputs_the_fused_picks(layout):
    cfg = ModelConfig.preset("tiny")
    model = ReferenceModel(cfg, dtype=torch.bfloat16, device="meta").eval()
    tr = run_pipeline(capture(model, "trace", max_len=64, kv_layout=layout), verify=True)  # fused counts: config
    fp8 = "_fp8" if layout == "production" else ""
    names = trace_outputs(cfg)
    assert names[:2] == ["logits", "hidden.0"] and names.count("indexer.1") == 1 and len(names) == 1 + 4 + 2 + 4
    counts = op_counts(tr.graph_module)
    assert counts[f"v4.csa_attention{fp8}"] == 2 and counts[f"v4.hca_attention{fp8}"] == 1 and counts["v4.hc_pre"] == 8
    # as in the prefill graph (measured on tiny: 6; production 8: its window layer's empty second KV source is
    # not made with x.new_zeros, so that layer's attn_norm feeds FP8 linears only and fuses too)
    assert counts["v4.rms_norm_fp8_linear"] == (8 if fp8 else 6)
    assert counts["v4.topk_select"] == counts["v4.indexer_scores"] == counts["v4.compress"] == 0
    assert counts["v4.indexer_scores_fp4"] == counts["v4.compress_packed"] == 0
    out = next(n for n in tr.graph_module.graph.nodes if n.op == "output")
    user_outs = out.args[0][-len(names):]  # mutated caches come first in an exported program's outputs
    for name, node in zip(names, user_outs):
        if name.startswith("indexer."):
            src = node.args[0] if node.target is torch.ops.aten.clone.default else node
            assert src.target is operator.getitem and src.args[1] == 1, (name, src)
            assert src.args[0].target is getattr(torch.ops.v4, f"csa_attention{fp8}").default

"""The trace entry point (prefill + per-layer outputs for `validate`) keeps every fusion of the prefill graph:
the verifier's fused-op counts (from the config, as for prefill) hold and its indexer outputs come from
v4::csa_attention's picks output."""

import operator

import torch

from v4compile.graph.capture import capture, trace_outputs
from v4compile.graph.passes import run_pipeline
from v4compile.graph.passes._common import op_counts
from v4compile.model.config import ModelConfig
from v4compile.model.reference import ReferenceModel


def test_trace_graph_fuses_like_prefill_and_outputs_the_fused_picks():
    cfg = ModelConfig.preset("tiny")
    model = ReferenceModel(cfg, dtype=torch.bfloat16, device="meta").eval()
    tr = run_pipeline(capture(model, "trace", max_len=64), verify=True)  # verify: fused counts match the config
    names = trace_outputs(cfg)
    assert names[:2] == ["logits", "hidden.0"] and names.count("indexer.1") == 1 and len(names) == 1 + 4 + 2 + 4
    counts = op_counts(tr.graph_module)
    assert counts["v4.csa_attention"] == 2 and counts["v4.hca_attention"] == 1 and counts["v4.hc_pre"] == 8
    assert counts["v4.rms_norm_fp8_linear"] == 6  # as in the prefill graph (measured: 6 on tiny)
    assert counts["v4.topk_select"] == counts["v4.indexer_scores"] == counts["v4.compress"] == 0
    out = next(n for n in tr.graph_module.graph.nodes if n.op == "output")
    user_outs = out.args[0][-len(names):]  # mutated caches come first in an exported program's outputs
    for name, node in zip(names, user_outs):
        if name.startswith("indexer."):
            src = node.args[0] if node.target is torch.ops.aten.clone.default else node
            assert src.target is operator.getitem and src.args[1] == 1, (name, src)
            assert src.args[0].target is torch.ops.v4.csa_attention.default

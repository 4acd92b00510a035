"""`v4compile inspect --graph / --after`: op counts before/after the pipeline and the graph listing."""

from __future__ import annotations

import json
import re

from click.testing import CliRunner

from v4compile.cli import main
from v4compile.model.config import ModelConfig


def test_inspect_after_pass_json_lists_that_stage(tmp_path):
    r = CliRunner().invoke(main, ["inspect", "--preset", "tiny", "--json", "--after", "fuse_csa_attention",
                                  "--entry", "decode", "--verify", "--dump-after", "fuse_mhc",
                                  "--dump-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    dumped = (tmp_path / "decode.after_fuse_mhc.txt").read_text()
    assert "v4.hc_pre" in dumped and "v4.hc_mix" not in dumped and str(tmp_path) in r.stderr
    s = json.loads(r.stdout)
    g = s["graph"]
    assert s["layers"]["csa"] == 2 and g["entry"] == "decode" and g["after"] == "fuse_csa_attention"
    # counts are before / after the whole pipeline
    assert g["counts"]["v4.csa_attention"] == {"before": 0, "after": 2}
    assert g["counts"]["v4.hca_attention"] == {"before": 0, "after": 1}
    assert g["counts"]["v4.compress"] == {"before": 5, "after": 0}
    # the listing is the graph right after fuse_csa_attention: the HCA compressor is still there
    ops = [row["op"] for row in g["listing"]]
    assert ops.count("v4.csa_attention") == 2 and ops.count("v4.compress") == 1 and "v4.hc_mix" not in ops
    csa = next(row for row in g["listing"] if row["op"] == "v4.csa_attention")
    # (o, picks): the fused op also returns its indexer picks (read only by trace programs)
    assert csa["inputs"][2] == "start_pos" and re.fullmatch(r"\(bfloat16\[\w+, 1, 8, 96\], int32\[\w+, 1, 4\]\)",
                                                             csa["output"])


def test_inspect_graph_prints_fused_counts_for_bench():
    cfg = ModelConfig.preset("bench")
    kinds = [cfg.layer_kind(i) for i in range(cfg.n_layers)]
    r = CliRunner().invoke(main, ["inspect", "--preset", "bench", "--graph"], terminal_width=240)
    assert r.exit_code == 0, r.output
    rows = {m[1]: (int(m[2]), int(m[3])) for m in re.finditer(r"│ ([\w.]+)\s+│\s+(\d+) │\s+(\d+) │", r.output)}
    assert rows["v4.csa_attention"] == (0, kinds.count("csa"))
    assert rows["v4.hca_attention"] == (0, kinds.count("hca"))
    assert rows["v4.sparse_attention"] == (cfg.n_layers, kinds.count("window"))
    assert rows["v4.hc_pre"] == (0, 2 * cfg.n_layers)
    for op in ("v4.compress", "v4.indexer_scores", "v4.topk_select", "v4.hc_mix", "v4.sinkhorn", "v4.hc_collapse"):
        assert rows[op][0] > 0 and rows[op][1] == 0, (op, rows[op])
    assert "KV" in r.output  # the model summary is still printed first
    assert "prefill graph after pipeline: " in r.output


def test_inspect_unknown_pass_is_one_line_exit_2():
    r = CliRunner().invoke(main, ["inspect", "--preset", "tiny", "--after", "fuse_everything"])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "unknown pass 'fuse_everything'" in lines[0]

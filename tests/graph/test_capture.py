"""torch.export capture: v4 ops stay single nodes, dynamic batch/length, caches mutated in place, decode
step by step equals eager decode, typed export errors (the save/load round trip of a fused graph is in
test_passes.py)."""

from __future__ import annotations

import pytest
import torch

from v4compile.errors import ExportError, InputError
from v4compile.graph.capture import capture, load_graph, save_graph
from v4compile.graph.passes._common import op_counts
from v4compile.model.config import ModelConfig
from v4compile.model.reference import ReferenceModel
from v4compile.validate import max_rel_err as rel_err

MAX_LEN = 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return ReferenceModel(ModelConfig.preset("tiny"), dtype=torch.float32, seed=1).eval()


@pytest.fixture(scope="module")
def prefill(model):
    return capture(model, "prefill", max_len=MAX_LEN)


@pytest.fixture(scope="module")
def decode(model):
    return capture(model, "decode", max_len=MAX_LEN)


def assert_caches_equal(got: list[torch.Tensor], want: list[torch.Tensor], names: list[str]) -> None:
    for g, w, n in zip(got, want, names, strict=True):
        same = (g == w) | (torch.isinf(g) & torch.isinf(w) & (g.sign() == w.sign()))
        close = same | ((g - w).abs() <= 1e-5 * w.abs().nan_to_num(posinf=0, neginf=0).max().clamp_min(1e-30))
        bad = (~close).nonzero()
        assert bad.numel() == 0, f"{n}: {bad.shape[0]} mismatches, first at {bad[0].tolist()}: " \
                                 f"{g[tuple(bad[0])]} vs {w[tuple(bad[0])]}"


def tokens(cfg, B, T, seed):
    return torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def test_each_v4_op_is_one_node(model, prefill, decode):
    cfg = model.cfg
    kinds = [cfg.layer_kind(i) for i in range(cfg.n_layers)]
    for g in (prefill, decode):
        c = op_counts(g.graph_module)
        assert c["v4.sparse_attention"] == c["v4.ring_write"] == cfg.n_layers
        assert c["v4.compress"] == 2 * kinds.count("csa") + kinds.count("hca")
        assert c["v4.indexer_scores"] == c["v4.topk_select"] == kinds.count("csa")
        assert c["v4.hc_mix"] == c["v4.sinkhorn"] == c["v4.hc_collapse"] == c["v4.hc_post"] == 2 * cfg.n_layers
        assert c["v4.moe_route"] == c["v4.moe_experts"] == cfg.n_layers and c["v4.hc_head"] == 1
    # caches are graph inputs, start_pos is one too (no specialisation on positions)
    sig = prefill.program.graph_signature
    assert list(sig.user_inputs[:2]) == ["tokens", "start_pos"] and len(sig.user_inputs) == 2 + len(prefill.cache_names)


def test_prefill_graph_equals_eager_with_dynamic_batch_length_and_positions(model, prefill):
    """A batch of 1 then of 2 with per-sequence start positions: logits and every cache tensor agree."""
    cfg = model.cfg
    run = prefill.module()
    for B, T, start in ((1, 23, [0]), (2, 9, [23, 5])):
        eager_cache, graph_cache = model.new_cache(B, MAX_LEN), model.new_cache(B, MAX_LEN)
        if max(start):  # bring both caches to the start positions first (sequence b prefilled to start[b])
            for b, s in enumerate(start):
                one = model.new_cache(1, MAX_LEN)
                model(tokens(cfg, 1, s, seed=b), 0, one)
                for c in (eager_cache, graph_cache):
                    for t, src in zip(c.named_tensors().values(), one.named_tensors().values()):
                        t[b].copy_(src[0])
        tok, sp = tokens(cfg, B, T, seed=10 + B), torch.tensor(start)
        with torch.no_grad():
            want = model(tok, sp, eager_cache)
            got = run(tok, sp, *graph_cache.named_tensors().values())
        assert rel_err(got, want) <= 1e-5
        assert_caches_equal(list(graph_cache.named_tensors().values()), list(eager_cache.named_tensors().values()),
                            prefill.cache_names)


def test_decode_graph_step_by_step_equals_eager_decode(model, prefill, decode):
    """Prefill 13 tokens, then 7 one-token steps crossing CSA (4) and HCA (16) block ends and the window (16)."""
    cfg = model.cfg
    tok = tokens(cfg, 2, 20, seed=3)
    eager_cache, graph_cache = model.new_cache(2, MAX_LEN), model.new_cache(2, MAX_LEN)
    flat = list(graph_cache.named_tensors().values())
    step = decode.module()
    with torch.no_grad():
        model(tok[:, :13], 0, eager_cache)
        prefill.module()(tok[:, :13], torch.zeros(2, dtype=torch.int64), *flat)
        errs = []
        for p in range(13, 20):
            want = model(tok[:, p:p + 1], p, eager_cache)
            got = step(tok[:, p:p + 1], torch.full((2,), p), *flat)
            errs.append(rel_err(got, want))
    assert max(errs) <= 1e-5, errs
    assert_caches_equal(flat, list(eager_cache.named_tensors().values()), decode.cache_names)


def test_save_refuses_a_dtype_the_serializer_lacks(tmp_path, monkeypatch, decode):
    """torch 2.11's serializer has no float8_e8m0fnu: save_graph says so instead of a bare KeyError."""
    from torch._export.serde import serialize

    table = dict(serialize._TORCH_TO_SERIALIZE_DTYPE)
    table.pop(torch.float8_e8m0fnu, None)
    monkeypatch.setattr(serialize, "_TORCH_TO_SERIALIZE_DTYPE", table)
    with pytest.raises(ExportError, match="cannot serialize graphs holding torch.float8_e8m0fnu"):
        save_graph(decode, tmp_path / "g.pt2")
    assert not list(tmp_path.iterdir())


class DataDependent(ReferenceModel):
    def forward(self, tokens, start_pos=0, cache=None, **kw):
        if int(tokens.sum()) > 0:  # a Python branch on data: torch.export cannot trace it
            return super().forward(tokens, start_pos, cache, **kw)
        return super().forward(tokens + 1, start_pos, cache, **kw)


def test_export_failure_is_a_typed_error_naming_module_and_reason():
    m = DataDependent(ModelConfig.preset("tiny"), device="meta")
    with pytest.raises(ExportError, match=r"DataDependent's prefill entry point.*failed: \w+: .*"
                                         r"\(at File .*test_capture\.py\", line \d+, in forward\)"):
        capture(m, "prefill", max_len=32)


def test_bad_capture_arguments_are_input_errors(model):
    with pytest.raises(InputError, match="entry point 'verify'"):
        capture(model, "verify", max_len=32)
    with pytest.raises(InputError, match="batch=1"):
        capture(model, "decode", max_len=32, batch=1)
    with pytest.raises(InputError, match="no saved graph"):
        load_graph("/nonexistent/graph.pt2")

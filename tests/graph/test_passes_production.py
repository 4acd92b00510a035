"""The pass pipeline on production-layout graphs (model/cache.py, bf16): every attention fuses into the _fp8
fused ops, the verifier holds after every pass, and the fused graph, the unfused graph and the eager model give
bit-identical logits and caches (prefill from different positions, decode across CSA and HCA block ends)."""

from __future__ import annotations

import copy

import pytest
import torch

from v4compile.graph.capture import capture
from v4compile.graph.passes import PIPELINE, run_pipeline
from v4compile.graph.passes._common import op_counts, user_input
from v4compile.model.config import ModelConfig
from v4compile.model.reference import ReferenceModel

MAX_LEN = 64
UNFUSED = ("v4.compress", "v4.compress_packed", "v4.indexer_scores", "v4.indexer_scores_fp4", "v4.topk_select",
           "v4.sparse_attention", "v4.csa_attention", "v4.hca_attention")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return ReferenceModel(ModelConfig.preset("tiny"), dtype=torch.bfloat16, seed=1).eval()


@pytest.fixture(scope="module")
def prefill(model):
    return capture(model, "prefill", max_len=MAX_LEN, kv_layout="production")


def prepared_cache(model, start: list[int], seed: int):
    """A production cache whose sequence b holds a random prefix of start[b] tokens."""
    cache = model.new_cache(len(start), MAX_LEN, "production")
    g = torch.Generator().manual_seed(seed)
    for b, s in enumerate(start):
        one = model.new_cache(1, MAX_LEN, "production")
        with torch.no_grad():
            model(torch.randint(0, model.cfg.vocab_size, (1, s), generator=g), 0, one)
        for t, src in zip(cache.named_tensors().values(), one.named_tensors().values()):
            t[b].copy_(src[0])
    return cache


def assert_fully_fused_fp8(cfg: ModelConfig, counts) -> None:
    kinds = [cfg.layer_kind(i) for i in range(cfg.n_layers)]
    assert counts["v4.csa_attention_fp8"] == kinds.count("csa"), counts
    assert counts["v4.hca_attention_fp8"] == kinds.count("hca"), counts
    assert counts["v4.sparse_attention_fp8"] == kinds.count("window"), counts
    assert counts["v4.ring_write"] == 2 * kinds.count("window"), counts  # data and scale rings
    left = {op: counts[op] for op in UNFUSED if counts[op]}
    assert not left, f"unfused nodes remain: {left}"


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(bits(x), bits(y)) for x, y in zip(a, b, strict=True))


def test_prefill_fuses_and_is_bit_identical_to_eager(model, prefill):
    assert prefill.kv_layout == "production"
    fused = run_pipeline(copy.deepcopy(prefill), verify=True)
    assert_fully_fused_fp8(model.cfg, op_counts(fused.graph_module))
    cache = prepared_cache(model, [13, 6], seed=5)
    tok = torch.randint(0, model.cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(6))
    sp = torch.tensor([13, 6])  # sequence 0 crosses position 15 and 23 (CSA blocks; HCA block 0 completes)
    runs = []
    for g in (prefill, fused):
        flat = [t.clone() for t in cache.named_tensors().values()]
        with torch.no_grad():
            runs.append((g.module()(tok, sp, *flat), flat))
    with torch.no_grad():
        want = model(tok, sp, cache)
    (plain, plain_cache), (got, got_cache) = runs
    assert same([plain, *plain_cache], [want, *cache.named_tensors().values()])
    assert same([got, *got_cache], [plain, *plain_cache])


def test_decode_fuses_and_is_bit_identical_step_by_step(model):
    plain = capture(model, "decode", max_len=MAX_LEN, kv_layout="production")
    fused = run_pipeline(copy.deepcopy(plain), verify=True)
    assert_fully_fused_fp8(model.cfg, op_counts(fused.graph_module))
    cache = prepared_cache(model, [13, 6], seed=7)
    b = [t.clone() for t in cache.named_tensors().values()]
    run_fused, g = fused.module(), torch.Generator().manual_seed(8)
    with torch.no_grad():
        for step in range(4):  # sequence 0 decodes positions 13..16: blocks end at 15 (CSA and HCA)
            tok = torch.randint(0, model.cfg.vocab_size, (2, 1), generator=g)
            sp = torch.tensor([13 + step, 6 + step])
            assert same([run_fused(tok, sp, *b)], [model(tok, sp, cache)]), step
    assert same(b, list(cache.named_tensors().values()))


def test_rule_refuses_when_a_scale_cache_is_read_elsewhere(prefill):
    """A foreign reader of one CSA layer's kv_scale blocks that layer's fusion; the other CSA layer still fuses."""
    g = copy.deepcopy(prefill)
    scale = user_input(g.graph_module, g.program.graph_signature, 2 + g.cache_names.index("blocks.1.kv_scale"))
    first = next(n for n in g.graph_module.graph.nodes if n.op != "placeholder")
    with g.graph_module.graph.inserting_before(first):
        spy = g.graph_module.graph.call_function(torch.ops.aten.clone.default, (scale,))
    spy.meta["val"] = scale.meta["val"]
    for p in PIPELINE[:2]:
        p(g, g.cfg)
    c = op_counts(g.graph_module)
    assert c["v4.csa_attention_fp8"] == 1 and c["v4.indexer_scores_fp4"] == 1 and c["v4.compress_packed"] == 3, c

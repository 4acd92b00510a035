"""Cache semantics of the reference: chunked prefill, per-sequence positions, slot reset, causality, and
that no compressed entry of an incomplete block is ever visible (V4-SPEC sections 3.3, 6)."""

from __future__ import annotations

import math

import pytest
import torch

from v4compile.model.config import ModelConfig
from v4compile.model.reference import ReferenceModel
from v4compile.validate import max_rel_err as rel_err

TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> ReferenceModel:
    """tiny with REAL routing (top-2 experts, index_topk 4): chunk invariance must hold with selection on."""
    return ReferenceModel(ModelConfig.preset("tiny"), dtype=torch.float32, seed=11)


def toks(model: ReferenceModel, b: int, n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, model.cfg.vocab_size, (b, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_chunked_prefill_equals_one_shot(model):
    tok = toks(model, 1, 88, 1)
    whole = model(tok)
    cache = model.new_cache(1)
    parts, s = [], 0
    for n in (37, 1, 50):
        parts.append(model(tok[:, s:s + n], s, cache))
        s += n
    err = rel_err(torch.cat(parts, 1), whole)
    assert err < TOL, f"chunked vs one-shot prefill: {err:.3e}"
    # the cache left behind continues exactly like a one-shot prefill's
    c2 = model.new_cache(1)
    model(tok, 0, c2)
    nxt = toks(model, 1, 1, 2)
    assert rel_err(model(nxt, 88, cache), model(nxt, 88, c2)) < TOL


@torch.no_grad()
def test_batch_with_different_positions_equals_each_sequence_alone(model):
    a, b = toks(model, 1, 60, 3), toks(model, 1, 60, 4)
    # slot 0 runs a: 21, 13, 1, 1 tokens; slot 1 runs b from scratch after the first call
    cache = model.new_cache(2)
    model(torch.cat((a[:, :21], b[:, :21])), 0, cache)
    cache.reset([1])
    joint = [model(torch.cat((a[:, 21:34], b[:, 0:13])), torch.tensor([21, 0]), cache)]
    joint.append(model(torch.cat((a[:, 34:35], b[:, 13:14])), torch.tensor([34, 13]), cache))
    joint.append(model(torch.cat((a[:, 35:36], b[:, 14:15])), torch.tensor([35, 14]), cache))
    alone_a, alone_b = model(a[:, :36]), model(b[:, :15])
    assert rel_err(joint[0][0], alone_a[0, 21:34]) < TOL
    assert rel_err(joint[0][1], alone_b[0, 0:13]) < TOL
    for k, (pa, pb) in enumerate(((34, 13), (35, 14))):
        assert rel_err(joint[k + 1][0, 0], alone_a[0, pa]) < TOL
        assert rel_err(joint[k + 1][1, 0], alone_b[0, pb]) < TOL


@torch.no_grad()
def test_reset_slot_behaves_like_a_fresh_cache(model):
    old, new = toks(model, 2, 45, 5), toks(model, 1, 9, 6)  # 9 tokens: CSA state holds a partial block
    cache = model.new_cache(2)
    model(old, 0, cache)
    cache.reset(0)
    more = toks(model, 1, 10, 14)  # slot 1 keeps going meanwhile
    reused = model(torch.cat((new, more[:, :9])), torch.tensor([0, 45]), cache)
    fresh_cache = model.new_cache(1)
    fresh = model(new, 0, fresh_cache)
    assert torch.equal(reused[0], fresh[0])
    nxt = toks(model, 1, 1, 7)
    step = model(torch.cat((nxt, more[:, 9:])), torch.tensor([9, 54]), cache)
    assert torch.equal(step[0], model(nxt, 9, fresh_cache)[0])
    for name, t in cache.named_tensors().items():  # the reset slot now holds what a fresh slot holds
        f = fresh_cache.named_tensors()[name]
        assert torch.equal(t[0], f[0]), name


@torch.no_grad()
def test_causality_later_tokens_never_change_earlier_logits(model):
    tok = toks(model, 1, 70, 8)
    base = model(tok)
    for p in (0, 15, 33, 50):
        alt = tok.clone()
        alt[:, p + 1:] = toks(model, 1, 70 - p - 1, 9 + p)
        out = model(alt)
        assert rel_err(out[:, :p + 1], base[:, :p + 1]) < 1e-6, f"position <= {p} changed"
        assert rel_err(out[:, p + 1:], base[:, p + 1:]) > 1e-3  # the change itself is visible


@torch.no_grad()
def test_indexer_never_picks_an_incomplete_block(model):
    trace: dict = {}
    model(toks(model, 2, 90, 10), trace=trace)
    pos = torch.arange(90).view(1, 90, 1)
    for layer, idx in trace["indexer"].items():
        visible = 4 * (idx.long() + 1) <= pos + 1
        assert ((idx < 0) | visible).all(), f"layer {layer}: an incomplete block was picked"
        scores = trace["indexer_scores"][layer]
        j = torch.arange(scores.shape[-1]).view(1, 1, -1)
        hidden = (4 * (j + 1) > pos + 1).expand_as(scores)
        assert (scores[hidden] == -math.inf).all() and (scores[~hidden] > -math.inf).all()
        # with fewer complete blocks than index_topk the remaining picks are -1
        n_vis = (pos[0, :, 0] + 1) // 4
        for b in range(idx.shape[0]):
            assert torch.equal((idx[b] >= 0).sum(-1), n_vis.clamp(max=idx.shape[-1]))


@torch.no_grad()
def test_state_of_an_incomplete_block_is_invisible_until_it_completes(model):
    """After 70 tokens (CSA block 17 = 68..71 and HCA block 4 = 64..79 incomplete), scramble every row that
    belongs to incomplete blocks: compressed rows >= the complete count and the compressor state rows of the
    current block. Decode of position 70 (completes nothing) is unchanged; position 71 completes the CSA
    block, whose entry must then come from the scrambled state rows."""
    cfg = model.cfg
    tok = toks(model, 1, 72, 12)
    clean = model.new_cache(1)
    model(tok[:, :70], 0, clean)
    dirty = model.new_cache(1)
    model(tok[:, :70], 0, dirty)
    g = torch.Generator().manual_seed(13)
    for i, lc in enumerate(dirty.layers[: cfg.n_layers]):
        m = lc.ratio
        if not m:
            continue
        lag = m if m == 4 else 0
        lc.kv[:, 70 // m:] = torch.randn(lc.kv[:, 70 // m:].shape, generator=g)
        lc.kv_state[:, lag:] = torch.randn(lc.kv_state[:, lag:].shape, generator=g)
        lc.score_state[:, lag:] = torch.randn(lc.score_state[:, lag:].shape, generator=g)
        if m == 4:
            lc.idx_kv[:, 70 // 4:] = torch.randn(lc.idx_kv[:, 70 // 4:].shape, generator=g)
            lc.idx_kv_state[:, 4:] = torch.randn(lc.idx_kv_state[:, 4:].shape, generator=g)
            lc.idx_score_state[:, 4:] = torch.randn(lc.idx_score_state[:, 4:].shape, generator=g)
    a = model(tok[:, 70:71], 70, clean)
    b = model(tok[:, 70:71], 70, dirty)
    assert torch.equal(a, b), "an incomplete block's state leaked into position 70"
    model(tok[:, 71:72], 71, clean)
    model(tok[:, 71:72], 71, dirty)
    for i in cfg.csa_layers:  # block 17 now exists, pooled from the scrambled rows of positions 68, 69
        assert not torch.equal(clean.layers[i].kv[:, 17], dirty.layers[i].kv[:, 17])
        assert not torch.equal(clean.layers[i].idx_kv[:, 17], dirty.layers[i].idx_kv[:, 17])
        assert torch.equal(clean.layers[i].kv[:, :17], dirty.layers[i].kv[:, :17])

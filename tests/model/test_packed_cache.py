"""The production KV layout (V4-SPEC 6.2) as a cache property: allocation, typed refusals, reset, measured bytes
per token, the packed ops' bytes, and bit-identical eager logits against the reference layout (bf16)."""

from __future__ import annotations

import math

import pytest
import torch

from v4compile.errors import InputError
from v4compile.model import ops
from v4compile.model.cache import SLOT_ALIGN_ROWS, Cache
from v4compile.model.config import ModelConfig
from v4compile.model.kv_bytes import kv_bytes
from v4compile.model.packed_ops import decode_kv
from v4compile.model.reference import ReferenceModel
from v4compile.model.rope import rope_inv_freq
from v4compile.quant.kv_layout import pack_index_keys, pack_kv_cache, unpack_index_rows

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_LEN = 64


@pytest.fixture(scope="module")
def model() -> ReferenceModel:
    return ReferenceModel(ModelConfig.preset("tiny"), dtype=torch.bfloat16, seed=3).eval()


def test_production_allocation_fields_dtypes_and_order():
    cfg = ModelConfig.preset("tiny")
    c = Cache.allocate(cfg, 2, MAX_LEN, torch.bfloat16, layout="production")
    ref = Cache.allocate(cfg, 2, MAX_LEN, torch.bfloat16)
    assert c.layout == "production" and ref.layout == "reference"
    names = list(c.named_tensors())
    assert names[:2] == ["blocks.0.ring", "blocks.0.ring_scale"]
    assert names[2:12] == [f"blocks.1.{f}" for f in ("ring", "ring_scale", "kv", "kv_scale", "kv_state", "score_state",
                                                      "idx_kv", "idx_kv_scale", "idx_kv_state", "idx_score_state")]
    assert set(names) - set(ref.named_tensors()) == {n for n in names if n.endswith("_scale") and "score" not in n}
    t = c.named_tensors()
    nope, R, Di = cfg.head_dim - cfg.rope_head_dim, cfg.rope_head_dim, cfg.index_head_dim
    assert t["blocks.1.ring"].shape == (2, cfg.window_size, nope + 2 * R) and t["blocks.1.ring"].dtype == torch.uint8
    rows = lambda m: -(-(MAX_LEN // m + 1) // SLOT_ALIGN_ROWS) * SLOT_ALIGN_ROWS  # entries + scratch, padded
    assert t["blocks.2.kv"].shape == (2, rows(16), nope + 2 * R) and t["blocks.2.kv_scale"].shape[-1] == 8
    assert t["blocks.3.idx_kv"].shape == (2, rows(4), Di // 2)
    assert t["blocks.3.idx_kv_scale"].shape == (2, rows(4), Di // 32)
    assert ref.named_tensors()["blocks.3.idx_kv"].shape[1] == MAX_LEN // 4 + 1  # the reference layout: unpadded
    assert t["blocks.3.kv_state"].dtype == torch.float32 and (t["blocks.3.score_state"] == -math.inf).all()
    assert list(Cache.allocate(cfg, 2, MAX_LEN, torch.bfloat16, layout="production").named_tensors()) == names


def test_bad_layouts_are_input_errors():
    cfg = ModelConfig.preset("tiny")
    with pytest.raises(InputError, match="layout 'packed'; expected one of"):
        Cache.allocate(cfg, 1, MAX_LEN, torch.bfloat16, layout="packed")
    with pytest.raises(InputError, match="float32 activations: it stores the RoPE dims as bf16"):
        Cache.allocate(cfg, 1, MAX_LEN, torch.float32, layout="production")
    with pytest.raises(InputError, match="576 nope dims; expected a multiple of 64, at most 512"):
        Cache.allocate(ModelConfig.preset("tiny", head_dim=608), 1, MAX_LEN, torch.bfloat16, layout="production")
    with pytest.raises(InputError, match="RoPE dims as bf16"):
        ReferenceModel(ModelConfig.preset("tiny"), dtype=torch.float32, device="meta").new_cache(1, 8, "production")


def test_reset_zeros_packed_rows_and_sets_scores_to_minus_inf():
    c = Cache.allocate(ModelConfig.preset("tiny"), 3, MAX_LEN, torch.bfloat16, layout="production")
    for t in c.named_tensors().values():
        t.fill_(7)
    c.reset([1])
    for name, t in c.named_tensors().items():
        want = -math.inf if name.endswith("score_state") else 0
        assert (t[1] == want).all() and (t[0] == 7).all() and (t[2] == 7).all(), name


@pytest.mark.parametrize("preset", ["tiny", "flash", "pro"])
@pytest.mark.parametrize("layout", ["reference", "production"])
def test_measured_bytes_per_token_agree_with_the_formula(preset, layout):
    cfg = ModelConfig.preset(preset)
    device = "cpu" if preset == "tiny" else "meta"
    c = Cache.allocate(cfg, 2, 4096, torch.bfloat16, device, layout)
    assert c.kv_bytes_per_token() == kv_bytes(cfg, layout).per_token
    if preset == "flash":
        assert int(c.kv_bytes_per_token()) == {"production": 3514, "reference": 6880}[layout]


# ------------------------------------------------------------------------------------------------ ops


def compress_args(m: int, D: int, rotate: bool, seed: int, T: int = 11):
    g = torch.Generator().manual_seed(seed)
    c = 2 if m == 4 else 1
    return (torch.randn(2, T, c * D, generator=g), torch.randn(2, T, c * D, generator=g),
            torch.randn(m, c * D, generator=g), 1 + 0.1 * torch.randn(D, generator=g).bfloat16(),
            rope_inv_freq(64, 1e4, yarn=False), torch.tensor([3, 9]))


@pytest.mark.parametrize("m,D,rotate", [(4, 192, False), (16, 576, False), (4, 128, True)],
                         ids=["csa", "hca-v4-width", "indexer"])
def test_compress_packed_stores_the_encoding_of_what_compress_stores(m, D, rotate):
    """Same states; cache bytes == pack_kv_cache / pack_index_keys (strict) of the bf16 cache compress fills."""
    proj, gate, ape, w, inv, sp = compress_args(m, D, rotate, seed=m + D)
    c = 2 if m == 4 else 1
    n = 40 // m + 1
    state = [torch.zeros(2, c * m, c * D), torch.full((2, c * m, c * D), -math.inf)]
    state2 = [t.clone() for t in state]
    bf = torch.zeros(2, n, D, dtype=torch.bfloat16)
    width, sw = (D // 2, D // 32) if rotate else (D + 64, 8)
    data, scales = torch.zeros(2, n, width, dtype=torch.uint8), torch.zeros(2, n, sw, dtype=torch.uint8)
    for s in (0, 11, 22):  # three chunks of 11 tokens from positions 3 and 9
        torch.ops.v4.compress(proj, gate, ape, w, inv, sp + s, *state, bf, m, 1e-6, rotate)
        torch.ops.v4.compress_packed(proj, gate, ape, w, inv, sp + s, *state2, data, scales, m, 1e-6, rotate)
    assert all(torch.equal(a, b) for a, b in zip(state, state2))
    written = bf.float().abs().amax(-1) > 0  # rows of the blocks that completed (untouched rows stay zero bytes)
    written[:, -1] = False  # the scratch row
    assert (written.sum(1) >= 2).all()
    want = pack_index_keys(bf[written]) if rotate else pack_kv_cache(bf[written])
    assert torch.equal(data[written], want[0]) and torch.equal(scales[written], want[1])
    rows = written[:, :-1]
    assert not data[:, :-1][~rows].any() and not scales[:, :-1][~rows].any()  # no other row was written


def test_packed_read_ops_equal_their_act_dtype_counterparts(model):
    """sparse_attention_fp8 / indexer_scores_fp4 on a filled production cache == the plain ops on a reference one."""
    cfg = model.cfg
    tok = torch.randint(0, cfg.vocab_size, (2, 30), generator=torch.Generator().manual_seed(4))
    ref, prod = model.new_cache(2, MAX_LEN), model.new_cache(2, MAX_LEN, "production")
    with torch.no_grad():
        model(tok, 0, ref)
        model(tok, 0, prod)
    lr, lp = ref.layers[1], prod.layers[1]
    D, N = cfg.head_dim, lr.capacity  # the entries (the production rows add padding before their scratch row)
    for a, b, s in ((lr.ring, lp.ring, lp.ring_scale), (lr.kv[:, :N], lp.kv[:, :N], lp.kv_scale[:, :N])):
        assert torch.equal(decode_kv(b, s, D, torch.bfloat16).view(torch.int16), a.view(torch.int16))
    assert torch.equal(unpack_index_rows(lp.idx_kv[:, :N], lp.idx_kv_scale[:, :N]).view(torch.int16),
                       lr.idx_kv[:, :N].view(torch.int16))
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 3, cfg.n_heads, D, generator=g).bfloat16()
    idx = torch.randint(-1, cfg.window_size, (2, 3, 5), generator=g, dtype=torch.int32)
    idx2 = torch.randint(-1, lr.capacity, (2, 3, 4), generator=g, dtype=torch.int32)
    sink = torch.randn(cfg.n_heads, generator=g)
    want = ops.sparse_attention(q, lr.ring, idx, lr.kv, idx2, sink, 0.1)
    got = torch.ops.v4.sparse_attention_fp8(q, lp.ring, lp.ring_scale, idx, lp.kv, lp.kv_scale, idx2, sink, 0.1)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    qi = torch.randn(2, 3, cfg.index_n_heads, cfg.index_head_dim, generator=g).bfloat16()
    w, pos = torch.randn(2, 3, cfg.index_n_heads, generator=g).bfloat16(), torch.tensor([[29, 30, 31]] * 2)
    want = ops.indexer_scores(qi, w, lr.idx_kv, pos, 4)[..., :N]
    assert torch.equal(torch.ops.v4.indexer_scores_fp4(qi, w, lp.idx_kv, lp.idx_kv_scale, pos, 4)[..., :N], want)


# ------------------------------------------------------------------------------------------------ model


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


@torch.no_grad()
def test_eager_logits_and_trace_are_bit_identical_to_the_reference_layout(model):
    """Prefill, chunked continuation and decode across CSA (4) and HCA (16) block ends, sequences at different
    positions, and a reused slot: logits, indexer picks / scores and every cached value equal, bit for bit."""
    cfg, g = model.cfg, torch.Generator().manual_seed(6)
    caches = {lay: model.new_cache(2, MAX_LEN, lay) for lay in ("reference", "production")}

    def step(tok, sp):
        out = {}
        for lay, cache in caches.items():
            trace: dict = {}
            out[lay] = (model(tok, sp, cache, trace=trace), trace)
        (a, ta), (b, tb) = out["reference"], out["production"]
        assert torch.equal(bits(a), bits(b)), f"logits differ at start_pos {sp}: {(a - b).abs().max()}"
        for layer in ta["indexer"]:
            assert torch.equal(ta["indexer"][layer], tb["indexer"][layer]), ("indexer", layer, sp)
            n = ta["indexer_scores"][layer].shape[-1] - 1  # the entries; production rows pad before the scratch
            assert torch.equal(ta["indexer_scores"][layer][..., :n], tb["indexer_scores"][layer][..., :n]), (layer, sp)
            assert (tb["indexer_scores"][layer][..., n:] == -math.inf).all()  # padding and scratch never visible

    step(torch.randint(0, cfg.vocab_size, (2, 13), generator=g), torch.tensor([0, 0]))  # prefill
    step(torch.randint(0, cfg.vocab_size, (2, 6), generator=g), torch.tensor([13, 13]))  # continuation
    for lay in caches:  # slot 1 starts a new sequence: positions 19 (slot 0) and 0 (slot 1) from here on
        caches[lay].reset([1])
    step(torch.randint(0, cfg.vocab_size, (2, 5), generator=g), torch.tensor([19, 0]))
    for i in range(14):  # decode: slot 0 crosses position 31 (CSA and HCA (16) block ends), slot 1 reaches 18
        step(torch.randint(0, cfg.vocab_size, (2, 1), generator=g), torch.tensor([24 + i, 5 + i]))
    ref, prod = caches["reference"], caches["production"]
    for lr, lp in zip(ref.layers, prod.layers):
        assert torch.equal(bits(decode_kv(lp.ring, lp.ring_scale, cfg.head_dim, torch.bfloat16)), bits(lr.ring))
        if lr.kv is not None:
            n = lr.capacity
            assert torch.equal(bits(decode_kv(lp.kv, lp.kv_scale, cfg.head_dim, torch.bfloat16)[:, :n]),
                               bits(lr.kv[:, :n]))
            assert torch.equal(lp.kv_state, lr.kv_state) and torch.equal(lp.score_state, lr.score_state)
        if lr.idx_kv is not None:
            n = lr.idx_kv.shape[1] - 1
            assert torch.equal(bits(unpack_index_rows(lp.idx_kv, lp.idx_kv_scale)[:, :n]), bits(lr.idx_kv[:, :n]))
    assert prod.layers[2].kv[:, 1].any(), "the HCA layer's second block (positions 16..31) was not written"


@pytest.mark.parametrize("preset", ["tiny", "demo", "bench", "flash"])
@pytest.mark.parametrize("max_len", [256, 1000, 4096])
def test_every_slot_of_a_production_cache_starts_16_byte_aligned(preset, max_len):
    """A CUDA AOTInductor model copies an input that starts off 16 bytes and loses its writes to it (session 8):
    the slot views an engine passes for a subset of its sequences must all start aligned."""
    cfg = ModelConfig.preset(preset)
    c = Cache.allocate(cfg, 3, max_len, torch.bfloat16, "meta", "production")
    off = {n: t.stride(0) * t.element_size() for n, t in c.named_tensors().items()
           if t.stride(0) * t.element_size() % 16}
    assert off == {}, f"slot strides in bytes off 16: {off}"

"""ReferenceModel structure, seeded init, input errors, bf16 and unquantised variants."""

from __future__ import annotations

import math

import pytest
import torch

from v4compile.errors import InputError
from v4compile.model.config import ModelConfig
from v4compile.model.init import init_state_dict, reference_schema
from v4compile.model.ops import BODIES
from v4compile.model.reference import ReferenceModel
from v4compile.model.schema import model_schema
from v4compile.quant.formats import fake_quant_fp4, fake_quant_fp8


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny() -> ReferenceModel:
    return ReferenceModel(ModelConfig.preset("tiny"), dtype=torch.float32, seed=0)


def assert_matches(sd: dict, spec: dict) -> None:
    assert list(sd) == list(spec) or set(sd) == set(spec), f"keys differ: {sorted(set(sd) ^ set(spec))[:6]}"
    bad = [(k, str(spec[k]), str(sd[k].dtype), list(sd[k].shape)) for k in spec
           if tuple(sd[k].shape) != spec[k].shape or sd[k].dtype != spec[k].dtype]
    assert not bad, f"{len(bad)} tensors differ from the schema, first: {bad[:3]}"


@pytest.mark.parametrize("preset", ["tiny", "tiny-128"])
def test_state_dict_is_exactly_the_model_schema(preset):
    cfg = ModelConfig.preset(preset)
    assert_matches(ReferenceModel(cfg, dtype=torch.float32).state_dict(), model_schema(cfg))


def test_expert_format_variants_follow_the_schema():
    for expert_dtype in ("fp8", "bf16"):
        cfg = ModelConfig.preset("tiny", expert_dtype=expert_dtype, weight_dtype="bf16" if expert_dtype == "bf16" else "fp8")
        m = ReferenceModel(cfg, dtype=torch.float32)
        assert_matches(m.state_dict(), model_schema(cfg))
        out = m(torch.arange(20).view(1, 20))
        assert torch.isfinite(out).all()


def test_bench_structure_on_meta():
    cfg = ModelConfig.preset("bench")
    m = ReferenceModel(cfg, device="meta")
    assert_matches(m.state_dict(), model_schema(cfg))
    assert all(t.device.type == "meta" for t in m.state_dict().values())


def test_unquantised_variant_stores_float_weights_and_keeps_activation_fake_quant():
    cfg = ModelConfig.preset("tiny")
    spec = reference_schema(cfg, quantized=False)
    assert not any(k.endswith(".scale") for k in spec)
    assert spec["layers.0.ffn.experts.w1.weight"].shape == (cfg.n_routed_experts, cfg.moe_inter_dim, cfg.dim)
    assert spec["layers.0.attn.wq_a.weight"].dtype == torch.float32
    m = ReferenceModel(cfg, dtype=torch.float32, quantized=False)
    assert_matches(m.state_dict(), spec)
    tok = torch.arange(30).view(1, 30)
    cache = m.new_cache(1)
    with torch.no_grad():
        out = m(tok, 0, cache)
    assert torch.isfinite(out).all()
    # window KV of layer 0 is still FP8-rounded: every nope value is e4m3 x a power of two per 64 block
    nope = cache.layers[0].ring[0, :, : cfg.head_dim - cfg.rope_head_dim]
    assert nope.abs().sum() > 0 and torch.equal(fake_quant_fp8(nope, 64), nope)
    keys = cache.layers[1].idx_kv[0, :30 // 4]  # indexer keys stay FP4-rounded
    assert torch.equal(fake_quant_fp4(keys, 32), keys)


def test_differentiable_bodies_give_gradients():
    cfg = ModelConfig.preset("tiny")
    m = ReferenceModel(cfg, dtype=torch.float32, quantized=False)
    m.set_differentiable(True)
    w = m.layers[1].attn.wq_b.weight
    w.requires_grad_(True)
    tok = torch.arange(24).view(1, 24)
    loss = torch.nn.functional.cross_entropy(m(tok)[0, :-1], tok[0, 1:])
    loss.backward()
    assert w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0
    m.set_differentiable(False)


def test_init_is_seeded_and_well_formed():
    cfg = ModelConfig.preset("tiny")
    a, b, c = init_state_dict(cfg, 0), init_state_dict(cfg, 0), init_state_dict(cfg, 1)
    assert all(torch.equal(a[k].view(torch.uint8) if a[k].dtype.itemsize == 1 else a[k], b[k].view(torch.uint8)
                           if b[k].dtype.itemsize == 1 else b[k]) for k in a)
    assert not torch.equal(a["layers.0.attn.wq_a.weight"].float(), c["layers.0.attn.wq_a.weight"].float())
    for i in range(cfg.n_hash_layers):
        t = a[f"layers.{i}.ffn.gate.tid2eid"]
        assert t.shape == (cfg.vocab_size, cfg.n_activated_experts)
        srt = t.sort(-1).values
        assert (srt[:, 1:] != srt[:, :-1]).all(), "tid2eid rows must hold distinct experts"
        assert int(t.min()) >= 0 and int(t.max()) < cfg.n_routed_experts


@torch.no_grad()
def test_routing_uses_every_expert_and_mhc_weights_are_sane(tiny):
    cfg = tiny.cfg
    trace: dict = {}
    tok = torch.randint(0, cfg.vocab_size, (2, 96), generator=torch.Generator().manual_seed(0))
    logits = tiny(tok, trace=trace)
    for layer, ids in trace["experts"].items():
        assert set(ids.flatten().tolist()) == set(range(cfg.n_routed_experts)), f"layer {layer} leaves an expert idle"
    x = tiny.embed(tok, torch.float32).unsqueeze(2).repeat(1, 1, cfg.hc_mult, 1)
    L = tiny.layers[0]
    pre, post, logit = BODIES["hc_mix"](x, L.hc_attn_fn, L.hc_attn_scale, L.hc_attn_base, cfg.norm_eps, cfg.hc_eps)
    comb = BODIES["sinkhorn"](logit, cfg.hc_sinkhorn_iters, cfg.hc_eps)
    assert 0.15 < float(pre.mean()) < 0.4 and 0.7 < float(post.mean()) < 1.3
    assert float((comb.sum(-2) - 1).abs().max()) < 1e-5 and (comb >= 0).all()
    assert logits.std() > 0.3 and len(set(logits.argmax(-1).flatten().tolist())) > 10


def test_input_errors(tiny):
    cfg = tiny.cfg
    ok = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(InputError, match="token id"):
        tiny(torch.tensor([[0, cfg.vocab_size]]))
    with pytest.raises(InputError, match="token id"):
        tiny(torch.tensor([[-1, 0]]))
    with pytest.raises(InputError, match="tokens"):
        tiny(ok.float())
    with pytest.raises(InputError, match="tokens"):
        tiny(ok[0])
    cache = tiny.new_cache(1, 32)
    with pytest.raises(InputError, match="capacity"):
        tiny(ok, 29, cache)
    with pytest.raises(InputError, match="start_pos"):
        tiny(ok, torch.tensor([0, 0]), cache)
    with pytest.raises(InputError, match="start_pos"):
        tiny(ok, -1, cache)
    with pytest.raises(InputError, match="without a cache"):
        tiny(ok, 3)
    with pytest.raises(InputError, match="cache holds"):
        tiny(torch.zeros(2, 4, dtype=torch.long), 0, cache)
    with pytest.raises(InputError, match="max_len"):
        tiny.new_cache(1, 0)
    with pytest.raises(InputError, match="slots"):
        cache.reset([1])
    with pytest.raises(InputError, match="MTP"):
        tiny.mtp_forward(torch.zeros(1, 4, cfg.hc_mult, cfg.dim), ok, depth=1)
    tiny(ok, 28, cache)  # exactly at capacity is fine


@torch.no_grad()
def test_bf16_smoke():
    cfg = ModelConfig.preset("tiny")
    m = ReferenceModel(cfg, dtype=torch.bfloat16, seed=2)
    tok = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    cache = m.new_cache(2)
    logits = m(tok, 0, cache)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert logits.std() > 0.3, "degenerate logits"
    assert len(set(logits.argmax(-1).flatten().tolist())) > 10, "argmax (nearly) constant"
    step = m(tok[:, :1], 40, cache)
    assert torch.isfinite(step).all()
    f32 = ReferenceModel(cfg, dtype=torch.float32, seed=2)(tok)
    cos = torch.nn.functional.cosine_similarity(logits.flatten(), f32.flatten(), dim=0)
    assert float(cos) > 0.9, f"bf16 and fp32 references disagree (cosine {float(cos):.3f})"
    assert not math.isnan(float(cos))


def test_unquantised_variant_holds_the_dequantised_weights():
    """quantized=False holds exactly the dequantised weights of the same seeded checkpoint."""
    from v4compile.quant.formats import dequant_fp4_block, dequant_fp8_block

    cfg = ModelConfig.preset("tiny")
    q, f = init_state_dict(cfg, 5, quantized=True), init_state_dict(cfg, 5, quantized=False)
    assert set(f) == {k for k in q if not k.endswith(".scale")}
    for key, w in q.items():
        if w.dtype == torch.float8_e4m3fn:
            assert torch.equal(f[key], dequant_fp8_block(w, q[key.removesuffix(".weight") + ".scale"])), key
        elif w.dtype == torch.int8:
            assert torch.equal(f[key], dequant_fp4_block(w, q[key.removesuffix(".weight") + ".scale"])), key
        elif not key.endswith(".scale"):
            assert torch.equal(f[key], w), key


def test_teacher_forced_layers_on_their_own_streams_reproduce_the_run(tiny):
    """teacher_forced(tokens, trace["hidden"]) re-runs every layer on the run's own input streams: the same
    streams and logits; a perturbed layer shows up in its own local error only (the base of validate's local
    metric), a missing layer is a typed error."""
    tok = torch.randint(0, tiny.cfg.vocab_size, (1, 41), generator=torch.Generator().manual_seed(3))
    trace: dict = {}
    with torch.no_grad():
        logits = tiny(tok, 0, trace=trace)
    outs, head = tiny.teacher_forced(tok, trace["hidden"])
    assert sorted(outs) == list(range(tiny.cfg.n_layers))
    for i, h in trace["hidden"].items():
        assert torch.equal(outs[i], h), i
    assert torch.equal(head, logits)
    bent = dict(trace["hidden"])
    bent[1] = bent[1] * 1.01  # layer 1's output off by 1 %: layer 2 gets it, layers 0 / 1 / 3 do not move
    outs2, _ = tiny.teacher_forced(tok, bent)
    assert all(torch.equal(outs2[i], outs[i]) for i in (0, 1, 3)) and not torch.equal(outs2[2], outs[2])
    with pytest.raises(InputError, match=r"layer\(s\) \[2\] missing"):
        tiny.teacher_forced(tok, {i: h for i, h in trace["hidden"].items() if i != 2})


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype.itemsize == 1 else t


def test_seeded_init_is_drawn_on_the_model_device(monkeypatch):
    """The model asks random_tensors for its own device's draw (not the CPU default), and the CPU model holds
    init_state_dict's CPU draw bit for bit."""
    from v4compile.model import init

    cfg = ModelConfig.preset("tiny")
    want = init_state_dict(cfg, 0)
    asked, real = [], init.random_tensors

    def recording(cfg, seed, device=None):
        asked.append(device)
        return real(cfg, seed, device)

    monkeypatch.setattr(init, "random_tensors", recording)
    got = ReferenceModel(cfg, dtype=torch.float32, device="cpu").state_dict()
    assert asked == [torch.device("cpu")]
    assert all(torch.equal(_bits(got[k]), _bits(want[k])) for k in want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_init_is_seeded_well_formed_and_its_own_draw():
    """On a GPU the seeded init is drawn there (a bench-sized model's 4 608 expert matrices are not quantised on
    the host, ~0.94 s each on two CPU cores): the same seed gives the same weights, every tensor has its schema
    dtype, the floating ones (FP8 codes included) are finite, and the stream is CUDA's (not the CPU draw moved)."""
    cfg = ModelConfig.preset("tiny")
    a = ReferenceModel(cfg, dtype=torch.bfloat16, device="cuda").state_dict()
    b = ReferenceModel(cfg, dtype=torch.bfloat16, device="cuda").state_dict()
    cpu = init_state_dict(cfg, 0)
    schema = model_schema(cfg)
    for k, t in a.items():
        assert t.device.type == "cuda" and t.dtype == schema[k].dtype, k
        assert torch.equal(_bits(t), _bits(b[k])), k
    assert all(torch.isfinite(a[k].float()).all() for k in a if a[k].dtype.is_floating_point)
    assert not torch.equal(a["layers.0.attn.wq_a.weight"].float().cpu(), cpu["layers.0.attn.wq_a.weight"].float())

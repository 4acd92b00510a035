"""Checkpoint I/O: bit-exact round trip, strict validation of bad inputs, atomic writes, random weights."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import v4compile.model.checkpoint as ckpt
from v4compile.errors import CheckpointError, ConfigError
from v4compile.model.checkpoint import (
    checkpoint_config, hf_config_dict, load_state_dict, random_checkpoint, random_state_dict, random_tensors,
    read_state, save_state_dict,
)
from v4compile.model.config import ModelConfig
from v4compile.model.schema import checkpoint_schema, model_schema
from v4compile.quant.formats import dequant_fp4_block, dequant_fp8_block

TINY = ModelConfig.preset("tiny")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype.itemsize == 1 else t


def _assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b) or set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, (k, a[k].dtype, b[k].dtype)
        assert torch.equal(_bits(a[k]), _bits(b[k])), f"{k}: values differ"


@pytest.fixture(scope="session")
def tiny_state() -> dict:
    return random_state_dict(TINY, seed=0)


@pytest.fixture(scope="session")
def good_ckpt(tmp_path_factory, tiny_state) -> Path:
    # ~2 MB shards: the tiny model spans several files, so cross-shard paths are exercised
    return save_state_dict(tiny_state, TINY, tmp_path_factory.mktemp("ck") / "tiny", max_shard_bytes=2e6)


@pytest.fixture
def bad_ckpt(good_ckpt, tmp_path) -> Path:
    """A private copy of the good checkpoint to corrupt."""
    return Path(shutil.copytree(good_ckpt, tmp_path / "copy"))


def _shard_of(path: Path, name: str) -> Path:
    index = json.loads((path / ckpt.INDEX_FILE).read_text())
    return path / index["weight_map"][name]


def _rewrite_shard(path: Path, name: str, edit) -> None:
    """Load the shard holding `name`, let edit(dict) change it, write it back with safetensors itself
    and keep the index consistent (so only the intended defect is present)."""
    shard = _shard_of(path, name)
    tensors = load_file(shard)
    before = set(tensors)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    index = json.loads((path / ckpt.INDEX_FILE).read_text())
    for n in before - set(tensors):
        del index["weight_map"][n]
    index["weight_map"].update({n: shard.name for n in set(tensors) - before})
    (path / ckpt.INDEX_FILE).write_text(json.dumps(index))


# ------------------------------------------------------------------------------------------ round trip


def test_round_trip_is_bit_exact(good_ckpt, tiny_state):
    files = sorted(p.name for p in good_ckpt.iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not [p for p in good_ckpt.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    seen = []
    loaded = load_state_dict(good_ckpt, progress=lambda name, done, total: seen.append((name, done, total)))
    _assert_same_state(tiny_state, loaded)
    assert len(seen) == len(checkpoint_schema(TINY)) and seen[-1][1:] == (len(seen), len(seen))
    assert loaded["layers.0.ffn.gate.tid2eid"].dtype == torch.int64


def test_files_are_official_format(good_ckpt):
    index = json.loads((good_ckpt / ckpt.INDEX_FILE).read_text())
    schema = checkpoint_schema(TINY)
    assert set(index["weight_map"]) == set(schema)
    total = sum(math.prod(s.shape) * s.dtype.itemsize for s in schema.values())
    assert index["metadata"]["total_size"] == total
    # our writer's files read back with safetensors' own loader, names unprefixed, dtypes as in section 12
    for shard in sorted(set(index["weight_map"].values())):
        for name, t in load_file(good_ckpt / shard).items():
            assert index["weight_map"][name] == shard
            assert (t.dtype, tuple(t.shape)) == (schema[name].dtype, schema[name].shape), name
    raw = json.loads((good_ckpt / "config.json").read_text())
    assert raw["hidden_size"] == 256 and raw["quantization_config"]["scale_fmt"] == "ue8m0"
    assert raw["expert_dtype"] == "fp4" and "dim" not in raw
    assert checkpoint_config(good_ckpt) == TINY == ModelConfig.from_pretrained(good_ckpt)


def test_read_state_yields_every_tensor_once(good_ckpt):
    names = [n for n, _ in read_state(good_ckpt, TINY)]
    assert sorted(names) == sorted(checkpoint_schema(TINY))


@pytest.mark.parametrize("variant", [dict(expert_dtype="fp8"), dict(weight_dtype="bf16", expert_dtype="bf16"),
                                     dict(preset="tiny-128")])
def test_round_trip_variants(tmp_path, variant):
    variant = dict(variant)
    cfg = ModelConfig.preset(variant.pop("preset", "tiny"), **variant)
    sd = random_state_dict(cfg, seed=3)
    out = save_state_dict(sd, cfg, tmp_path / "ck")
    assert len([p for p in out.iterdir() if p.suffix == ".safetensors"]) == 1
    _assert_same_state(sd, load_state_dict(out))
    assert checkpoint_config(out) == cfg


def test_model_prefix_and_single_file(good_ckpt, tmp_path):
    tensors = {f"model.{n}": t.clone() for n, t in read_state(good_ckpt)}
    (tmp_path / "one").mkdir()
    save_file(tensors, tmp_path / "one" / "model.safetensors")
    shutil.copy(good_ckpt / "config.json", tmp_path / "one")
    _assert_same_state(load_state_dict(good_ckpt), load_state_dict(tmp_path / "one"))


def test_mtp_embedding_copies_are_skipped_like_convert_py(bad_ckpt, tiny_state):
    _rewrite_shard(bad_ckpt, "norm.weight", lambda t: t.update({"mtp.0.emb.tok_emb.weight": torch.zeros(4, 2),
                                                                "mtp.0.head.weight": torch.zeros(4, 2)}))
    _assert_same_state(load_state_dict(bad_ckpt), tiny_state)


def test_runtime_fields_may_differ(good_ckpt):
    cfg = TINY.replace(max_seq_len=128, max_batch_size=1, torch_dtype="float32")
    assert len(load_state_dict(good_ckpt, cfg)) == len(model_schema(TINY))


# ------------------------------------------------------------------------------------------ bad inputs


def test_missing_tensor(bad_ckpt):
    name = "layers.2.attn.compressor.ape"
    _rewrite_shard(bad_ckpt, name, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=rf"missing tensor\(s\) {name} .*float32 \[16, 96\]"):
        load_state_dict(bad_ckpt)


def test_unexpected_tensor(bad_ckpt):
    _rewrite_shard(bad_ckpt, "norm.weight", lambda t: t.update({"layers.1.attn.bogus": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"layers\.1\.attn\.bogus: unexpected tensor .*float32 \[3\]"):
        list(read_state(bad_ckpt))


def test_wrong_shape(bad_ckpt):
    name = "layers.1.attn_norm.weight"
    _rewrite_shard(bad_ckpt, name, lambda t: t.update({name: torch.ones(255, dtype=torch.bfloat16)}))
    with pytest.raises(CheckpointError, match=rf"{name}: expected bfloat16 \[256\], found bfloat16 \[255\]"):
        load_state_dict(bad_ckpt)


def test_float32_scale_where_e8m0_expected(bad_ckpt):
    name = "layers.3.attn.wkv.scale"
    _rewrite_shard(bad_ckpt, name, lambda t: t.update({name: t[name].float()}))
    msg = rf"{name}: expected float8_e8m0fnu \[1, 2\], found float32 \[1, 2\]"
    with pytest.raises(CheckpointError, match=msg):
        load_state_dict(bad_ckpt)


def test_tid2eid_must_stay_int64(bad_ckpt):
    name = "layers.0.ffn.gate.tid2eid"
    _rewrite_shard(bad_ckpt, name, lambda t: t.update({name: t[name].int()}))
    with pytest.raises(CheckpointError, match=rf"{name}: expected int64 \[1024, 2\], found int32"):
        load_state_dict(bad_ckpt)


def test_truncated_shard(bad_ckpt):
    shard = _shard_of(bad_ckpt, "embed.weight")
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=rf"{shard.name}: truncated"):
        load_state_dict(bad_ckpt)


def test_missing_shard_file(bad_ckpt):
    shard = _shard_of(bad_ckpt, "head.weight")
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"shard '{shard.name}', which does not exist"):
        load_state_dict(bad_ckpt)


@pytest.mark.parametrize("garbage", [b"\xff" * 8, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json", b"\x01"])
def test_corrupt_header(bad_ckpt, garbage):
    shard = _shard_of(bad_ckpt, "norm.weight")
    data = shard.read_bytes()
    shard.write_bytes(garbage + data[len(garbage):] if len(garbage) > 1 else garbage)
    with pytest.raises(CheckpointError, match=rf"{shard.name}: corrupt"):
        load_state_dict(bad_ckpt)


def test_index_disagrees_with_shards(bad_ckpt):
    index = json.loads((bad_ckpt / ckpt.INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"]["norm.weight"] = next(s for s in shards if s != index["weight_map"]["norm.weight"])
    (bad_ckpt / ckpt.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"norm\.weight: found in model-\d+-of-\d+\.safetensors, but"):
        load_state_dict(bad_ckpt)


def test_corrupt_index(bad_ckpt):
    (bad_ckpt / ckpt.INDEX_FILE).write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="corrupt index"):
        load_state_dict(bad_ckpt)


@pytest.mark.parametrize("name,make_bad", [
    ("layers.1.ffn_norm.weight", lambda t: t.index_fill_(0, torch.tensor([200]), float("nan"))),
    ("layers.2.attn.wq_b.weight", lambda t: t.view(torch.uint8).index_fill_(1, torch.tensor([5]), 0x7F)),
    ("layers.2.attn.wq_b.scale", lambda t: t.view(torch.uint8).fill_(255)),
    ("mtp.0.hc_attn_fn", lambda t: t.index_fill_(1, torch.tensor([1000]), float("inf"))),
])
def test_non_finite_values_with_check_finite(bad_ckpt, monkeypatch, name, make_bad):
    _rewrite_shard(bad_ckpt, name, lambda t: make_bad(t[name]))
    load_state_dict(bad_ckpt)  # without the check the file is well-formed
    monkeypatch.setattr(ckpt, "_CHUNK", 100)  # several chunks: the first bad index crosses chunk bounds
    with pytest.raises(CheckpointError, match=rf"{name}: \d+ non-finite value\(s\) \(NaN/inf\), first at flat index"):
        load_state_dict(bad_ckpt, check_finite=True)


def test_check_finite_passes_a_good_checkpoint_with_e8m0_scales(good_ckpt):
    assert len(load_state_dict(good_ckpt, check_finite=True)) == len(model_schema(TINY))


def test_config_mismatch(good_ckpt):
    with pytest.raises(CheckpointError, match=r"route_scale = 1.5 in config.json, 2.5 expected"):
        load_state_dict(good_ckpt, TINY.replace(route_scale=2.5))


def test_config_with_46_compress_ratios(bad_ckpt):
    raw = json.loads((bad_ckpt / "config.json").read_text())
    raw["compress_ratios"] = [0, 4] * 23  # a later release's 46-entry list
    (bad_ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"config\.json: compress_ratios = '46 entries'"):
        load_state_dict(bad_ckpt)
    with pytest.raises(ConfigError, match="compress_ratios"):
        load_state_dict(bad_ckpt, TINY)


def test_no_checkpoint_files(tmp_path):
    with pytest.raises(CheckpointError, match="neither model.safetensors.index.json nor model.safetensors"):
        load_state_dict(tmp_path, TINY)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_state_dict(tmp_path)


# ------------------------------------------------------------------------------------------ writing


def test_save_rejects_a_bad_state_dict(tiny_state, tmp_path):
    bad = dict(tiny_state)
    bad["layers.1.attn.wkv.scale"] = bad["layers.1.attn.wkv.scale"].float()
    with pytest.raises(CheckpointError, match=r"layers\.1\.attn\.wkv\.scale: expected float8_e8m0fnu \[1, 2\], found float32"):
        save_state_dict(bad, TINY, tmp_path / "x")
    del bad["layers.1.attn.wkv.scale"]
    with pytest.raises(CheckpointError, match=r"lacks layers\.1\.attn\.wkv\.scale"):
        save_state_dict(bad, TINY, tmp_path / "x")
    assert not list(tmp_path.iterdir())


def test_interrupted_save_leaves_nothing(tiny_state, tmp_path, monkeypatch):
    real, calls = ckpt.write_shard, []

    def fail_after_first(*args, **kwargs):
        if calls:
            raise OSError("disk full (simulated)")
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "write_shard", fail_after_first)
    with pytest.raises(OSError, match="simulated"):
        save_state_dict(tiny_state, TINY, tmp_path / "ck", max_shard_bytes=2e6)
    assert calls and list(tmp_path.iterdir()) == []  # no checkpoint and no temporary directory


def test_existing_destination(tiny_state, good_ckpt, tmp_path):
    dst = Path(shutil.copytree(good_ckpt, tmp_path / "ck"))
    other = random_state_dict(TINY, seed=1)
    with pytest.raises(CheckpointError, match="already exists"):
        save_state_dict(other, TINY, dst)
    _assert_same_state(load_state_dict(dst), tiny_state)
    save_state_dict(other, TINY, dst, overwrite=True)
    _assert_same_state(load_state_dict(dst), other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_random_checkpoint_streams_the_same_tensors(good_ckpt, tmp_path):
    out = random_checkpoint(TINY, 0, tmp_path / "r", max_shard_bytes=2e6)
    for (n1, t1), (n2, t2) in zip(read_state(out), read_state(good_ckpt)):
        assert n1 == n2 and torch.equal(_bits(t1), _bits(t2)), n1


# ------------------------------------------------------------------------------------------ random weights


def test_random_state_dict_deterministic_and_matches_model_schema(tiny_state):
    ms = model_schema(TINY)
    assert list(tiny_state) == list(ms)
    for k, spec in ms.items():
        assert (tiny_state[k].dtype, tuple(tiny_state[k].shape)) == (spec.dtype, spec.shape), k
    _assert_same_state(random_state_dict(TINY, seed=0), tiny_state)
    other = random_state_dict(TINY, seed=1)
    same = [k for k in ms if torch.equal(_bits(other[k]), _bits(tiny_state[k]))]
    assert all(k.endswith(".scale") for k in same), same  # power-of-two block scales may coincide


def test_random_weights_are_well_scaled(tiny_state):
    sd = tiny_state
    w = dequant_fp8_block(sd["layers.1.attn.wq_a.weight"], sd["layers.1.attn.wq_a.scale"])
    assert abs(w.std().item() * math.sqrt(TINY.dim) - 1) < 0.1
    w1 = dequant_fp4_block(sd["layers.1.ffn.experts.w1.weight"][3], sd["layers.1.ffn.experts.w1.scale"][3])
    assert abs(w1.std().item() * math.sqrt(TINY.dim) - 1) < 0.15
    experts = [dequant_fp4_block(sd["layers.1.ffn.experts.w2.weight"][e], sd["layers.1.ffn.experts.w2.scale"][e])
               for e in range(2)]
    assert not torch.equal(experts[0], experts[1])
    norm = sd["layers.2.attn_norm.weight"].float()
    assert (norm - 1).abs().max() < 0.2 and norm.std() > 0
    base = sd["layers.2.hc_attn_base"]
    h = TINY.hc_mult
    assert torch.allclose(torch.sigmoid(base[:h]), torch.full((h,), 1 / h), atol=0.02)  # pre ~ 1/hc
    assert torch.allclose(2 * torch.sigmoid(base[h:2 * h]), torch.ones(h), atol=0.02)  # post ~ 1
    comb = base[2 * h:].view(h, h)
    off = comb - torch.eye(h) * 1e9
    assert (comb.diagonal() > off.amax(dim=1)).all()  # diagonal-favouring
    assert sd["layers.2.attn.attn_sink"].abs().max() < 1 and sd["layers.2.ffn.gate.bias"].abs().max() < 0.1


def test_tid2eid_rows_distinct_and_routing_uses_every_expert(tiny_state):
    E, k = TINY.n_routed_experts, TINY.n_activated_experts
    for layer in range(TINY.n_hash_layers):
        tid = tiny_state[f"layers.{layer}.ffn.gate.tid2eid"]
        assert tid.dtype == torch.int64 and tid.shape == (TINY.vocab_size, k)
        assert ((tid >= 0) & (tid < E)).all()
        assert all(len(set(row)) == k for row in tid.tolist())
        assert set(tid.flatten().tolist()) == set(range(E))
    # bias-routed layers: top-k of sqrt(softplus(x W^T)) + bias over random normalised tokens hits every expert
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, TINY.dim, generator=g)
    for layer in range(TINY.n_hash_layers, TINY.n_layers):
        W = tiny_state[f"layers.{layer}.ffn.gate.weight"].float()
        s = torch.nn.functional.softplus(x @ W.T).sqrt() + tiny_state[f"layers.{layer}.ffn.gate.bias"]
        assert set(s.topk(k, dim=-1).indices.flatten().tolist()) == set(range(E)), layer


def test_random_tensors_is_lazy_and_in_schema_order():
    it = random_tensors(TINY, 0)
    assert next(it)[0] == next(iter(checkpoint_schema(TINY)))  # a generator: nothing built ahead
    assert list(hf_config_dict(TINY)["compress_ratios"]) == list(TINY.compress_ratios)


def test_read_state_memory_maps(good_ckpt):
    # lazy: read_state validates headers up front and opens shards only while iterating
    it = read_state(good_ckpt)
    name, t = next(it)
    with safe_open(str(_shard_of(good_ckpt, name)), framework="pt") as f:
        assert torch.equal(_bits(f.get_tensor(name)), _bits(t))


# ------------------------------------------------------------------------------------------ model wrappers


def test_reference_model_save_load_round_trip(good_ckpt, tmp_path):
    from v4compile.model.checkpoint import load_checkpoint, save_checkpoint
    from v4compile.model.reference import ReferenceModel

    model = load_checkpoint(good_ckpt, dtype=torch.float32)  # a random checkpoint drives the model
    tokens = torch.randint(0, TINY.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(tokens)
    assert logits.shape == (1, 24, TINY.vocab_size) and torch.isfinite(logits).all() and logits.std() > 0.1
    out = save_checkpoint(model, tmp_path / "again")
    _assert_same_state(load_state_dict(out), load_state_dict(good_ckpt))
    again = load_checkpoint(out, TINY, dtype=torch.float32)
    for (n1, b1), (n2, b2) in zip(model.named_buffers(), again.named_buffers()):
        assert n1 == n2 and torch.equal(b1, b2), n1
    with torch.no_grad():
        assert torch.equal(again(tokens), logits)
    with pytest.raises(CheckpointError, match="quantized=False"):
        save_checkpoint(ReferenceModel(TINY, quantized=False, device="meta"), tmp_path / "f32")

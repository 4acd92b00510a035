"""ModelConfig: presets, official config readers, and ConfigError for impossible values."""

import json
from pathlib import Path

import pytest

from v4compile.errors import ConfigError
from v4compile.model.config import PRESETS, ModelConfig
from v4compile.model.kv_bytes import kv_bytes, v32_bytes_per_token
from v4compile.model.schema import checkpoint_schema, count_parameters, model_key, model_schema

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "v4-configs"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} (the published V4 configs) not present")


@needs_shared
@pytest.mark.parametrize("name,preset", [("DeepSeek-V4-Flash", "flash"), ("DeepSeek-V4-Pro", "pro")])
def test_official_configs_equal_presets(name, preset):
    hf = ModelConfig.from_pretrained(SHARED / name)
    inference = ModelConfig.from_pretrained(SHARED / name / "inference")
    assert hf == ModelConfig.preset(preset)
    assert inference == ModelConfig.preset(preset)


@needs_shared
def test_flash_layer_map():
    cfg = ModelConfig.from_pretrained(SHARED / "DeepSeek-V4-Flash")
    assert cfg.csa_layers == list(range(2, 43, 2)) and len(cfg.hca_layers) == 20
    assert [cfg.layer_kind(i) for i in (0, 1, 43)] == ["window"] * 3
    pro = ModelConfig.preset("pro")
    assert len(pro.csa_layers) == 30 and len(pro.hca_layers) == 31 and pro.layer_kind(0) == "hca"


def test_presets_construct_and_match_spec_counts():
    for name in PRESETS:
        ModelConfig.preset(name)
    flash, pro = ModelConfig.preset("flash"), ModelConfig.preset("pro")
    # V4-SPEC section 1.2: 290.94 B / 1598.84 B stored, ~13.3 B / ~48.9 B active; HF index tensor counts.
    assert round(count_parameters(flash)["total"] / 1e9, 2) == 290.94
    assert round(count_parameters(pro)["total"] / 1e9, 2) == 1598.84
    assert round(count_parameters(flash)["active per token"] / 1e9, 1) == 13.3
    assert round(count_parameters(pro)["active per token"] / 1e9, 1) == 48.9
    assert len(checkpoint_schema(flash)) == 69187 and len(checkpoint_schema(pro)) == 145116


def test_kv_bytes_per_token_match_spec():
    # V4-SPEC section 6.3: 3 514 B (Flash), 5 031 B (Pro) production; 6 880 / 9 848 reference; V3.2 48 068.
    assert int(kv_bytes(ModelConfig.preset("flash")).per_token) == 3514
    assert int(kv_bytes(ModelConfig.preset("pro")).per_token) == 5031
    assert kv_bytes(ModelConfig.preset("flash"), "reference").per_token == 6880
    assert kv_bytes(ModelConfig.preset("pro"), "reference").per_token == 9848
    assert v32_bytes_per_token() == 48068
    assert round(48068 / kv_bytes(ModelConfig.preset("flash")).per_token, 1) == 13.7


def test_tiny_matches_spec_table():
    t = ModelConfig.preset("tiny")
    assert (t.dim, t.n_layers, t.compress_ratios, t.n_heads, t.head_dim, t.rope_head_dim) == (256, 4, (0, 4, 16, 4, 0), 8, 96, 32)
    assert ModelConfig.preset("tiny-128").compress_ratios == (0, 4, 128, 4, 0)
    b = ModelConfig.preset("bench")
    assert b.compress_ratios == (0, 0, 4, 128, 4, 128, 0) and b.dim == 4096 and b.max_seq_len == 16384


def test_roundtrip_dict():
    cfg = ModelConfig.preset("tiny")
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("changes,field", [
    (dict(head_dim=96, rope_head_dim=64), "head_dim - rope_head_dim"),
    (dict(o_groups=3), "o_groups"),
    (dict(compress_ratios=(0, 3, 16, 4, 0)), "compress_ratios[1]"),
    (dict(compress_ratios=(0, 4, 16, 4, 4)), "compress_ratios[4]"),
    (dict(compress_ratios=(0, 4, 16, 4)), "compress_ratios"),
    (dict(index_head_dim=48), "index_head_dim"),
    (dict(dim=200), "dim"),
    (dict(n_activated_experts=9), "n_activated_experts"),
    (dict(expert_dtype="fp6"), "expert_dtype"),
    (dict(max_seq_len=0), "max_seq_len"),
    (dict(n_hash_layers=5), "n_hash_layers"),
])
def test_config_error_names_field_and_value(changes, field):
    with pytest.raises(ConfigError) as e:
        ModelConfig.preset("tiny", **changes)
    assert field in str(e.value)
    value = next(iter(changes.values()))
    if not isinstance(value, tuple):
        assert repr(value) in str(e.value) or str(value) in str(e.value)


def _flash_hf() -> dict:
    return json.loads((SHARED / "DeepSeek-V4-Flash" / "config.json").read_text())


@needs_shared
@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d.update(dspark_num_layers=2), "dspark_num_layers"),
    (lambda d: d.update(compress_ratios=d["compress_ratios"] + [4, 128]), "46 entries"),
    (lambda d: d.update(num_key_value_heads=8), "num_key_value_heads"),
    (lambda d: d.update(tie_word_embeddings=True), "tie_word_embeddings"),
    (lambda d: d["rope_scaling"].update(mscale=1.0), "mscale"),
    (lambda d: d["quantization_config"].update(weight_block_size=[64, 64]), "weight_block_size"),
    (lambda d: d.update(scoring_func="softmax"), "score_func"),
])
def test_unknown_or_unsupported_keys_rejected(mutate, needle):
    d = _flash_hf()
    mutate(d)
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf_dict(d)
    assert needle in str(e.value)


@needs_shared
def test_missing_expert_dtype_means_fp4():
    d = _flash_hf()
    d.pop("expert_dtype", None)
    assert ModelConfig.from_hf_dict(d).expert_dtype == "fp4"


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelConfig.preset("huge")


def test_model_schema_stacks_experts():
    cfg = ModelConfig.preset("tiny")
    assert model_key("layers.3.ffn.experts.7.w2.scale") == ("layers.3.ffn.experts.w2.scale", 7)
    assert model_key("mtp.0.ffn.experts.0.w1.weight") == ("mtp.0.ffn.experts.w1.weight", 0)
    assert model_key("layers.3.ffn.shared_experts.w1.weight") == ("layers.3.ffn.shared_experts.w1.weight", None)
    ms = model_schema(cfg)
    assert ms["layers.0.ffn.experts.w1.weight"].shape == (8, 128, 128)  # [E, inter, dim/2] packed FP4
    assert "layers.0.ffn.experts.3.w1.weight" not in ms
    assert "layers.0.ffn.gate.tid2eid" in ms and "layers.2.ffn.gate.bias" in ms and "layers.2.ffn.gate.tid2eid" not in ms


@needs_shared
def test_dtype_key_and_missing_quantization_config():
    d = _flash_hf()
    d["dtype"] = "bfloat16"  # newer transformers write the torch dtype under "dtype"
    assert ModelConfig.from_hf_dict(d).weight_dtype == "fp8"
    d.pop("quantization_config")
    assert ModelConfig.from_hf_dict(d).weight_dtype == "bf16"
    d["dtype"] = "int3"
    with pytest.raises(ConfigError, match="'dtype'"):
        ModelConfig.from_hf_dict(d)

"""ModelConfig: every hyper-parameter of a DeepSeek-V4-class model, presets, and the official config readers.

Field names follow DeepSeek's `inference/config.json` (the names V4-SPEC.md uses); the HF `config.json`
names are mapped onto them by `from_hf_dict`. Impossible combinations raise `ConfigError` naming the
field and the value (V4-SPEC section 11.1 lists the constraints the reference code paths need).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from v4compile.errors import ConfigError

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
EXPERT_DTYPES = ("fp4", "fp8", "bf16")
WEIGHT_DTYPES = ("fp8", "bf16")
LAYER_KINDS = ("window", "csa", "hca")


@dataclass(frozen=True)
class ModelConfig:
    """One V4 architecture instance. Frozen: derive variants with `replace(**changes)`."""

    # --- embedding / stack
    vocab_size: int = 129280  # token ids are in [0, vocab_size)
    dim: int = 4096  # hidden size d
    n_layers: int = 43  # main decoder blocks
    n_mtp_layers: int = 1  # multi-token-prediction blocks after the stack (window-only)
    # --- attention (single shared 512-wide KV head, K = V)
    n_heads: int = 64  # query heads H
    head_dim: int = 512  # D: 448 nope + 64 rope
    rope_head_dim: int = 64  # R: interleaved-pair RoPE on the LAST R dims
    q_lora_rank: int = 1024  # low-rank Q latent (also the indexer's query input)
    o_groups: int = 8  # G: grouped low-rank output projection
    o_lora_rank: int = 1024  # r_o per group
    window_size: int = 128  # raw-KV sliding window (includes the query itself)
    # --- compression (one ratio per layer incl. MTP: 0 window-only, 4 CSA, >4 HCA)
    compress_ratios: tuple[int, ...] = (0, 0) + (4, 128) * 20 + (4, 0)
    index_n_heads: int = 64  # lightning indexer heads (CSA layers)
    index_head_dim: int = 128  # indexer q/k width (Hadamard-rotated, FP4)
    index_topk: int = 512  # compressed entries selected per query (CSA)
    # --- rope
    rope_theta: float = 10000.0  # window-only layers (no YaRN)
    compress_rope_theta: float = 160000.0  # layers with ratio != 0 (with YaRN)
    rope_factor: float = 16.0  # YaRN factor
    original_seq_len: int = 65536  # YaRN original_max_position_embeddings
    beta_fast: int = 32
    beta_slow: int = 1
    # --- moe (every layer; no dense FFN)
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 6  # top-k experts per token
    moe_inter_dim: int = 2048  # routed and shared expert intermediate size
    n_hash_layers: int = 3  # layers [0, n_hash_layers) route by the tid2eid table
    score_func: str = "sqrtsoftplus"
    route_scale: float = 1.5
    swiglu_limit: float = 10.0  # gate <= limit, up in [-limit, limit]; 0 disables
    # --- mHC residual streams
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    norm_eps: float = 1e-6
    # --- storage / numerics
    weight_dtype: str = "fp8"  # dense projections: "fp8" (e4m3 + 128x128 UE8M0 scales) or "bf16"
    expert_dtype: str = "fp4"  # routed experts: "fp4" (MXFP4), "fp8" (-Base, FP32 scales) or "bf16"
    torch_dtype: str = "bfloat16"  # activation / unquantised-weight dtype
    # --- runtime limits
    max_seq_len: int = 4096  # cache capacity per sequence (prompt + generated)
    max_batch_size: int = 4
    max_position_embeddings: int = 1048576
    bos_token_id: int = 0
    eos_token_id: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "compress_ratios", tuple(int(r) for r in self.compress_ratios))
        _validate(self)

    # ----- derived quantities
    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.rope_head_dim

    @property
    def n_blocks(self) -> int:
        """Main layers plus MTP blocks (= len(compress_ratios))."""
        return self.n_layers + self.n_mtp_layers

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.torch_dtype]

    def layer_kind(self, layer_id: int) -> str:
        """'window', 'csa' (ratio 4: overlap + indexer) or 'hca' (ratio > 4)."""
        r = self.compress_ratios[layer_id]
        return "window" if r == 0 else "csa" if r == 4 else "hca"

    def is_hash_layer(self, layer_id: int) -> bool:
        return layer_id < self.n_hash_layers

    @property
    def csa_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.layer_kind(i) == "csa"]

    @property
    def hca_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.layer_kind(i) == "hca"]

    def replace(self, **changes: Any) -> "ModelConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s): {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["compress_ratios"] = list(self.compress_ratios)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Inverse of `to_dict` (our own field names; unknown keys are an error)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s): {unknown}")
        return cls(**d)

    # ----- constructors
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """`tiny`, `tiny-128`, `bench`, `flash` or `pro` (V4-SPEC sections 1 and 11)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> "ModelConfig":
        """Read a checkpoint directory's `config.json` (HF names) or `inference/config.json` names."""
        path = Path(path)
        f = path / "config.json" if path.is_dir() else path
        if not f.is_file():
            alt = path / "inference" / "config.json"
            if path.is_dir() and alt.is_file():
                f = alt
            else:
                raise ConfigError(f"no config.json in {path}")
        try:
            raw = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{f}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{f}: expected a JSON object, found {type(raw).__name__}")
        return cls.from_hf_dict(raw, **overrides)

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], **overrides: Any) -> "ModelConfig":
        """Map an HF `config.json` or an `inference/config.json` dict onto our fields."""
        return cls(**{**_map_official_keys(raw), **overrides})


# ---------------------------------------------------------------------------- official key mapping

# HF / inference-config key -> our field (identity names are listed too so every accepted key is here).
_KEY_MAP = {
    "vocab_size": "vocab_size",
    "hidden_size": "dim", "dim": "dim",
    "num_hidden_layers": "n_layers", "n_layers": "n_layers",
    "num_nextn_predict_layers": "n_mtp_layers", "n_mtp_layers": "n_mtp_layers",
    "num_attention_heads": "n_heads", "n_heads": "n_heads",
    "head_dim": "head_dim",
    "qk_rope_head_dim": "rope_head_dim", "rope_head_dim": "rope_head_dim",
    "q_lora_rank": "q_lora_rank",
    "o_groups": "o_groups",
    "o_lora_rank": "o_lora_rank",
    "sliding_window": "window_size", "window_size": "window_size",
    "compress_ratios": "compress_ratios",
    "index_n_heads": "index_n_heads",
    "index_head_dim": "index_head_dim",
    "index_topk": "index_topk",
    "rope_theta": "rope_theta",
    "compress_rope_theta": "compress_rope_theta",
    "rope_factor": "rope_factor",
    "original_seq_len": "original_seq_len",
    "beta_fast": "beta_fast",
    "beta_slow": "beta_slow",
    "n_routed_experts": "n_routed_experts",
    "n_shared_experts": "n_shared_experts",
    "num_experts_per_tok": "n_activated_experts", "n_activated_experts": "n_activated_experts",
    "moe_intermediate_size": "moe_inter_dim", "moe_inter_dim": "moe_inter_dim",
    "num_hash_layers": "n_hash_layers", "n_hash_layers": "n_hash_layers",
    "scoring_func": "score_func", "score_func": "score_func",
    "routed_scaling_factor": "route_scale", "route_scale": "route_scale",
    "swiglu_limit": "swiglu_limit",
    "hc_mult": "hc_mult",
    "hc_sinkhorn_iters": "hc_sinkhorn_iters",
    "hc_eps": "hc_eps",
    "rms_norm_eps": "norm_eps", "norm_eps": "norm_eps",
    "expert_dtype": "expert_dtype",
    "torch_dtype": "torch_dtype",
    "max_position_embeddings": "max_position_embeddings",
    "max_seq_len": "max_seq_len",
    "max_batch_size": "max_batch_size",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
}

# Keys whose value is fixed by the architecture: accepted only with that value.
_FIXED = {
    "num_key_value_heads": 1,
    "attention_bias": False,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "model_type": "deepseek_v4",
    "architectures": ["DeepseekV4ForCausalLM"],
    "n_shared_experts": 1,
    "scale_fmt": "ue8m0",
}

# Keys that carry no semantics for inference (metadata, training-only, runtime switches).
_IGNORED = {
    "attention_dropout", "initializer_range", "transformers_version", "use_cache", "_name_or_path",
    "auto_map", "scale_dtype", "generation_config",
}


def _map_official_keys(raw: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _FIXED and value != _FIXED[key]:
            raise ConfigError(f"config key {key!r} = {value!r} is not supported; V4 requires {_FIXED[key]!r}")
        if key in _KEY_MAP:
            out[_KEY_MAP[key]] = value
        elif key == "rope_scaling":
            out.update(_map_rope_scaling(value))
        elif key == "quantization_config":
            out.update(_map_quantization(value))
        elif key == "dtype":  # inference/config.json: weight storage ("fp8"); newer HF files: the torch dtype
            if value in WEIGHT_DTYPES:
                out["weight_dtype"] = value
            elif value in _DTYPES:
                out["torch_dtype"] = value
            else:
                raise ConfigError(f"config key 'dtype' = {value!r}; expected one of {WEIGHT_DTYPES + tuple(_DTYPES)}")
        elif key in _FIXED or key in _IGNORED:
            continue
        else:
            raise ConfigError(
                f"unknown config key {key!r} (= {value!r}): it may change the model's semantics "
                "(e.g. a later release's speculative-decoding or attention variant); refusing to guess"
            )
    if "weight_dtype" not in out:  # no quantization_config and no inference-style dtype: unquantised weights
        out["weight_dtype"] = "bf16"
    if "expert_dtype" not in raw:  # V4-SPEC section 13: absent in the initial Flash revision means fp4
        out["expert_dtype"] = "fp4"
    return out


def _map_rope_scaling(rs: Any) -> dict[str, Any]:
    if not isinstance(rs, dict):
        raise ConfigError(f"config key 'rope_scaling' = {rs!r}; expected an object")
    kind = rs.get("type", rs.get("rope_type"))
    if kind != "yarn":
        raise ConfigError(f"rope_scaling.type = {kind!r}; V4 uses 'yarn'")
    known = {"type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow"}
    extra = sorted(set(rs) - known)
    if extra:
        raise ConfigError(f"rope_scaling has unsupported keys {extra} (V4 YaRN has no mscale)")
    out = {}
    for src, dst in (("factor", "rope_factor"), ("original_max_position_embeddings", "original_seq_len"),
                     ("beta_fast", "beta_fast"), ("beta_slow", "beta_slow")):
        if src in rs:
            out[dst] = rs[src]
    return out


def _map_quantization(q: Any) -> dict[str, Any]:
    if not isinstance(q, dict):
        raise ConfigError(f"config key 'quantization_config' = {q!r}; expected an object")
    expect = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
              "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}
    for k, v in q.items():
        if k not in expect:
            raise ConfigError(f"quantization_config.{k} is not supported")
        if v != expect[k]:
            raise ConfigError(f"quantization_config.{k} = {v!r}; expected {expect[k]!r}")
    return {"weight_dtype": "fp8"}


# ---------------------------------------------------------------------------- validation


def _validate(c: ModelConfig) -> None:
    def need(cond: bool, fld: str, value: Any, why: str) -> None:
        if not cond:
            raise ConfigError(f"{fld} = {value!r}: {why}")

    for name in ("vocab_size", "dim", "n_layers", "n_heads", "head_dim", "q_lora_rank", "o_groups",
                 "o_lora_rank", "window_size", "n_routed_experts", "n_activated_experts", "moe_inter_dim",
                 "hc_mult", "hc_sinkhorn_iters", "max_seq_len", "max_batch_size"):
        v = getattr(c, name)
        need(isinstance(v, int) and not isinstance(v, bool) and v > 0, name, v, "must be a positive integer")
    need(c.n_mtp_layers >= 0, "n_mtp_layers", c.n_mtp_layers, "must be >= 0")
    need(c.torch_dtype in _DTYPES, "torch_dtype", c.torch_dtype, f"expected one of {sorted(_DTYPES)}")
    need(c.weight_dtype in WEIGHT_DTYPES, "weight_dtype", c.weight_dtype, f"expected one of {WEIGHT_DTYPES}")
    need(c.expert_dtype in EXPERT_DTYPES, "expert_dtype", c.expert_dtype, f"expected one of {EXPERT_DTYPES}")
    need(c.score_func == "sqrtsoftplus", "score_func", c.score_func, "V4 routes with 'sqrtsoftplus'")
    need(c.n_shared_experts == 1, "n_shared_experts", c.n_shared_experts, "V4 has exactly one shared expert")
    need(0 < c.rope_head_dim < c.head_dim and c.rope_head_dim % 2 == 0, "rope_head_dim", c.rope_head_dim,
         f"must be even and in (0, head_dim={c.head_dim})")
    need(c.nope_head_dim % 64 == 0, "head_dim - rope_head_dim", f"{c.head_dim} - {c.rope_head_dim} = {c.nope_head_dim}",
         "must be a multiple of 64 (FP8 KV fake-quant block)")
    need(c.n_heads % c.o_groups == 0, "o_groups", c.o_groups, f"must divide n_heads={c.n_heads}")
    d = c.index_head_dim
    need(d > 0 and d & (d - 1) == 0 and d % 32 == 0 and d > c.rope_head_dim, "index_head_dim", d,
         f"must be a power of two, a multiple of 32 (FP4 block) and > rope_head_dim={c.rope_head_dim}")
    need(c.index_n_heads > 0 and c.index_topk > 0, "index_n_heads/index_topk", (c.index_n_heads, c.index_topk),
         "must be positive")
    need(len(c.compress_ratios) == c.n_layers + c.n_mtp_layers, "compress_ratios",
         f"{len(c.compress_ratios)} entries", f"expected n_layers + n_mtp_layers = {c.n_layers + c.n_mtp_layers}")
    for i, r in enumerate(c.compress_ratios):
        need(r == 0 or r == 4 or r > 4, f"compress_ratios[{i}]", r, "must be 0 (window), 4 (CSA) or > 4 (HCA)")
    for i in range(c.n_layers, c.n_blocks):
        need(c.compress_ratios[i] == 0, f"compress_ratios[{i}]", c.compress_ratios[i], "MTP blocks are window-only (0)")
    need(0 <= c.n_hash_layers <= c.n_layers, "n_hash_layers", c.n_hash_layers, f"must be in [0, n_layers={c.n_layers}]")
    need(c.n_activated_experts <= c.n_routed_experts, "n_activated_experts", c.n_activated_experts,
         f"must be <= n_routed_experts={c.n_routed_experts}")
    # FP8 linears quantise their input in blocks of 128 channels.
    fp8_inputs = {"dim": c.dim, "q_lora_rank": c.q_lora_rank, "n_heads/o_groups*head_dim": c.n_heads // c.o_groups * c.head_dim,
                  "o_groups*o_lora_rank": c.o_groups * c.o_lora_rank, "moe_inter_dim": c.moe_inter_dim}
    for name, width in fp8_inputs.items():
        need(width % 128 == 0, name, width, "must be a multiple of 128 (FP8 activation block)")
    need(c.hc_mult >= 1, "hc_mult", c.hc_mult, "must be >= 1")
    need(c.window_size <= c.max_seq_len, "window_size", c.window_size, f"must be <= max_seq_len={c.max_seq_len}")
    need(c.max_seq_len <= c.max_position_embeddings, "max_seq_len", c.max_seq_len,
         f"must be <= max_position_embeddings={c.max_position_embeddings}")
    need(0 <= c.bos_token_id < c.vocab_size and 0 <= c.eos_token_id < c.vocab_size, "bos/eos_token_id",
         (c.bos_token_id, c.eos_token_id), f"must be in [0, vocab_size={c.vocab_size})")
    need(c.beta_fast > c.beta_slow > 0 and c.rope_factor >= 1 and c.original_seq_len > 0, "rope_scaling",
         (c.beta_fast, c.beta_slow, c.rope_factor, c.original_seq_len), "needs beta_fast > beta_slow > 0, factor >= 1")
    need(math.isfinite(c.route_scale) and c.route_scale > 0, "route_scale", c.route_scale, "must be positive")
    need(c.swiglu_limit >= 0, "swiglu_limit", c.swiglu_limit, "must be >= 0 (0 disables the clamp)")


# ---------------------------------------------------------------------------- presets

_TINY = dict(
    vocab_size=1024, dim=256, n_layers=4, n_mtp_layers=1, compress_ratios=(0, 4, 16, 4, 0), n_hash_layers=2,
    n_heads=8, head_dim=96, rope_head_dim=32, q_lora_rank=128, o_groups=2, o_lora_rank=64, window_size=16,
    index_n_heads=4, index_head_dim=64, index_topk=4, n_routed_experts=8, n_activated_experts=2,
    n_shared_experts=1, moe_inter_dim=128, route_scale=1.5, swiglu_limit=10.0, max_seq_len=256, max_batch_size=2,
)
_FLASH: dict[str, Any] = {}  # the dataclass defaults are V4-Flash
_PRO = dict(
    dim=7168, n_layers=61, n_heads=128, q_lora_rank=1536, o_groups=16, o_lora_rank=1024,
    compress_ratios=(128, 128) + (4, 128) * 29 + (4, 0), index_topk=1024, n_routed_experts=384,
    moe_inter_dim=3072, route_scale=2.5,
)
_DEMO = dict(  # the shipped retrieval demo model (v4compile.demo_model): 8K context, no MTP
    vocab_size=512, dim=256, n_layers=4, n_mtp_layers=0, compress_ratios=(0, 4, 128, 4), n_hash_layers=1,
    n_heads=8, head_dim=96, rope_head_dim=32, q_lora_rank=128, o_groups=2, o_lora_rank=64, window_size=64,
    index_n_heads=4, index_head_dim=64, index_topk=16, n_routed_experts=8, n_activated_experts=2,
    n_shared_experts=1, moe_inter_dim=128, max_seq_len=8448, max_batch_size=8,
)
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": _TINY,
    "tiny-128": {**_TINY, "compress_ratios": (0, 4, 128, 4, 0), "max_seq_len": 512},
    "demo": _DEMO,
    "bench": dict(n_layers=6, compress_ratios=(0, 0, 4, 128, 4, 128, 0), n_hash_layers=3, max_seq_len=16384),
    "flash": _FLASH,
    "pro": _PRO,
}

"""The official checkpoint's tensors (V4-SPEC section 12) as a function of the config.

This table is the contract between the reference model and checkpoint I/O: `checkpoint_schema(cfg)`
lists every tensor an official-format checkpoint holds (name -> shape, dtype), and `model_key(name)`
says where the reference model keeps it. The model stores each layer's routed experts stacked
(`layers.{i}.ffn.experts.w1.weight` of shape [E, ...]) so that the MoE op sees one tensor per
projection; every other tensor keeps its official name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from v4compile.model.config import ModelConfig

FP8 = torch.float8_e4m3fn
E8M0 = torch.float8_e8m0fnu
BF16 = torch.bfloat16
F32 = torch.float32
I64 = torch.int64
I8 = torch.int8

_EXPERT = re.compile(r"^(?P<prefix>(?:layers\.\d+|mtp\.\d+)\.ffn\.experts)\.(?P<e>\d+)\.(?P<rest>w[123]\.(?:weight|scale))$")


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype

    def __str__(self) -> str:
        return f"{str(self.dtype).removeprefix('torch.')} {list(self.shape)}"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _fp8_linear(out: int, inp: int, name: str, t: dict, weight_dtype: str) -> None:
    if weight_dtype == "fp8":
        t[f"{name}.weight"] = TensorSpec((out, inp), FP8)
        t[f"{name}.scale"] = TensorSpec((_cdiv(out, 128), _cdiv(inp, 128)), E8M0)
    else:
        t[f"{name}.weight"] = TensorSpec((out, inp), BF16)


def _expert(out: int, inp: int, name: str, t: dict, expert_dtype: str) -> None:
    if expert_dtype == "fp4":  # packed e2m1 along the input dim, one UE8M0 scale per 32 inputs
        t[f"{name}.weight"] = TensorSpec((out, inp // 2), I8)
        t[f"{name}.scale"] = TensorSpec((out, inp // 32), E8M0)
    elif expert_dtype == "fp8":  # -Base checkpoints: 128x128 blocks, FP32 scales
        t[f"{name}.weight"] = TensorSpec((out, inp), FP8)
        t[f"{name}.scale"] = TensorSpec((_cdiv(out, 128), _cdiv(inp, 128)), F32)
    else:
        t[f"{name}.weight"] = TensorSpec((out, inp), BF16)


def block_schema(cfg: ModelConfig, layer_id: int, prefix: str) -> dict[str, TensorSpec]:
    """Tensors of one block (main layer `layers.{i}.` or MTP `mtp.{k}.`), official names."""
    t: dict[str, TensorSpec] = {}
    d, D, H, wd = cfg.dim, cfg.head_dim, cfg.n_heads, cfg.weight_dtype
    p = prefix
    t[f"{p}attn_norm.weight"] = TensorSpec((d,), BF16)
    t[f"{p}ffn_norm.weight"] = TensorSpec((d,), BF16)
    a = f"{p}attn."
    t[f"{a}q_norm.weight"] = TensorSpec((cfg.q_lora_rank,), BF16)
    t[f"{a}kv_norm.weight"] = TensorSpec((D,), BF16)
    t[f"{a}attn_sink"] = TensorSpec((H,), F32)
    _fp8_linear(cfg.q_lora_rank, d, f"{a}wq_a", t, wd)
    _fp8_linear(H * D, cfg.q_lora_rank, f"{a}wq_b", t, wd)
    _fp8_linear(D, d, f"{a}wkv", t, wd)
    _fp8_linear(cfg.o_groups * cfg.o_lora_rank, H // cfg.o_groups * D, f"{a}wo_a", t, wd)
    _fp8_linear(d, cfg.o_groups * cfg.o_lora_rank, f"{a}wo_b", t, wd)
    ratio = cfg.compress_ratios[layer_id]
    if ratio:
        c = 2 if ratio == 4 else 1  # overlap doubles the projected width
        t[f"{a}compressor.ape"] = TensorSpec((ratio, c * D), F32)
        t[f"{a}compressor.wkv.weight"] = TensorSpec((c * D, d), BF16)
        t[f"{a}compressor.wgate.weight"] = TensorSpec((c * D, d), BF16)
        t[f"{a}compressor.norm.weight"] = TensorSpec((D,), BF16)
    if ratio == 4:
        Hi, Di = cfg.index_n_heads, cfg.index_head_dim
        _fp8_linear(Hi * Di, cfg.q_lora_rank, f"{a}indexer.wq_b", t, wd)
        t[f"{a}indexer.weights_proj.weight"] = TensorSpec((Hi, d), BF16)
        t[f"{a}indexer.compressor.ape"] = TensorSpec((4, 2 * Di), F32)
        t[f"{a}indexer.compressor.wkv.weight"] = TensorSpec((2 * Di, d), BF16)
        t[f"{a}indexer.compressor.wgate.weight"] = TensorSpec((2 * Di, d), BF16)
        t[f"{a}indexer.compressor.norm.weight"] = TensorSpec((Di,), BF16)
    f = f"{p}ffn."
    E, I = cfg.n_routed_experts, cfg.moe_inter_dim
    t[f"{f}gate.weight"] = TensorSpec((E, d), BF16)
    if cfg.is_hash_layer(layer_id):
        t[f"{f}gate.tid2eid"] = TensorSpec((cfg.vocab_size, cfg.n_activated_experts), I64)
    else:
        t[f"{f}gate.bias"] = TensorSpec((E,), F32)
    for e in range(E):
        _expert(I, d, f"{f}experts.{e}.w1", t, cfg.expert_dtype)
        _expert(I, d, f"{f}experts.{e}.w3", t, cfg.expert_dtype)
        _expert(d, I, f"{f}experts.{e}.w2", t, cfg.expert_dtype)
    _fp8_linear(I, d, f"{f}shared_experts.w1", t, wd)
    _fp8_linear(I, d, f"{f}shared_experts.w3", t, wd)
    _fp8_linear(d, I, f"{f}shared_experts.w2", t, wd)
    mix = (2 + cfg.hc_mult) * cfg.hc_mult
    for side in ("attn", "ffn"):
        t[f"{p}hc_{side}_fn"] = TensorSpec((mix, cfg.hc_mult * d), F32)
        t[f"{p}hc_{side}_base"] = TensorSpec((mix,), F32)
        t[f"{p}hc_{side}_scale"] = TensorSpec((3,), F32)
    return t


def _hc_head(cfg: ModelConfig, prefix: str, t: dict) -> None:
    t[f"{prefix}hc_head_fn"] = TensorSpec((cfg.hc_mult, cfg.hc_mult * cfg.dim), F32)
    t[f"{prefix}hc_head_base"] = TensorSpec((cfg.hc_mult,), F32)
    t[f"{prefix}hc_head_scale"] = TensorSpec((1,), F32)


def checkpoint_schema(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """Every tensor of an official-format checkpoint for `cfg`, in a stable order."""
    t: dict[str, TensorSpec] = {
        "embed.weight": TensorSpec((cfg.vocab_size, cfg.dim), BF16),
        "head.weight": TensorSpec((cfg.vocab_size, cfg.dim), BF16),
        "norm.weight": TensorSpec((cfg.dim,), BF16),
    }
    _hc_head(cfg, "", t)
    for i in range(cfg.n_layers):
        t.update(block_schema(cfg, i, f"layers.{i}."))
    for k in range(cfg.n_mtp_layers):
        p = f"mtp.{k}."
        t.update(block_schema(cfg, cfg.n_layers + k, p))
        _fp8_linear(cfg.dim, cfg.dim, f"{p}e_proj", t, cfg.weight_dtype)
        _fp8_linear(cfg.dim, cfg.dim, f"{p}h_proj", t, cfg.weight_dtype)
        for n in ("enorm", "hnorm", "norm"):
            t[f"{p}{n}.weight"] = TensorSpec((cfg.dim,), BF16)
        _hc_head(cfg, p, t)
    return t


def model_key(name: str) -> tuple[str, int | None]:
    """Official tensor name -> (reference-model state_dict key, expert index or None).

    Routed experts are stacked: `layers.3.ffn.experts.17.w1.weight` -> (`layers.3.ffn.experts.w1.weight`, 17).
    """
    m = _EXPERT.match(name)
    if m:
        return f"{m['prefix']}.{m['rest']}", int(m["e"])
    return name, None


def model_schema(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """The reference model's state_dict (official names, experts stacked along a leading E dim)."""
    out: dict[str, TensorSpec] = {}
    for name, spec in checkpoint_schema(cfg).items():
        key, e = model_key(name)
        if e is None:
            out[key] = spec
        elif e == 0:
            out[key] = TensorSpec((cfg.n_routed_experts, *spec.shape), spec.dtype)
    return out


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Logical parameter counts (FP4 bytes hold two parameters) by component."""
    groups = {"embed+head": 0, "attention": 0, "compressor+indexer": 0, "router": 0, "routed experts": 0,
              "shared expert": 0, "mhc+norms": 0, "mtp": 0}
    for name, spec in checkpoint_schema(cfg).items():
        if name.endswith(".scale"):
            continue  # quantisation scales are not parameters
        n = _prod(spec.shape)
        if spec.dtype == I8:
            n *= 2  # packed FP4: two parameters per byte
        if name.startswith("mtp."):
            g = "mtp"
        elif name.startswith(("embed.", "head.")):
            g = "embed+head"
        elif ".compressor." in name or ".indexer." in name:
            g = "compressor+indexer"
        elif ".attn." in name:
            g = "attention"
        elif ".ffn.gate." in name:
            g = "router"
        elif ".ffn.experts." in name:
            g = "routed experts"
        elif ".ffn.shared_experts." in name:
            g = "shared expert"
        else:
            g = "mhc+norms"
        groups[g] += n
    groups["total"] = sum(groups.values())
    # per token: attention + router + k routed + shared + mHC + head (no embedding lookup, no MTP)
    routed_active = groups["routed experts"] * cfg.n_activated_experts // cfg.n_routed_experts
    head = cfg.vocab_size * cfg.dim
    groups["active per token"] = (groups["total"] - groups["mtp"] - groups["embed+head"] + head
                                  - groups["routed experts"] + routed_active)
    return groups

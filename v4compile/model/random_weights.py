"""Seeded, well-scaled random weights in the official checkpoint format (for tests and benchmarks).

Each tensor is drawn in float32 from its own torch.Generator seeded by (seed, tensor name), so a tensor
does not depend on which others were generated: `random_tensors` streams a bench-sized model one tensor
at a time and `random_state_dict` (small configs) stacks the same values. Quantised with quant.formats
exactly as the official checkpoints store them (FP8 128x128 UE8M0; MXFP4 experts; FP8 + FP32 scales for
-Base experts).

Scales chosen so that a random model computes something sensible: linear weights ~ N(0, 1/fan_in);
norms 1 + N(0, 0.02); mHC `fn` rows ~ 0.1/sqrt(hc*d) so the mixing logits are ~ N(0, 0.01), `base` set
so pre ~ 1/hc, post ~ 1 and comb logits favour the diagonal; small sink / ape / gate bias; tid2eid
rows of distinct experts.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator

import torch

from v4compile.errors import CheckpointError
from v4compile.model.config import ModelConfig
from v4compile.model.schema import TensorSpec, checkpoint_schema, model_key, model_schema
from v4compile.quant.formats import quant_fp4_block, quant_fp8_block

_TID_CHUNK = 16384  # rows of tid2eid drawn at once (bounds the [rows, E] temporary)


def _generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    h = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(h, "little") & (2**63 - 1))


def _normal(shape: tuple[int, ...], std: float, g: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float32, device=g.device) * std


def _logit(p: float) -> float:
    p = min(max(p, 1e-3), 1 - 1e-3)
    return math.log(p / (1 - p))


def _hc_base(cfg: ModelConfig, n: int, g: torch.Generator) -> torch.Tensor:
    """[pre logits (h), post logits (h), comb logits (h*h)] or, for the head, pre logits only."""
    h = cfg.hc_mult
    pre = torch.full((h,), _logit(1 / h), device=g.device)
    if n == h:
        return pre + _normal((h,), 0.01, g)
    post = torch.zeros(h, device=g.device)  # 2 * sigmoid(0) = 1
    comb = torch.eye(h, device=g.device).flatten()  # diagonal-favouring logits before Sinkhorn
    assert n == (2 + h) * h, n
    return torch.cat([pre, post, comb]) + _normal((n,), 0.01, g)


def _tid2eid(cfg: ModelConfig, g: torch.Generator) -> torch.Tensor:
    """[vocab, k] int64: each row k distinct experts (prefix of a random permutation)."""
    rows = []
    for start in range(0, cfg.vocab_size, _TID_CHUNK):
        n = min(_TID_CHUNK, cfg.vocab_size - start)
        keys = torch.rand((n, cfg.n_routed_experts), generator=g, device=g.device)
        rows.append(keys.argsort(dim=1)[:, : cfg.n_activated_experts])
    return torch.cat(rows).to(torch.int64)


def _small_tensor(cfg: ModelConfig, name: str, spec: TensorSpec, g: torch.Generator) -> torch.Tensor:
    """Every tensor that is not a linear weight (float32 draw, cast to the stored dtype)."""
    leaf = name.rsplit(".", 1)[-1] if not name.endswith(".weight") else name.rsplit(".", 2)[-2]
    shape = spec.shape
    if name == "embed.weight":
        x = _normal(shape, 1.0, g)
    elif leaf in ("attn_norm", "ffn_norm", "q_norm", "kv_norm", "norm", "enorm", "hnorm"):
        x = 1.0 + _normal(shape, 0.02, g)
    elif leaf == "attn_sink":
        x = _normal(shape, 0.1, g)
    elif leaf == "ape":
        x = _normal(shape, 0.1, g)
    elif leaf == "bias":
        x = _normal(shape, 0.01, g)
    elif leaf == "tid2eid":
        return _tid2eid(cfg, g)
    elif leaf.endswith("_fn"):  # hc_attn_fn, hc_ffn_fn, hc_head_fn: [n, hc*d]
        x = _normal(shape, 0.1 / math.sqrt(shape[1]), g)
    elif leaf.endswith("_base"):
        x = _hc_base(cfg, shape[0], g)
    elif leaf.endswith("_scale") and leaf.startswith("hc_"):
        x = 1.0 + _normal(shape, 0.01, g)
    else:
        raise CheckpointError(f"{name}: no random initialiser for this tensor ({spec})")
    return x.to(spec.dtype)


def _linear(name: str, spec: TensorSpec, scale_spec: TensorSpec | None,
            g: torch.Generator) -> list[tuple[str, torch.Tensor]]:
    """A linear weight ~ N(0, 1/fan_in), stored as spec says: BF16, FP8 (+UE8M0 or FP32 scale) or MXFP4."""
    out_dim, in_dim = spec.shape
    if spec.dtype == torch.int8:  # packed e2m1
        in_dim *= 2
    w = _normal((out_dim, in_dim), 1.0 / math.sqrt(in_dim), g)
    base = name.removesuffix(".weight")
    if spec.dtype == torch.bfloat16 and scale_spec is None:
        return [(name, w.to(torch.bfloat16))]
    if scale_spec is None:
        raise CheckpointError(f"{name}: quantised weight {spec} without a .scale tensor in the schema")
    if spec.dtype == torch.float8_e4m3fn and scale_spec.dtype == torch.float8_e8m0fnu:
        q, s = quant_fp8_block(w, (128, 128), scale_fmt="ue8m0")
    elif spec.dtype == torch.float8_e4m3fn and scale_spec.dtype == torch.float32:
        q, s = quant_fp8_block(w, (128, 128), scale_fmt="fp32")
    elif spec.dtype == torch.int8 and scale_spec.dtype == torch.float8_e8m0fnu:
        q, s = quant_fp4_block(w, 32)
    else:
        raise CheckpointError(f"{name}: no encoder for weight {spec} with scale {scale_spec}")
    return [(name, q), (f"{base}.scale", s)]


def random_tensors(cfg: ModelConfig, seed: int, device: str | torch.device = "cpu"
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """(official name, tensor) in checkpoint_schema order; one tensor (or weight+scale pair) in memory at a time.

    Values are a function of (seed, name, device type): CPU and CUDA random streams differ. Generating
    on a GPU makes a bench-sized checkpoint take minutes instead of tens of minutes on the CPU.
    """
    schema = checkpoint_schema(cfg)
    device = torch.device(device)
    for name, spec in schema.items():
        if name.endswith(".scale") and name.removesuffix(".scale") + ".weight" in schema:
            continue  # produced together with its weight
        g = _generator(seed, name, device)
        is_linear = name.endswith(".weight") and len(spec.shape) == 2 and name != "embed.weight"
        if is_linear:
            yield from _linear(name, spec, schema.get(name.removesuffix(".weight") + ".scale"), g)
        else:
            yield name, _small_tensor(cfg, name, spec, g)


def stack_experts(items: Iterable[tuple[str, int | None, torch.Tensor]], schema: dict[str, TensorSpec],
                  device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """(model key, expert index or None, tensor) -> state dict in `schema` order, experts stacked into [E, ...]."""
    out: dict[str, torch.Tensor] = {}
    for key, e, t in items:
        if e is None:
            out[key] = t
            continue
        if key not in out:
            out[key] = torch.empty(schema[key].shape, dtype=schema[key].dtype, device=device)
        out[key][e] = t
    return {k: out[k] for k in schema}


def random_state_dict(cfg: ModelConfig, seed: int, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A valid random checkpoint as a reference-model state dict (model keys, experts stacked, native dtypes)."""
    items = ((*model_key(name), t) for name, t in random_tensors(cfg, seed, device))
    return stack_experts(items, model_schema(cfg), device)

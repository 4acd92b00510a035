"""Official-format checkpoint I/O (V4-SPEC section 12): safetensors shards + index + HF config.json.

Reading is lazy and strict: every shard header is checked first (missing / unexpected tensors, shapes,
dtypes, truncated or corrupt files), then tensors are yielded one at a time from memory-mapped shards.
Quantised tensors stay quantised (e4m3 / packed e2m1 int8 / UE8M0 / FP32 scales). Writing goes to a
temporary directory renamed into place, so an interrupted save leaves nothing at the destination.

Names: official checkpoint names (`layers.3.ffn.experts.17.w1.weight`) on disk; model keys
(`layers.3.ffn.experts.w1.weight`, experts stacked along dim 0) in state dicts (schema.model_key).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from v4compile.errors import CheckpointError, ConfigError
from v4compile.model.config import ModelConfig
from v4compile.model.random_weights import random_state_dict, random_tensors
from v4compile.model.safetensors_io import HeaderEntry, read_header, write_shard
from v4compile.model.schema import TensorSpec, checkpoint_schema, model_key, model_schema

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# Fields that describe how a model is run, not what is stored: a checkpoint may be used with any value.
RUNTIME_FIELDS = ("max_seq_len", "max_batch_size", "torch_dtype")
# convert.py drops these (an MTP copy of the embedding / head); the MTP block shares the main ones.
_DROPPED = re.compile(r"^mtp\.\d+\..*(?:emb|head\.weight)")
_CHUNK = 1 << 24  # elements per non-finite check (bounds the temporary bool tensor)

Progress = Callable[[str, int, int], None]  # (tensor name, tensors done, tensors total)

__all__ = ["read_state", "load_state_dict", "save_state_dict", "write_checkpoint", "random_state_dict",
           "random_tensors", "random_checkpoint", "checkpoint_config", "hf_config_dict", "load_checkpoint",
           "save_checkpoint"]


# ------------------------------------------------------------------------------------------- config.json


def hf_config_dict(cfg: ModelConfig) -> dict:
    """cfg as an official HF `config.json` (HF key names; ModelConfig.from_pretrained reads it back exactly)."""
    d = {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
        "num_nextn_predict_layers": cfg.n_mtp_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": 1,
        "head_dim": cfg.head_dim, "qk_rope_head_dim": cfg.rope_head_dim, "q_lora_rank": cfg.q_lora_rank,
        "o_groups": cfg.o_groups, "o_lora_rank": cfg.o_lora_rank, "sliding_window": cfg.window_size,
        "compress_ratios": list(cfg.compress_ratios), "index_n_heads": cfg.index_n_heads,
        "index_head_dim": cfg.index_head_dim, "index_topk": cfg.index_topk, "rope_theta": cfg.rope_theta,
        "compress_rope_theta": cfg.compress_rope_theta,
        "rope_scaling": {"type": "yarn", "factor": cfg.rope_factor, "original_max_position_embeddings": cfg.original_seq_len,
                         "beta_fast": cfg.beta_fast, "beta_slow": cfg.beta_slow},
        "max_position_embeddings": cfg.max_position_embeddings, "n_routed_experts": cfg.n_routed_experts,
        "n_shared_experts": cfg.n_shared_experts, "num_experts_per_tok": cfg.n_activated_experts,
        "moe_intermediate_size": cfg.moe_inter_dim, "num_hash_layers": cfg.n_hash_layers,
        "scoring_func": cfg.score_func, "topk_method": "noaux_tc", "norm_topk_prob": True,
        "routed_scaling_factor": cfg.route_scale, "swiglu_limit": cfg.swiglu_limit, "hidden_act": "silu",
        "hc_mult": cfg.hc_mult, "hc_sinkhorn_iters": cfg.hc_sinkhorn_iters, "hc_eps": cfg.hc_eps,
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": False, "attention_bias": False,
        "expert_dtype": cfg.expert_dtype, "torch_dtype": cfg.torch_dtype,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
        # runtime knobs, not HF keys; stored so a saved tiny model reloads with its own limits
        "max_seq_len": cfg.max_seq_len, "max_batch_size": cfg.max_batch_size,
    }
    if cfg.weight_dtype == "fp8":
        d["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                    "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}
    elif cfg.weight_dtype == "bf16":
        d["dtype"] = "bf16"  # inference/config.json key: without it the reader assumes the released fp8
    else:
        raise ConfigError(f"weight_dtype = {cfg.weight_dtype!r}; expected 'fp8' or 'bf16'")
    return d


def checkpoint_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a checkpoint directory (its config.json); ConfigError naming the file."""
    f = Path(path) / CONFIG_FILE
    if not f.is_file():
        raise CheckpointError(f"{path}: no {CONFIG_FILE}; pass the model config explicitly")
    try:
        return ModelConfig.from_pretrained(f)
    except ConfigError as e:
        raise ConfigError(f"{f}: {e}") from None


def _resolve_config(path: Path, cfg: ModelConfig | None) -> ModelConfig:
    if cfg is None:
        return checkpoint_config(path)
    if not (path / CONFIG_FILE).is_file():
        return cfg  # a bare set of shards: the tensors are still checked against cfg's schema
    disk = checkpoint_config(path)
    diffs = [f"{k} = {getattr(disk, k)!r} in {CONFIG_FILE}, {getattr(cfg, k)!r} expected"
             for k in disk.to_dict() if k not in RUNTIME_FIELDS and getattr(disk, k) != getattr(cfg, k)]
    if diffs:
        raise CheckpointError(f"{path}: {CONFIG_FILE} does not match the given config: " + "; ".join(diffs))
    return cfg


# ------------------------------------------------------------------------------------------- reading


def _shard_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The shard files of a checkpoint and the index's weight map (None for the single-file form)."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    index = path / INDEX_FILE
    if not index.is_file():
        if (path / SINGLE_FILE).is_file():
            return [path / SINGLE_FILE], None
        raise CheckpointError(f"{path}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
        weight_map = dict(weight_map)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index}: corrupt index ({type(e).__name__}: {e})") from None
    for s in shards:
        if not isinstance(s, str) or "/" in s or s.startswith("."):
            raise CheckpointError(f"{index}: bad shard file name {s!r}")
        if not (path / s).is_file():
            raise CheckpointError(f"{index} names shard {s!r}, which does not exist in {path}")
    return [path / s for s in shards], weight_map


def _plan(path: Path, cfg: ModelConfig) -> list[tuple[Path, list[tuple[str, str, TensorSpec]]]]:
    """Check every shard header against the schema; returns per shard [(name in file, official name, spec)]."""
    schema = checkpoint_schema(cfg)
    seen: dict[str, Path] = {}
    plan = []
    shards, weight_map = _shard_files(path)
    for shard in shards:
        header = read_header(shard)
        items = []
        for fname, entry in sorted(header.items(), key=lambda kv: kv[1].begin):
            if weight_map is not None and weight_map.get(fname) != shard.name:
                raise CheckpointError(f"{fname}: found in {shard.name}, but {INDEX_FILE} maps it to "
                                      f"{weight_map.get(fname)!r}")
            name = fname.removeprefix("model.")
            if _DROPPED.match(name):
                log.info("%s: skipping %s (convert.py drops MTP copies of embedding/head)", shard.name, fname)
                continue
            if name in seen:
                raise CheckpointError(f"{name}: found twice (in {seen[name].name} and {shard.name})")
            seen[name] = shard
            spec = schema.get(name)
            if spec is None:
                raise CheckpointError(f"{name}: unexpected tensor in {shard.name} (not in the {cfg.n_layers}-layer "
                                      f"schema; found {_describe(entry)})")
            if (spec.dtype, spec.shape) != (entry.dtype, entry.shape):
                raise CheckpointError(f"{name}: expected {spec}, found {_describe(entry)} (in {shard.name})")
            items.append((fname, name, spec))
        plan.append((shard, items))
    missing = [n for n in schema if n not in seen]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{path}: missing tensor(s) {', '.join(missing[:5])}{more} "
                              f"(first expected {schema[missing[0]]})")
    return plan


def _describe(e: HeaderEntry | torch.Tensor) -> str:
    return f"{str(e.dtype).removeprefix('torch.')} {list(e.shape)}"


def _check_finite(name: str, t: torch.Tensor) -> None:
    """Raise on NaN/inf: float NaN/inf, e4m3 NaN bytes (0x7F/0xFF), UE8M0 NaN byte (255); ints skip."""
    if not t.dtype.is_floating_point:
        return
    flat = t.reshape(-1)
    bad_total, first = 0, -1
    for i in range(0, flat.numel(), _CHUNK):
        c = flat[i:i + _CHUNK]
        if t.dtype == torch.float8_e4m3fn:
            bad = (c.view(torch.uint8) & 0x7F) == 0x7F
        elif t.dtype == torch.float8_e8m0fnu:
            bad = c.view(torch.uint8) == 255
        elif t.dtype == torch.float8_e5m2:
            bad = (c.view(torch.uint8) & 0x7C) == 0x7C
        else:
            bad = ~torch.isfinite(c)
        n = int(bad.sum())
        if n and first < 0:
            first = i + int(bad.nonzero()[0, 0])
        bad_total += n
    if bad_total:
        raise CheckpointError(f"{name}: {bad_total} non-finite value(s) (NaN/inf), first at flat index {first}")


def read_state(path: str | Path, cfg: ModelConfig | None = None, *, check_finite: bool = False,
               progress: Progress | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (official name, CPU tensor) one at a time, shard by shard, after validating every header."""
    path = Path(path)
    cfg = _resolve_config(path, cfg)
    plan = _plan(path, cfg)
    return _iter_tensors(plan, check_finite, progress)


def _iter_tensors(plan, check_finite: bool, progress: Progress | None) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    total, done = sum(len(items) for _, items in plan), 0
    for shard, items in plan:
        try:
            with safe_open(str(shard), framework="pt", device="cpu") as f:
                for fname, name, _spec in items:
                    t = f.get_tensor(fname)
                    if check_finite:
                        _check_finite(name, t)
                    done += 1
                    if progress is not None:
                        progress(name, done, total)
                    yield name, t
        except SafetensorError as e:
            raise CheckpointError(f"{shard}: cannot read ({e})") from None


def load_state_dict(path: str | Path, cfg: ModelConfig | None = None, device: str | torch.device = "cpu", *,
                    check_finite: bool = False, progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """Checkpoint -> reference-model state dict (model keys, experts stacked); quantised tensors stay quantised."""
    path = Path(path)
    cfg = _resolve_config(path, cfg)
    mschema = model_schema(cfg)
    out: dict[str, torch.Tensor] = {}
    for name, t in read_state(path, cfg, check_finite=check_finite, progress=progress):
        key, e = model_key(name)
        if e is None:
            out[key] = t.to(device)
            continue
        if key not in out:  # preallocate the [E, ...] stack once, fill one expert at a time
            spec = mschema[key]
            out[key] = torch.empty(spec.shape, dtype=spec.dtype, device=device)
        out[key][e].copy_(t)
    return out


# ------------------------------------------------------------------------------------------- writing


def _check_against(name: str, t: torch.Tensor, spec: TensorSpec | None, what: str) -> None:
    if spec is None:
        raise CheckpointError(f"{name}: unexpected tensor (not in the {what})")
    if (t.dtype, tuple(t.shape)) != (spec.dtype, spec.shape):
        raise CheckpointError(f"{name}: expected {spec}, found {_describe(t)}")


def write_checkpoint(tensors: Iterable[tuple[str, torch.Tensor]], cfg: ModelConfig, path: str | Path, *,
                     max_shard_bytes: float = 5e9, overwrite: bool = False) -> Path:
    """Stream (official name, tensor) pairs into shards + index + config.json, atomically at `path`."""
    path = Path(path)
    if path.exists() and not (overwrite or (path.is_dir() and not any(path.iterdir()))):
        raise CheckpointError(f"{path}: already exists (pass overwrite=True to replace it)")
    schema = checkpoint_schema(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        weight_map, total = _write_shards(tensors, schema, tmp, max_shard_bytes)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config_dict(cfg), indent=2) + "\n")
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _write_shards(tensors: Iterable[tuple[str, torch.Tensor]], schema: dict[str, TensorSpec], tmp: Path,
                  max_shard_bytes: float) -> tuple[dict[str, str], int]:
    seen: set[str] = set()
    shards: list[list[str]] = []
    buf: list[tuple[str, torch.Tensor]] = []
    buf_bytes = total = 0

    def flush() -> None:
        nonlocal buf, buf_bytes
        write_shard(tmp / f"shard-{len(shards):05d}.part", buf)
        shards.append([n for n, _ in buf])
        buf, buf_bytes = [], 0

    for name, t in tensors:
        _check_against(name, t, schema.get(name), "checkpoint schema")
        if name in seen:
            raise CheckpointError(f"{name}: given twice")
        seen.add(name)
        nbytes = t.numel() * t.dtype.itemsize
        if buf and buf_bytes + nbytes > max_shard_bytes:
            flush()
        buf.append((name, t))
        buf_bytes += nbytes
        total += nbytes
    if buf:
        flush()
    missing = [n for n in schema if n not in seen]
    if missing:
        raise CheckpointError(f"cannot save: missing tensor(s) {', '.join(missing[:5])}"
                              f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}")
    weight_map = {}
    for k, names in enumerate(shards):
        final = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(tmp / f"shard-{k:05d}.part", tmp / final)
        weight_map.update({n: final for n in names})
    return weight_map, total


def _move_into_place(tmp: Path, path: Path) -> None:
    """Rename tmp to path; an existing checkpoint is swapped out first and deleted after."""
    if path.exists() and (path.is_file() or any(path.iterdir())):
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        os.replace(tmp, path)


def _unstack(state: dict[str, torch.Tensor], cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    for name in checkpoint_schema(cfg):
        key, e = model_key(name)
        yield name, (state[key] if e is None else state[key][e])


def save_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig, path: str | Path, *,
                    max_shard_bytes: float = 5e9, overwrite: bool = False) -> Path:
    """Reference-model state dict -> official checkpoint (experts unstacked), bit-exact, atomic."""
    mschema = model_schema(cfg)
    for key, t in state.items():
        _check_against(key, t, mschema.get(key), "model schema")
    missing = [k for k in mschema if k not in state]
    if missing:
        raise CheckpointError(f"cannot save: state dict lacks {', '.join(missing[:5])}"
                              f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}")
    return write_checkpoint(_unstack(state, cfg), cfg, path, max_shard_bytes=max_shard_bytes, overwrite=overwrite)


def random_checkpoint(cfg: ModelConfig, seed: int, path: str | Path, *, max_shard_bytes: float = 5e9,
                      overwrite: bool = False, device: str | torch.device = "cpu") -> Path:
    """Write the random_state_dict(cfg, seed, device) checkpoint, generated tensor by tensor (bench fits in RAM)."""
    return write_checkpoint(random_tensors(cfg, seed, device), cfg, path, max_shard_bytes=max_shard_bytes,
                            overwrite=overwrite)


# ------------------------------------------------------------------------------------------- model wrappers


def load_checkpoint(path: str | Path, cfg: ModelConfig | None = None, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, *, check_finite: bool = False,
                    progress: Progress | None = None):
    """Checkpoint -> ReferenceModel (built on the meta device, weights assigned: one copy in memory)."""
    from v4compile.model.reference import ReferenceModel  # the I/O core above does not need the model

    path = Path(path)
    cfg = _resolve_config(path, cfg)
    return model_from_state_dict(cfg, load_state_dict(path, cfg, device, check_finite=check_finite,
                                                      progress=progress), dtype=dtype, device=device)


def model_from_state_dict(cfg: ModelConfig, state_dict: dict[str, torch.Tensor], *, dtype: torch.dtype | None = None,
                          device: str | torch.device = "cpu", quantized: bool = True):
    """A ReferenceModel holding exactly `state_dict` (its module-path keys, e.g. another model's state_dict()),
    built on the meta device and assigned: one copy of the weights."""
    from v4compile.model.reference import ReferenceModel

    model = ReferenceModel(cfg, dtype=dtype, device="meta", quantized=quantized)
    model.load_state_dict(state_dict, strict=True, assign=True)
    _materialize_buffers(model, cfg, device)
    return model.eval()


def _materialize_buffers(model, cfg: ModelConfig, device: str | torch.device) -> None:
    """Recompute the non-persistent buffers that the meta-device build left empty (RoPE tables)."""
    from v4compile.model.rope import layer_inv_freq

    for block in [*model.layers, *model.mtp]:
        block.attn.inv_freq = layer_inv_freq(cfg, block.layer_id, device=device)
        for ew in (block.ffn.experts.w1, block.ffn.experts.w2, block.ffn.experts.w3):
            if ew.scale.is_meta:  # bf16 experts: the empty non-persistent placeholder scale
                ew.scale = torch.empty(0, device=device)
    left = [n for n, b in model.named_buffers() if b.is_meta] + [n for n, p in model.named_parameters() if p.is_meta]
    if left:  # a new derived buffer in the model needs a rule here
        raise CheckpointError(f"load_checkpoint: tensors still on the meta device after loading: {left[:5]}")


def save_checkpoint(model, path: str | Path, *, max_shard_bytes: float = 5e9, overwrite: bool = False) -> Path:
    """ReferenceModel -> official checkpoint (its weights as stored: FP8 / MXFP4 with their scales)."""
    if not getattr(model, "quantized", True):
        raise CheckpointError("model holds dequantised float32 weights (quantized=False); the official format "
                              "stores FP8/FP4 weights: build the model with quantized=True to save it")
    return save_state_dict(model.state_dict(), model.cfg, path, max_shard_bytes=max_shard_bytes,
                           overwrite=overwrite)

"""Byte accounting of `bench model`: the decode floor's bytes per step and the KV bytes per token of allocated caches.

Decode floor (one step of `batch` sequences whose last timed query sits at position C - 1, i.e. sees C positions):
- weights at their checkpoint storage dtypes (`checkpoint_schema(cfg)`: FP8 + UE8M0 dense, MXFP4 / FP8 / BF16
  routed experts, BF16 / FP32 rest): every main-stack tensor except the routed experts, plus
  min(batch * top_k, n_routed) routed experts per layer; the embedding table and the hash-routing table only
  by the `batch` rows looked up; the MTP block not at all (the decode entry point does not run it);
- caches, per main layer and sequence, entry sizes from the cache layout actually allocated (the engine's
  manifest, or the reference layout; production entries count their scale bytes too): the window ring's
  min(C, window) entries; CSA: all floor(C/4) indexer keys + min(index_topk, floor(C/4)) compressed entries;
  HCA: all floor(C/m) compressed entries.
Writes (the new ring entry, compressor state rows) and activations are left out: the floor is a lower bound.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from v4compile.model.config import ModelConfig
from v4compile.model.kv_bytes import GROWING_FIELDS, measured_per_token
from v4compile.model.schema import checkpoint_schema, model_key
from v4compile.runtime import manifest as mf
_FILL_CHUNK = 1 << 24


def _nbytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def decode_weight_bytes(cfg: ModelConfig, batch: int) -> dict[str, int]:
    """Weight bytes one decode step of `batch` tokens must read (see module doc), by part."""
    touched = min(batch * cfg.n_activated_experts, cfg.n_routed_experts)
    rows = min(batch, cfg.vocab_size)
    out = {"dense": 0, "routed_experts": 0, "embedding_rows": 0, "hash_table_rows": 0}
    for name, spec in checkpoint_schema(cfg).items():
        n = _nbytes(spec.shape, spec.dtype)
        _, expert = model_key(name)
        if name.startswith("mtp."):
            continue  # the decode program runs the main stack only
        elif name == "embed.weight":
            out["embedding_rows"] += rows * (n // cfg.vocab_size)
        elif name.endswith(".gate.tid2eid"):
            out["hash_table_rows"] += rows * (n // cfg.vocab_size)
        elif expert is not None:
            out["routed_experts"] += n if expert < touched else 0  # every expert has the same size
        else:
            out["dense"] += n
    out["routed_experts_per_layer"] = touched
    return out


def layout_entry_bytes(layout: list[dict[str, Any]]) -> dict[str, int]:
    """Cache tensor name -> bytes of one entry (one row of dim 1) in this layout."""
    return {e["name"]: _nbytes(e["shape"][2:], mf.dtype_of(e["dtype"])) for e in layout}


def decode_cache_bytes(cfg: ModelConfig, layout: list[dict[str, Any]], batch: int, context: int) -> dict[str, int]:
    """Cache bytes one decode step must read at context `context` (see module doc), by part."""
    sizes = layout_entry_bytes(layout)

    def entry(name: str) -> int:  # a row of the data tensor and, in the production layout, of its scales
        return sizes[name] + sizes.get(f"{name}_scale", 0)

    window = index = selected = compressed = 0
    for i in range(cfg.n_layers):
        m = cfg.compress_ratios[i]
        window += min(context, cfg.window_size) * entry(f"blocks.{i}.ring")
        if m == 4:
            n = context // 4
            index += n * entry(f"blocks.{i}.idx_kv")
            selected += min(cfg.index_topk, n) * entry(f"blocks.{i}.kv")
        elif m > 4:
            compressed += (context // m) * entry(f"blocks.{i}.kv")
    return {"window": batch * window, "csa_index_keys": batch * index, "csa_selected": batch * selected,
            "hca_compressed": batch * compressed}


def decode_floor(cfg: ModelConfig, layout: list[dict[str, Any]], batch: int, context: int,
                 copy_gbps: float) -> dict[str, Any]:
    """{"bytes", "us", "weights": {...}, "caches": {...}}: the step's bytes over the measured copy bandwidth."""
    w = decode_weight_bytes(cfg, batch)
    c = decode_cache_bytes(cfg, layout, batch, context)
    total = sum(v for k, v in w.items() if k != "routed_experts_per_layer") + sum(c.values())
    return {"bytes": total, "us": total / (copy_gbps * 1e3), "weights": w, "caches": c}


def measured_kv_bytes(caches: Iterable[torch.Tensor], names: Iterable[str], batch: int, max_len: int,
                      ratios: Iterable[int]) -> dict[str, Any]:
    """Bytes per token of allocated cache tensors: all of them / (batch * max_len), the part that grows with
    max_len (compressed entries and indexer keys, scratch rows included), and "entries_per_token": the
    long-context bytes per token of this allocation (kv_bytes.measured_per_token: rows / ratio, the quantity
    V4-SPEC 6.3 tabulates); "layout": the KV layout the tensors are in."""
    named = list(zip(names, caches, strict=True))
    total = growing = 0
    for name, t in named:
        n = t.numel() * t.element_size()
        total += n
        growing += n if name.rsplit(".", 1)[-1] in GROWING_FIELDS else 0
    layout = "production" if any(name.endswith(".ring_scale") for name, _ in named) else "reference"
    return {"allocated_bytes": total, "batch": batch, "max_len": max_len, "layout": layout,
            "per_token": total / (batch * max_len), "growing_per_token": growing / (batch * max_len),
            "entries_per_token": measured_per_token(named, list(ratios))}


@torch.no_grad()
def fill_random_(tensors: Iterable[torch.Tensor], seed: int) -> None:
    """Seeded N(0, 1) values in float caches (float8 via float32, chunk by chunk), small non-negative codes in
    integer ones (never the UE8M0 NaN byte): finite everywhere, so a timed step takes no NaN / empty path."""
    for i, t in enumerate(tensors):
        g = torch.Generator(device=t.device).manual_seed(seed * 1000 + i)
        if t.dtype in (torch.float32, torch.bfloat16, torch.float16):
            t.normal_(0.0, 1.0, generator=g)
        elif t.dtype.is_floating_point:
            flat = t.view(-1)
            for lo in range(0, flat.numel(), _FILL_CHUNK):
                n = min(_FILL_CHUNK, flat.numel() - lo)
                flat[lo:lo + n] = torch.randn(n, generator=g, device=t.device).to(t.dtype)
        else:
            t.random_(0, 127, generator=g)

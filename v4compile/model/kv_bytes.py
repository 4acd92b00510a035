"""KV-cache byte accounting (V4-SPEC section 6): per-token asymptote and fixed per-sequence state.

Two layouts: `reference` (the BF16 buffers the eager reference allocates) and `production` (FlashMLA's
"MODEL1" entry: e4m3 nope dims + BF16 RoPE dims + one UE8M0 scale per 64 nope dims, padded to 8 bytes;
indexer keys as packed e2m1 + one UE8M0 scale per 32 dims).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import Tensor

from v4compile.model.config import ModelConfig

LAYOUTS = ("production", "reference")
GROWING_FIELDS = ("kv", "kv_scale", "idx_kv", "idx_kv_scale")
"""Cache fields whose rows are compressed entries / indexer keys (one row per `ratio` positions); the others
(window rings, compressor states) have a fixed size per sequence."""
V32_BYTES_PER_TOKEN_PER_LAYER = 656 + 132  # DeepSeek V3.2: 512 e4m3 + 4 fp32 scales + 64 bf16, + 132 B FP8 indexer key
V32_LAYERS = 61


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def kv_entry_bytes(cfg: ModelConfig, layout: str) -> int:
    """Bytes of one main KV entry (window or compressed)."""
    if layout == "production":
        nope = cfg.nope_head_dim
        return _round_up(nope + 2 * cfg.rope_head_dim + nope // 64, 8)  # Flash/Pro: 448 + 128 + 7 (+1 pad) = 584
    if layout == "reference":
        return 2 * cfg.head_dim
    raise ValueError(f"unknown KV layout {layout!r}; expected one of {LAYOUTS}")


def index_entry_bytes(cfg: ModelConfig, layout: str) -> int:
    """Bytes of one indexer key (CSA layers)."""
    if layout == "production":
        return cfg.index_head_dim // 2 + cfg.index_head_dim // 32  # 64 + 4 = 68 at index_head_dim 128
    if layout == "reference":
        return 2 * cfg.index_head_dim
    raise ValueError(f"unknown KV layout {layout!r}; expected one of {LAYOUTS}")


@dataclass(frozen=True)
class KVBytes:
    layout: str
    per_token: float  # long-context asymptote over the main stack (window and compressor state excluded)
    per_layer: dict[int, float]  # layer id -> bytes per token
    window_per_sequence: int  # fixed: window rings of every block incl. MTP
    state_per_sequence: int  # fixed: compressor states (fp32 in both layouts)

    def at(self, tokens: int) -> float:
        return self.per_token * tokens + self.window_per_sequence + self.state_per_sequence


def kv_bytes(cfg: ModelConfig, layout: str = "production") -> KVBytes:
    entry, index = kv_entry_bytes(cfg, layout), index_entry_bytes(cfg, layout)
    per_layer: dict[int, float] = {}
    state = 0
    for i in range(cfg.n_layers):
        kind, m = cfg.layer_kind(i), cfg.compress_ratios[i]
        if kind == "csa":
            per_layer[i] = entry / m + index / m
            state += 2 * (2 * m) * (2 * cfg.head_dim) * 4 + 2 * (2 * m) * (2 * cfg.index_head_dim) * 4
        elif kind == "hca":
            per_layer[i] = entry / m
            state += 2 * m * cfg.head_dim * 4
        else:
            per_layer[i] = 0.0
    window = cfg.window_size * entry * cfg.n_blocks
    return KVBytes(layout, sum(per_layer.values()), per_layer, window, state)


def v32_bytes_per_token() -> int:
    """DeepSeek V3.2's KV bytes per token (61 layers, FP8 MLA latent + FP8 indexer key): 48 068."""
    return V32_BYTES_PER_TOKEN_PER_LAYER * V32_LAYERS


def measured_per_token(named: Iterable[tuple[str, Tensor]], ratios: Sequence[int]) -> float:
    """KV bytes per token of ALLOCATED cache tensors named 'blocks.{i}.{field}' (Cache.named_tensors(), or an
    engine session's caches with the manifest's names): each GROWING_FIELDS tensor's bytes of one row of one
    sequence divided by block i's compress ratio, summed. Equals kv_bytes(cfg, layout).per_token for the layout
    allocated (reference: at bf16 activations)."""
    total = 0.0
    for name, t in named:
        _, block, fld = name.split(".")
        if fld in GROWING_FIELDS:
            total += math.prod(t.shape[2:]) * t.element_size() / ratios[int(block)]
    return total

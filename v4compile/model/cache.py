"""KV cache of the reference model (V4-SPEC section 6): fixed-size tensors per block, updated in place.

Per block (main layers, then MTP blocks), for B sequence slots and capacity `max_len` positions:
  ring         [B, W, D] act      raw KV of the last W positions, position p at slot p mod W
  kv           [B, max_len//m + 1, D] act   compressed entries j (ratio m != 0); the LAST row is scratch
  kv_state     [B, c m, c D] f32  projected values of the incomplete block (CSA: rows 0..m-1 previous block)
  score_state  [B, c m, c D] f32  ape-biased gate logits of the same tokens; -inf where no token
  idx_kv, idx_kv_state, idx_score_state   the same for the CSA indexer (width index_head_dim, ratio 4)
Values are stored already fake-quantised (FP8 nope / FP4 indexer), so a production encoding is exact.
`reset(slots)` clears a sequence slot for reuse (score states to -inf), which fixes the official
reference's stale-state leak (section 6.5 caveat).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from v4compile.errors import InputError
from v4compile.model.config import ModelConfig

_SCORE_FIELDS = ("score_state", "idx_score_state")
_FIELDS = ("ring", "kv", "kv_state", "score_state", "idx_kv", "idx_kv_state", "idx_score_state")


@dataclass
class LayerCache:
    """One block's cache tensors (None where the layer kind has no such state)."""

    ratio: int
    ring: Tensor
    kv: Tensor | None = None
    kv_state: Tensor | None = None
    score_state: Tensor | None = None
    idx_kv: Tensor | None = None
    idx_kv_state: Tensor | None = None
    idx_score_state: Tensor | None = None

    @property
    def capacity(self) -> int:
        """Compressed entries that fit (scratch row excluded); 0 for window-only blocks."""
        return 0 if self.kv is None else self.kv.shape[1] - 1

    def tensors(self) -> dict[str, Tensor]:
        return {f: getattr(self, f) for f in _FIELDS if getattr(self, f) is not None}

    def reset(self, slots: Tensor) -> None:
        for name, t in self.tensors().items():
            t[slots] = -math.inf if name in _SCORE_FIELDS else 0


@dataclass
class Cache:
    """All blocks' caches for `batch` sequence slots of capacity `max_len` positions each."""

    layers: list[LayerCache]
    batch: int
    max_len: int
    dtype: torch.dtype
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def allocate(cls, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> "Cache":
        if not isinstance(batch, int) or batch < 1:
            raise InputError(f"cache batch = {batch!r}; expected a positive int")
        if not isinstance(max_len, int) or not 1 <= max_len <= cfg.max_position_embeddings:
            raise InputError(f"cache max_len = {max_len!r}; expected an int in [1, {cfg.max_position_embeddings}]")
        dev = torch.device(device) if device is not None else torch.device("cpu")
        B, D, W = batch, cfg.head_dim, cfg.window_size

        def zeros(*shape: int, dt: torch.dtype = dtype) -> Tensor:
            return torch.zeros(*shape, dtype=dt, device=dev)

        def neg_inf(*shape: int) -> Tensor:
            return torch.full(shape, -math.inf, dtype=torch.float32, device=dev)

        layers = []
        for i in range(cfg.n_blocks):
            m = cfg.compress_ratios[i]
            lc = LayerCache(ratio=m, ring=zeros(B, W, D))
            if m:
                c = 2 if m == 4 else 1
                lc.kv = zeros(B, max_len // m + 1, D)
                lc.kv_state = zeros(B, c * m, c * D, dt=torch.float32)
                lc.score_state = neg_inf(B, c * m, c * D)
            if m == 4:
                Di = cfg.index_head_dim
                lc.idx_kv = zeros(B, max_len // 4 + 1, Di)
                lc.idx_kv_state = zeros(B, 8, 2 * Di, dt=torch.float32)
                lc.idx_score_state = neg_inf(B, 8, 2 * Di)
            layers.append(lc)
        return cls(layers=layers, batch=B, max_len=max_len, dtype=dtype, device=dev)

    def named_tensors(self) -> dict[str, Tensor]:
        """Flat view 'blocks.{i}.{field}' -> tensor (what an engine passes as mutated inputs)."""
        return {f"blocks.{i}.{k}": t for i, lc in enumerate(self.layers) for k, t in lc.tensors().items()}

    def reset(self, slots: int | list[int] | Tensor | None = None) -> None:
        """Clear sequence slots (all when None) so a reused slot behaves exactly like a fresh cache."""
        if slots is None:
            idx = torch.arange(self.batch, device=self.device)
        else:
            idx = torch.as_tensor(slots, dtype=torch.int64, device=self.device).reshape(-1)
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.batch):
                raise InputError(f"cache reset slots {idx.tolist()} outside [0, {self.batch})")
        for lc in self.layers:
            lc.reset(idx)

"""KV cache of the reference model (V4-SPEC section 6): fixed-size tensors per block, updated in place.

Per block (main layers, then MTP blocks), for B sequence slots and capacity `max_len` positions, in the
"reference" layout (the official reference's buffers, act = activation dtype):
  ring         [B, W, D] act      raw KV of the last W positions, position p at slot p mod W
  kv           [B, max_len//m + 1, D] act   compressed entries j (ratio m != 0); the LAST row is scratch
  kv_state     [B, c m, c D] f32  projected values of the incomplete block (CSA: rows 0..m-1 previous block)
  score_state  [B, c m, c D] f32  ape-biased gate logits of the same tokens; -inf where no token
  idx_kv, idx_kv_state, idx_score_state   the same for the CSA indexer (width index_head_dim, ratio 4)
Values are stored already fake-quantised (FP8 nope / FP4 indexer), so a production encoding is exact.
The "production" layout (V4-SPEC 6.2, quant/kv_layout.py) stores the same values re-encoded in uint8, split
in a data and a scale tensor per KV source (split, not 584-byte rows: the kernels want 16-byte aligned rows):
  ring [B, W, nope + 2R] + ring_scale [B, W, 8]      e4m3 nope | bf16 RoPE, one UE8M0 byte per 64 nope dims
  kv   [B, N', nope + 2R] + kv_scale [B, N', 8]   (N = max_len // m; N' = N + 1 rounded up to SLOT_ALIGN_ROWS:
                                                    padding rows, then the scratch row last)
  idx_kv [B, N', Di/2] + idx_kv_scale [B, N', Di/32]   packed e2m1 + UE8M0 per 32 dims
compressor states stay f32. It needs bf16 activations (the RoPE dims are stored bf16: exact only for bf16).
The model picks its code path from the cache it is given (`LayerCache.packed`).
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
from v4compile.model.kv_bytes import LAYOUTS, measured_per_token
from v4compile.quant.kv_layout import SCALE_BYTES, index_key_bytes, row_bytes

SLOT_ALIGN_ROWS = 16
"""Production-layout compressed caches have a multiple of this many rows: a slot of a uint8 tensor with rows of any
byte width then starts 16-byte aligned, as CUDA AOTInductor models require of their inputs (an input that does not
is copied, and the model's writes to it are lost: runtime/engine.py INPUT_ALIGN)."""
_SCORE_FIELDS = ("score_state", "idx_score_state")
_FIELDS = ("ring", "ring_scale", "kv", "kv_scale", "kv_state", "score_state", "idx_kv", "idx_kv_scale",
           "idx_kv_state", "idx_score_state")  # named_tensors order = the engines' cache input order


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
    ring_scale: Tensor | None = None  # production layout only: UE8M0 bytes of ring / kv / idx_kv rows
    kv_scale: Tensor | None = None
    idx_kv_scale: Tensor | None = None

    @property
    def packed(self) -> bool:
        """Production layout (uint8 data + scale tensors) rather than the reference's act-dtype rows."""
        return self.ring_scale is not None

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
    dtype: torch.dtype  # activation dtype of the model using it
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def layout(self) -> str:
        """"production" or "reference" (see module doc), read off the tensors."""
        return "production" if any(lc.packed for lc in self.layers) else "reference"

    @classmethod
    def allocate(cls, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str | None = None, layout: str = "reference") -> "Cache":
        """Zero caches (score states -inf) in `layout`; InputError for a bad size, layout or dtype."""
        check_layout(cfg, layout, dtype)
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

        packed = layout == "production"
        Di = cfg.index_head_dim
        kv_row, kv_scale = row_bytes(D, cfg.rope_head_dim)  # e4m3 nope | bf16 RoPE bytes, UE8M0 bytes
        idx_row, idx_scale = row_bytes(Di, index_key=True)  # packed e2m1, UE8M0 bytes
        row = kv_row if packed else D

        def rows(n: int, width: int = row) -> Tensor:
            return zeros(B, n, width, dt=torch.uint8 if packed else dtype)

        def blocks(m: int) -> int:
            """Rows of a compressed cache: max_len // m entries + the scratch row (the last), production layout
            padded to a multiple of SLOT_ALIGN_ROWS so that every sequence slot of its uint8 tensors starts
            16-byte aligned (runtime/engine.py INPUT_ALIGN); padding rows are never visible."""
            n = max_len // m + 1
            return -(-n // SLOT_ALIGN_ROWS) * SLOT_ALIGN_ROWS if packed else n

        layers = []
        for i in range(cfg.n_blocks):
            m = cfg.compress_ratios[i]
            lc = LayerCache(ratio=m, ring=rows(W))
            if packed:
                lc.ring_scale = rows(W, kv_scale)
            if m:
                c = 2 if m == 4 else 1
                lc.kv = rows(blocks(m))
                lc.kv_scale = rows(blocks(m), kv_scale) if packed else None
                lc.kv_state = zeros(B, c * m, c * D, dt=torch.float32)
                lc.score_state = neg_inf(B, c * m, c * D)
            if m == 4:
                lc.idx_kv = rows(blocks(4), idx_row if packed else Di)
                lc.idx_kv_scale = rows(blocks(4), idx_scale) if packed else None
                lc.idx_kv_state = zeros(B, 8, 2 * Di, dt=torch.float32)
                lc.idx_score_state = neg_inf(B, 8, 2 * Di)
            layers.append(lc)
        return cls(layers=layers, batch=B, max_len=max_len, dtype=dtype, device=dev)

    def named_tensors(self) -> dict[str, Tensor]:
        """Flat view 'blocks.{i}.{field}' -> tensor (what an engine passes as mutated inputs)."""
        return {f"blocks.{i}.{k}": t for i, lc in enumerate(self.layers) for k, t in lc.tensors().items()}

    def kv_bytes_per_token(self) -> float:
        """Measured KV bytes per token of this allocation (compressed entries and indexer keys; window rings and
        compressor states are fixed per sequence): model.kv_bytes.measured_per_token."""
        return measured_per_token(self.named_tensors().items(), [lc.ratio for lc in self.layers])

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


def check_layout(cfg: ModelConfig, layout: str, dtype: torch.dtype) -> None:
    """InputError unless `layout` is a known cache layout that `cfg` at activation dtype `dtype` can use."""
    if layout == "reference":
        return
    elif layout == "production":
        if dtype != torch.bfloat16:
            raise InputError(f"production KV layout with {dtype} activations: it stores the RoPE dims as bf16, "
                             "which is exact only for bfloat16 activations; use layout 'reference'")
        nope = cfg.head_dim - cfg.rope_head_dim
        if nope < 64 or nope % 64 or nope // 64 > SCALE_BYTES:
            raise InputError(f"production KV layout: head_dim {cfg.head_dim} - rope_head_dim {cfg.rope_head_dim} = "
                             f"{nope} nope dims; expected a multiple of 64, at most {64 * SCALE_BYTES}")
        try:
            index_key_bytes(cfg.index_head_dim)
        except ValueError as e:
            raise InputError(f"production KV layout: index_head_dim {cfg.index_head_dim}: {e}") from None
    else:
        raise InputError(f"KV cache layout {layout!r}; expected one of {', '.join(LAYOUTS)}")

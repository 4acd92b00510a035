"""Fused V4 ops produced by the graph passes (DESIGN.md section 5), declared with torch.library.

Each body is the composition of the primitive ops' reference bodies (v4compile.model.ops.BODIES) in the
order the reference model calls them, so a fused graph computes bit-identical values; kernels
(plugins/triton) implement the same schemas later. `v4::hc_pre` (hc_mix -> sinkhorn -> hc_collapse) is
declared by the model (model/ops.py) and reused. Importing this module registers the ops, which
`torch.export.load` of a fused graph needs.

The `_fp8` variants are the same layers over production-layout caches (model/cache.py, V4-SPEC 6.2): every
KV source is a uint8 data tensor [.., nope + 2R] plus a uint8 scale tensor [.., 8] (indexer keys: [.., Di/2]
+ [.., Di/32]); `kv` / `kv_scale` are this chunk's raw KV rows already encoded (the model encodes them once).

Legend: B batch, T tokens of the call, H heads, D head width, W window, N compressed capacity + 1 (the
last cache row is scratch), Hi / Di indexer heads / width, m compress ratio, c = 2 for CSA (ratio 4).
"""

from __future__ import annotations

import torch
from torch import Tensor

from v4compile.model import ops as v4ops  # noqa: F401 - registers torch.ops.v4.* primitives
from v4compile.model.ops import BODIES, positions_of, visible_block_indices, window_indices

FUSED_BODIES: dict[str, object] = {}
"""Op name (without namespace) -> plain-torch body of each fused op declared here."""

CSA_RATIO = 4  # CSA layers and every indexer compressor pool 4-token blocks (V4-SPEC section 4)

_CSA_MUTATES = ("ring", "kv_state", "score_state", "kv_cache", "idx_kv_state", "idx_score_state", "idx_cache")
_HCA_MUTATES = ("ring", "kv_state", "score_state", "kv_cache")
_CSA_FP8_MUTATES = ("ring", "ring_scale", "kv_state", "score_state", "kv_cache", "kv_cache_scale", "idx_kv_state",
                    "idx_score_state", "idx_cache", "idx_cache_scale")
_HCA_FP8_MUTATES = ("ring", "ring_scale", "kv_state", "score_state", "kv_cache", "kv_cache_scale")


def _fused(name: str, mutates_args: tuple[str, ...] = ()):
    def wrap(fn):
        FUSED_BODIES[name] = fn
        return torch.library.custom_op(f"v4::{name}", mutates_args=mutates_args)(fn)

    return wrap


def _attend_and_write_ring(q: Tensor, kv: Tensor, start_pos: Tensor, ring: Tensor, kv2: Tensor, idx2: Tensor,
                           sink: Tensor, scale: float) -> Tensor:
    """Window (ring + this chunk) plus picked compressed rows in one softmax, then the ring update."""
    idx = window_indices(start_pos, q.shape[1], ring.shape[1])
    o = BODIES["sparse_attention"](q, torch.cat((ring, kv), 1), idx, kv2, idx2, sink, scale)
    BODIES["ring_write"](ring, kv, start_pos)
    return o


@_fused("csa_attention", mutates_args=_CSA_MUTATES)
def csa_attention(q: Tensor, kv: Tensor, start_pos: Tensor, ring: Tensor, kv_proj: Tensor, gate_proj: Tensor,
                  ape: Tensor, norm_weight: Tensor, inv_freq: Tensor, kv_state: Tensor, score_state: Tensor,
                  kv_cache: Tensor, idx_q: Tensor, idx_weights: Tensor, idx_kv_proj: Tensor, idx_gate_proj: Tensor,
                  idx_ape: Tensor, idx_norm_weight: Tensor, idx_kv_state: Tensor, idx_score_state: Tensor,
                  idx_cache: Tensor, sink: Tensor, scale: float, norm_eps: float,
                  topk: int) -> tuple[Tensor, Tensor]:
    """One CSA layer's attention: q [B, T, H, D], kv [B, T, D] (this chunk's raw KV), start_pos [B] ->
    (o [B, T, H, D], picks int32 [B, T, topk], -1 = none); compresses the chunk (main + indexer compressors),
    scores and picks `topk` complete blocks, attends over window + picks + sink, writes the ring. The picks
    output is read only by trace programs (`v4compile validate`); production graphs leave it unused.

    == compress(kv) ; compress(idx, rotate) ; topk_select(indexer_scores(idx_q, idx_weights,
       idx_cache[:, :-1], positions, 4), topk) ; sparse_attention(q, cat(ring, kv), window, kv_cache, picks)
       ; ring_write(ring, kv).  Mutates ring, both compressors' states and caches.
    """
    BODIES["compress"](kv_proj, gate_proj, ape, norm_weight, inv_freq, start_pos, kv_state, score_state,
                       kv_cache, CSA_RATIO, norm_eps, False)
    BODIES["compress"](idx_kv_proj, idx_gate_proj, idx_ape, idx_norm_weight, inv_freq, start_pos, idx_kv_state,
                       idx_score_state, idx_cache, CSA_RATIO, norm_eps, True)
    positions = positions_of(start_pos, q.shape[1])
    n = idx_cache.shape[1] - 1  # the scratch row is never scored
    scores = BODIES["indexer_scores"](idx_q, idx_weights, idx_cache[:, :n], positions, CSA_RATIO)
    picks = BODIES["topk_select"](scores, topk)
    return _attend_and_write_ring(q, kv, start_pos, ring, kv_cache, picks, sink, scale), picks


@csa_attention.register_fake
def _(q, kv, start_pos, ring, kv_proj, gate_proj, ape, norm_weight, inv_freq, kv_state, score_state, kv_cache,
      idx_q, idx_weights, idx_kv_proj, idx_gate_proj, idx_ape, idx_norm_weight, idx_kv_state, idx_score_state,
      idx_cache, sink, scale, norm_eps, topk):
    return torch.empty_like(q), q.new_empty(*q.shape[:2], topk, dtype=torch.int32)


@_fused("hca_attention", mutates_args=_HCA_MUTATES)
def hca_attention(q: Tensor, kv: Tensor, start_pos: Tensor, ring: Tensor, kv_proj: Tensor, gate_proj: Tensor,
                  ape: Tensor, norm_weight: Tensor, inv_freq: Tensor, kv_state: Tensor, score_state: Tensor,
                  kv_cache: Tensor, sink: Tensor, scale: float, ratio: int, norm_eps: float) -> Tensor:
    """One HCA layer's attention: compresses the chunk (ratio m > 4), attends over window + EVERY complete
    compressed block + sink, writes the ring; q [B, T, H, D], kv [B, T, D] -> o [B, T, H, D].

    == compress(kv, m) ; sparse_attention(q, cat(ring, kv), window, kv_cache, visible_blocks(positions))
       ; ring_write(ring, kv).  Mutates ring, the compressor state and kv_cache.
    """
    BODIES["compress"](kv_proj, gate_proj, ape, norm_weight, inv_freq, start_pos, kv_state, score_state,
                       kv_cache, ratio, norm_eps, False)
    positions = positions_of(start_pos, q.shape[1])
    picks = visible_block_indices(positions, kv_cache.shape[1] - 1, ratio)
    return _attend_and_write_ring(q, kv, start_pos, ring, kv_cache, picks, sink, scale)


@hca_attention.register_fake
def _(q, kv, start_pos, ring, kv_proj, gate_proj, ape, norm_weight, inv_freq, kv_state, score_state, kv_cache,
      sink, scale, ratio, norm_eps):
    return torch.empty_like(q)


def _attend_fp8_and_write_ring(q: Tensor, kv: Tensor, kv_scale: Tensor, start_pos: Tensor, ring: Tensor,
                               ring_scale: Tensor, kv2: Tensor, kv2_scale: Tensor, idx2: Tensor, sink: Tensor,
                               scale: float) -> Tensor:
    """_attend_and_write_ring over production-layout rows: both ring tensors are written."""
    idx = window_indices(start_pos, q.shape[1], ring.shape[1])
    o = BODIES["sparse_attention_fp8"](q, torch.cat((ring, kv), 1), torch.cat((ring_scale, kv_scale), 1), idx, kv2,
                                       kv2_scale, idx2, sink, scale)
    BODIES["ring_write"](ring, kv, start_pos)
    BODIES["ring_write"](ring_scale, kv_scale, start_pos)
    return o


@_fused("csa_attention_fp8", mutates_args=_CSA_FP8_MUTATES)
def csa_attention_fp8(q: Tensor, kv: Tensor, kv_scale: Tensor, start_pos: Tensor, ring: Tensor, ring_scale: Tensor,
                      kv_proj: Tensor, gate_proj: Tensor, ape: Tensor, norm_weight: Tensor, inv_freq: Tensor,
                      kv_state: Tensor, score_state: Tensor, kv_cache: Tensor, kv_cache_scale: Tensor, idx_q: Tensor,
                      idx_weights: Tensor, idx_kv_proj: Tensor, idx_gate_proj: Tensor, idx_ape: Tensor,
                      idx_norm_weight: Tensor, idx_kv_state: Tensor, idx_score_state: Tensor, idx_cache: Tensor,
                      idx_cache_scale: Tensor, sink: Tensor, scale: float, norm_eps: float,
                      topk: int) -> tuple[Tensor, Tensor]:
    """v4::csa_attention over production-layout caches: kv / kv_scale uint8 [B, T, nope + 2R] / [B, T, 8] (this
    chunk's encoded raw KV), ring / ring_scale, kv_cache / kv_cache_scale and idx_cache / idx_cache_scale
    (packed FP4 keys) -> (o [B, T, H, D], picks int32 [B, T, topk]).

    == compress_packed(kv) ; compress_packed(idx, rotate) ; topk_select(indexer_scores_fp4(idx_q, idx_weights,
       idx_cache[:, :-1], idx_cache_scale[:, :-1], positions, 4), topk) ; sparse_attention_fp8(q, cat(ring, kv),
       cat(ring_scale, kv_scale), window, kv_cache, kv_cache_scale, picks) ; ring_write x 2.
    """
    BODIES["compress_packed"](kv_proj, gate_proj, ape, norm_weight, inv_freq, start_pos, kv_state, score_state,
                              kv_cache, kv_cache_scale, CSA_RATIO, norm_eps, False)
    BODIES["compress_packed"](idx_kv_proj, idx_gate_proj, idx_ape, idx_norm_weight, inv_freq, start_pos, idx_kv_state,
                              idx_score_state, idx_cache, idx_cache_scale, CSA_RATIO, norm_eps, True)
    positions = positions_of(start_pos, q.shape[1])
    n = idx_cache.shape[1] - 1  # the scratch row is never scored
    scores = BODIES["indexer_scores_fp4"](idx_q, idx_weights, idx_cache[:, :n], idx_cache_scale[:, :n], positions,
                                          CSA_RATIO)
    picks = BODIES["topk_select"](scores, topk)
    o = _attend_fp8_and_write_ring(q, kv, kv_scale, start_pos, ring, ring_scale, kv_cache, kv_cache_scale, picks,
                                   sink, scale)
    return o, picks


@csa_attention_fp8.register_fake
def _(q, kv, kv_scale, start_pos, ring, ring_scale, kv_proj, gate_proj, ape, norm_weight, inv_freq, kv_state,
      score_state, kv_cache, kv_cache_scale, idx_q, idx_weights, idx_kv_proj, idx_gate_proj, idx_ape, idx_norm_weight,
      idx_kv_state, idx_score_state, idx_cache, idx_cache_scale, sink, scale, norm_eps, topk):
    return torch.empty_like(q), q.new_empty(*q.shape[:2], topk, dtype=torch.int32)


@_fused("hca_attention_fp8", mutates_args=_HCA_FP8_MUTATES)
def hca_attention_fp8(q: Tensor, kv: Tensor, kv_scale: Tensor, start_pos: Tensor, ring: Tensor, ring_scale: Tensor,
                      kv_proj: Tensor, gate_proj: Tensor, ape: Tensor, norm_weight: Tensor, inv_freq: Tensor,
                      kv_state: Tensor, score_state: Tensor, kv_cache: Tensor, kv_cache_scale: Tensor, sink: Tensor,
                      scale: float, ratio: int, norm_eps: float) -> Tensor:
    """v4::hca_attention over production-layout caches (arguments as csa_attention_fp8's) -> o [B, T, H, D].

    == compress_packed(kv, m) ; sparse_attention_fp8(q, cat(ring, kv), cat(ring_scale, kv_scale), window,
       kv_cache, kv_cache_scale, visible_blocks(positions)) ; ring_write x 2.
    """
    BODIES["compress_packed"](kv_proj, gate_proj, ape, norm_weight, inv_freq, start_pos, kv_state, score_state,
                              kv_cache, kv_cache_scale, ratio, norm_eps, False)
    positions = positions_of(start_pos, q.shape[1])
    picks = visible_block_indices(positions, kv_cache.shape[1] - 1, ratio)
    return _attend_fp8_and_write_ring(q, kv, kv_scale, start_pos, ring, ring_scale, kv_cache, kv_cache_scale, picks,
                                      sink, scale)


@hca_attention_fp8.register_fake
def _(q, kv, kv_scale, start_pos, ring, ring_scale, kv_proj, gate_proj, ape, norm_weight, inv_freq, kv_state,
      score_state, kv_cache, kv_cache_scale, sink, scale, ratio, norm_eps):
    return torch.empty_like(q)


@_fused("rms_norm_fp8_linear")
def rms_norm_fp8_linear(x: Tensor, norm_weight: Tensor, eps: float, weight: Tensor, scale: Tensor) -> Tensor:
    """x [..., K] act -> [..., O] act == fp8_linear(rms_norm(x, norm_weight, eps), weight, scale): the norm
    feeds the FP8 activation quantisation directly (no act-dtype round trip through memory in a kernel)."""
    return BODIES["fp8_linear"](BODIES["rms_norm"](x, norm_weight, eps), weight, scale)


@rms_norm_fp8_linear.register_fake
def _(x, norm_weight, eps, weight, scale):
    return x.new_empty(*x.shape[:-1], weight.shape[0])

"""Fuse each HCA layer's attention into one v4::hca_attention node (prefill and decode graphs alike).

Absorbed: the compressor (ratio m > 4), the window indices, the visible-block picks (every complete block,
no indexer), sparse_attention and the ring write. q, the raw kv and the compressor projections stay.
Production-layout graphs fuse the same way into v4::hca_attention_fp8 (compress_packed, sparse_attention_fp8,
both ring writes); the chunk's encoded kv (data, scales) stays in the graph as the fused op's input.
"""

from __future__ import annotations

import logging

from torch import fx

from v4compile.graph.capture import Captured
from v4compile.graph.fused_ops import CSA_RATIO
from v4compile.graph.passes._attention import attention_parts, attention_pattern, carg, erase_moved, is_packed
from v4compile.graph.passes._common import derives_only_from, int_index_of_width, v4
from v4compile.graph.pattern import Any, Match, rewrite, rules
from v4compile.model.config import ModelConfig

log = logging.getLogger(__name__)

_PATTERN = attention_pattern(Any("picks"))
_PACKED_PATTERN = attention_pattern(Any("picks"), packed=True)


def _hca_attention(m: Match) -> dict[str, fx.Node] | None:
    picks = m["picks"]
    if not isinstance(picks, fx.Node):
        return None
    parts = attention_parts(m)
    if parts is None:
        return None
    ratio = carg(parts.compress, "ratio")
    # picks computed from start_pos (and sizes) alone, one per complete-able block: visible_block_indices
    if ratio <= CSA_RATIO or not derives_only_from(picks, {parts.start_pos}) \
            or not int_index_of_width(picks, m["kv_cache"].meta["val"].shape[1] - 1):
        return None
    eps = carg(parts.compress, "norm_eps")
    if is_packed(m):
        fused = m.call(v4.hca_attention_fp8.default, m["q"], m["kv"], m["kv_scale"], parts.start_pos, m["ring"],
                       m["ring_scale"], *parts.compress_args(), *parts.states(), m["kv_cache"], m["kv_cache_scale"],
                       m["sink"], m["scale"], ratio, eps)
    else:
        fused = m.call(v4.hca_attention.default, m["q"], m["kv"], parts.start_pos, m["ring"], *parts.compress_args(),
                       *parts.states(), m["kv_cache"], m["sink"], m["scale"], ratio, eps)
    erase_moved(m.graph, [parts.compress, *parts.ring_writes])
    return {"root": fused}


RULES = rules(
    "fuse_hca_attention",
    # compress(m > 4) ; sparse_attention(window, visible_blocks) ; ring_write == hca_attention
    (_PATTERN, _hca_attention),
    # compress_packed(m > 4) ; sparse_attention_fp8(window, visible_blocks) ; ring_write x 2 == hca_attention_fp8
    (_PACKED_PATTERN, _hca_attention),
)


def fuse_hca_attention(g: Captured, cfg: ModelConfig) -> Captured:
    """Rewrite each HCA layer's compressor + attention over all complete blocks + ring write into v4::hca_attention
    (v4::hca_attention_fp8 in production-layout graphs)."""
    n = rewrite(g.graph_module, RULES)
    log.info("fuse_hca_attention: %d hca_attention(_fp8) nodes", n)
    return g

"""Fuse each CSA layer's attention into one v4::csa_attention node (prefill and decode graphs alike).

Absorbed: the main compressor (ratio 4), the indexer's compressor (rotate), indexer_scores over the
indexer cache, topk_select, the window indices, sparse_attention and the ring write. The projections
feeding them (q, raw kv, compressor projections, indexer query and weights) stay in the graph.
The fused op also returns its picks: other readers of topk_select's output (the trace entry point's
indexer outputs) are rewired to that second output, so tracing does not cost the fusion.
Production-layout graphs (compress_packed, indexer_scores_fp4 over packed keys, sparse_attention_fp8, a ring
write per ring tensor) fuse the same way into v4::csa_attention_fp8.
"""

from __future__ import annotations

import logging
import operator

from torch import fx

from v4compile.graph.capture import Captured
from v4compile.graph.fused_ops import CSA_RATIO
from v4compile.graph.passes._attention import (PROJECTIONS, attention_parts, attention_pattern, carg,
                                               compressor_of, erase_moved, is_packed)
from v4compile.graph.passes._common import (aten, derives_only_from, mutated_args, order, same_value, strip_casts,
                                            v4, value_users)
from v4compile.graph.pattern import Any, Match, P, rewrite, rules
from v4compile.model.config import ModelConfig

log = logging.getLogger(__name__)

_INDEX_SLICE = P(aten.slice, Any("idx_cache"), 1, 0, Any("n_scored"), name="idx_slice", single_user=True)
_SCORES = P(v4.indexer_scores, Any("idx_q"), Any("idx_weights"), _INDEX_SLICE, Any("positions"), CSA_RATIO,
            name="scores", single_user=True)
_PATTERN = attention_pattern(P(v4.topk_select, _SCORES, Any("topk"), name="picks"))  # more readers: _csa_attention
_SCALE_SLICE = P(aten.slice, Any("idx_cache_scale"), 1, 0, Any("n_scored_scale"), name="idx_scale_slice",
                 single_user=True)
_PACKED_SCORES = P(v4.indexer_scores_fp4, Any("idx_q"), Any("idx_weights"), _INDEX_SLICE, _SCALE_SLICE,
                   Any("positions"), CSA_RATIO, name="scores", single_user=True)
_PACKED_PATTERN = attention_pattern(P(v4.topk_select, _PACKED_SCORES, Any("topk"), name="picks"), packed=True)


def _csa_attention(m: Match) -> dict[str, fx.Node] | None:
    parts = attention_parts(m)
    if parts is None:
        return None
    packed = is_packed(m)
    main, idx_cache = parts.compress, m["idx_cache"]
    idx_caches = [idx_cache, m["idx_cache_scale"]] if packed else [idx_cache]
    idx = compressor_of(*idx_caches)
    if idx is None or carg(main, "ratio") != CSA_RATIO or carg(idx, "ratio") != CSA_RATIO \
            or carg(main, "rotate") or not carg(idx, "rotate"):
        return None
    if not same_value(carg(idx, "inv_freq"), carg(main, "inv_freq")) \
            or carg(idx, "norm_eps") != carg(main, "norm_eps") \
            or strip_casts(carg(idx, "start_pos")) is not parts.start_pos:
        return None
    n = idx_cache.meta["val"].shape[1] - 1
    if m["n_scored"] != n or (packed and m["n_scored_scale"] != n) \
            or not derives_only_from(m["positions"], {parts.start_pos}):
        return None
    idx_states = [carg(idx, "kv_state"), carg(idx, "score_state")]
    slices = [m["idx_slice"], m["idx_scale_slice"]] if packed else [m["idx_slice"]]
    if not all(s.op == "placeholder" and value_users(s) == {idx} for s in idx_states) \
            or any(value_users(c) != {idx, sl} for c, sl in zip(idx_caches, slices)):
        return None
    early = _readers_to_move(m)
    if early is None:
        return None
    idx_inputs = [m["idx_q"], m["idx_weights"], *(carg(idx, a) for a in PROJECTIONS), *idx_states, *idx_caches]
    tail = (m["sink"], m["scale"], carg(main, "norm_eps"), m["topk"])
    if packed:
        fused = m.call(v4.csa_attention_fp8.default, m["q"], m["kv"], m["kv_scale"], parts.start_pos, m["ring"],
                       m["ring_scale"], *parts.compress_args(), *parts.states(), m["kv_cache"], m["kv_cache_scale"],
                       *idx_inputs, *tail)
    else:
        fused = m.call(v4.csa_attention.default, m["q"], m["kv"], parts.start_pos, m["ring"], *parts.compress_args(),
                       *parts.states(), m["kv_cache"], *idx_inputs, *tail)
    out = m.call(operator.getitem, fused, 0)
    replaced = {"root": out}
    if len(m["picks"].users) > 1:  # read outside the attention (trace outputs): give them the fused op's picks
        replaced["picks"] = picks = m.call(operator.getitem, fused, 1)
        for u in reversed(early):
            picks.append(u)  # now after the value it reads, still before its own readers
    erase_moved(m.graph, [main, idx, *parts.ring_writes])
    return replaced


def _readers_to_move(m: Match) -> list[fx.Node] | None:
    """Readers of the picks placed before the attention (the trace's clone): they move after the fused node,
    which is legal when they are pure and read only by nodes after the attention; None when one is not."""
    pos = order(m.graph)
    early = sorted((u for u in m["picks"].users if pos[u] < pos[m.root]), key=pos.__getitem__)
    for u in early:
        schema = getattr(u.target, "_schema", None)
        if u.op != "call_function" or mutated_args(u) or (schema is not None and schema.is_mutable) \
                or any(w.op != "output" and pos[w] < pos[m.root] for w in u.users):
            return None
    return early


RULES = rules(
    "fuse_csa_attention",
    # compress ; compress(indexer) ; sparse_attention(window, topk_select(indexer_scores)) ; ring_write
    #   == csa_attention
    (_PATTERN, _csa_attention),
    # the same over production-layout caches (compress_packed, indexer_scores_fp4, sparse_attention_fp8)
    #   == csa_attention_fp8
    (_PACKED_PATTERN, _csa_attention),
)


def fuse_csa_attention(g: Captured, cfg: ModelConfig) -> Captured:
    """Rewrite each CSA layer's compressors + indexer + top-k + attention + ring write into v4::csa_attention
    (v4::csa_attention_fp8 in production-layout graphs)."""
    n = rewrite(g.graph_module, RULES)
    log.info("fuse_csa_attention: %d csa_attention(_fp8) nodes", n)
    return g

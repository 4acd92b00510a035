"""Fuse each CSA layer's attention into one v4::csa_attention node (prefill and decode graphs alike).

Absorbed: the main compressor (ratio 4), the indexer's compressor (rotate), indexer_scores over the
indexer cache, topk_select, the window indices, sparse_attention and the ring write. The projections
feeding them (q, raw kv, compressor projections, indexer query and weights) stay in the graph.
The fused op also returns its picks: other readers of topk_select's output (the trace entry point's
indexer outputs) are rewired to that second output, so tracing does not cost the fusion.
"""

from __future__ import annotations

import logging
import operator

from torch import fx

from v4compile.graph.capture import Captured
from v4compile.graph.fused_ops import CSA_RATIO
from v4compile.graph.passes._attention import (C_CACHE, C_EPS, C_INV_FREQ, C_KV_STATE, C_NORM_W, C_RATIO,
                                               C_ROTATE, C_SCORE_STATE, C_START, attention_parts,
                                               attention_pattern, compressor_of, erase_moved)
from v4compile.graph.passes._common import (aten, derives_only_from, mutated_args, order, same_value, strip_casts,
                                            v4, value_users)
from v4compile.graph.pattern import Any, Match, P, rewrite, rules
from v4compile.model.config import ModelConfig

log = logging.getLogger(__name__)

_INDEX_SLICE = P(aten.slice, Any("idx_cache"), 1, 0, Any("n_scored"), name="idx_slice", single_user=True)
_SCORES = P(v4.indexer_scores, Any("idx_q"), Any("idx_weights"), _INDEX_SLICE, Any("positions"), CSA_RATIO,
            name="scores", single_user=True)
_PATTERN = attention_pattern(P(v4.topk_select, _SCORES, Any("topk"), name="picks"))  # more readers: _csa_attention


def _csa_attention(m: Match) -> dict[str, fx.Node] | None:
    parts = attention_parts(m)
    if parts is None:
        return None
    main, idx_cache = parts.compress, m["idx_cache"]
    idx = compressor_of(idx_cache)
    if idx is None or main.args[C_RATIO] != CSA_RATIO or idx.args[C_RATIO] != CSA_RATIO \
            or main.args[C_ROTATE] or not idx.args[C_ROTATE]:
        return None
    if not same_value(idx.args[C_INV_FREQ], main.args[C_INV_FREQ]) or idx.args[C_EPS] != main.args[C_EPS] \
            or strip_casts(idx.args[C_START]) is not parts.start_pos:
        return None
    if m["n_scored"] != idx_cache.meta["val"].shape[1] - 1 or not derives_only_from(m["positions"], {parts.start_pos}):
        return None
    idx_states = [idx.args[C_KV_STATE], idx.args[C_SCORE_STATE]]
    if not all(s.op == "placeholder" and value_users(s) == {idx} for s in idx_states) \
            or value_users(idx_cache) != {idx, m["idx_slice"]}:
        return None
    early = _readers_to_move(m)
    if early is None:
        return None
    fused = m.call(v4.csa_attention.default, m["q"], m["kv"], parts.start_pos, m["ring"], *parts.compress_args(),
                   *parts.states(), m["kv_cache"], m["idx_q"], m["idx_weights"], *idx.args[:C_NORM_W + 1],
                   *idx_states, idx.args[C_CACHE], m["sink"], m["scale"], main.args[C_EPS], m["topk"])
    out = m.call(operator.getitem, fused, 0)
    replaced = {"root": out}
    if len(m["picks"].users) > 1:  # read outside the attention (trace outputs): give them the fused op's picks
        replaced["picks"] = picks = m.call(operator.getitem, fused, 1)
        for u in reversed(early):
            picks.append(u)  # now after the value it reads, still before its own readers
    erase_moved(m.graph, [main, idx, parts.ring_write])
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
)


def fuse_csa_attention(g: Captured, cfg: ModelConfig) -> Captured:
    """Rewrite each CSA layer's compressors + indexer + top-k + attention + ring write into v4::csa_attention."""
    n = rewrite(g.graph_module, RULES)
    log.info("fuse_csa_attention: %d csa_attention nodes", n)
    return g

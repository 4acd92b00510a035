"""What fuse_csa_attention and fuse_hca_attention share: the window + compressed attention skeleton.

Both start at `sparse_attention(q, cat([ring, kv], 1), window_idx, kv_cache, picks, sink, scale)` and collect
the nodes around it that a fused op absorbs: the layer's `compress` writing `kv_cache` (before the
attention) and the `ring_write(ring, kv, start_pos)` after it. The fused node is inserted at the attention,
which moves those cache writes; that is only legal when nothing else reads or writes the caches involved,
which `attention_parts` checks (it returns None otherwise, leaving the graph untouched).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from v4compile.graph.passes._common import (aten, derives_only_from, int_index_of_width, only_user, order,
                                            same_value, strip_casts, v4, value_users)
from v4compile.graph.pattern import Any, Match, P

# compress(kv_proj, gate_proj, ape, norm_weight, inv_freq, start_pos, kv_state, score_state, cache, ratio,
#          norm_eps, rotate): argument positions
C_KV_PROJ, C_GATE, C_APE, C_NORM_W, C_INV_FREQ, C_START, C_KV_STATE, C_SCORE_STATE, C_CACHE, C_RATIO, \
    C_EPS, C_ROTATE = range(12)


def attention_pattern(picks) -> P:
    """sparse_attention over cat([ring, kv]) (window) and a compressed cache with `picks` (a sub-pattern)."""
    return P(v4.sparse_attention, Any("q"), P(aten.cat, [Any("ring"), Any("kv")], name="cat"), Any("window"),
             Any("kv_cache"), picks, Any("sink"), Any("scale"))


@dataclass
class AttentionParts:
    start_pos: fx.Node  # the start_pos placeholder
    compress: fx.Node  # the main compressor writing kv_cache
    ring_write: fx.Node

    def compress_args(self) -> list:
        """kv_proj, gate_proj, ape, norm_weight, inv_freq of the main compressor."""
        return list(self.compress.args[C_KV_PROJ:C_INV_FREQ + 1])

    def states(self) -> list[fx.Node]:
        return [self.compress.args[C_KV_STATE], self.compress.args[C_SCORE_STATE]]


def compressor_of(cache: fx.Node) -> fx.Node | None:
    """The single compress node writing `cache` (a placeholder), or None."""
    if cache.op != "placeholder":
        return None
    node = only_user(cache, v4.compress.default)
    return node if node is not None and node.args[C_CACHE] is cache else None


def attention_parts(m: Match) -> AttentionParts | None:
    """The compress / ring_write around a matched attention, or None when a fusion would not be exact."""
    cat, ring, kv_cache = m["cat"], m["ring"], m["kv_cache"]
    cat_dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if ring.op != "placeholder" or cat_dim not in (1, -2):
        return None
    comp = compressor_of(kv_cache)
    if comp is None:
        return None
    sp = strip_casts(comp.args[C_START])
    window = m["window"]  # window_indices(start_pos, T, W): from start_pos and sizes alone, W per query
    if sp.op != "placeholder" or not derives_only_from(window, {sp}) \
            or not int_index_of_width(window, ring.meta["val"].shape[1]):
        return None
    rw = only_user(ring, v4.ring_write.default)
    if rw is None or rw.args[0] is not ring or not same_value(rw.args[1], m["kv"]) \
            or not same_value(rw.args[2], sp):
        return None
    pos = order(m.graph)
    if not pos[comp] < pos[m.root] < pos[rw]:
        return None
    parts = AttentionParts(sp, comp, rw)
    if not all(s.op == "placeholder" and value_users(s) == {comp} for s in parts.states()):
        return None
    if value_users(ring) != {cat, rw} or not value_users(kv_cache) <= {comp, m.root}:
        return None
    return parts


def erase_moved(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    """Erase the cache-writing nodes the fused op now performs (they have no users)."""
    for n in nodes:
        assert not n.users, f"{n.name} still has users"
        graph.erase_node(n)

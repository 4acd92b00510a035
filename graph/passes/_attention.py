"""What fuse_csa_attention and fuse_hca_attention share: the window + compressed attention skeleton.

Both start at `sparse_attention(q, cat([ring, kv], 1), window_idx, kv_cache, picks, sink, scale)` and collect
the nodes around it that a fused op absorbs: the layer's `compress` writing `kv_cache` (before the
attention) and the `ring_write(ring, kv, start_pos)` after it. The fused node is inserted at the attention,
which moves those cache writes; that is only legal when nothing else reads or writes the caches involved,
which `attention_parts` checks (it returns None otherwise, leaving the graph untouched).

Production-layout graphs (model/cache.py) spell the same skeleton with a data and a scale tensor per KV
source: `sparse_attention_fp8(q, cat([ring, kv]), cat([ring_scale, kv_scale]), window_idx, kv_cache,
kv_cache_scale, picks, sink, scale)`, `compress_packed(..., cache, cache_scale, ...)` and one ring_write per
ring tensor. The patterns capture the scale tensors under the same names with a `_scale` suffix.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from v4compile.graph.passes._common import (aten, derives_only_from, int_index_of_width, only_user, order,
                                            same_value, strip_casts, v4, value_users)
from v4compile.graph.pattern import Any, Match, P


def attention_pattern(picks, packed: bool = False) -> P:
    """sparse_attention over cat([ring, kv]) (window) and a compressed cache with `picks` (a sub-pattern);
    packed: its production-layout form, sparse_attention_fp8 with the scale tensors beside the data."""
    window = P(aten.cat, [Any("ring"), Any("kv")], name="cat")
    if not packed:
        return P(v4.sparse_attention, Any("q"), window, Any("window"), Any("kv_cache"), picks, Any("sink"),
                 Any("scale"))
    scales = P(aten.cat, [Any("ring_scale"), Any("kv_scale")], name="cat_scale")
    return P(v4.sparse_attention_fp8, Any("q"), window, scales, Any("window"), Any("kv_cache"), Any("kv_cache_scale"),
             picks, Any("sink"), Any("scale"))


def is_packed(m: Match) -> bool:
    """Whether a match of attention_pattern is the production-layout form."""
    return "cat_scale" in m


def carg(node: fx.Node, name: str):
    """Argument `name` of a compress / compress_packed node, by schema name (the variants differ in position)."""
    for i, a in enumerate(node.target._schema.arguments):
        if a.name == name:
            return node.args[i] if i < len(node.args) else node.kwargs.get(name, a.default_value)
    raise KeyError(f"{node.target} has no argument {name!r}")


PROJECTIONS = ("kv_proj", "gate_proj", "ape", "norm_weight")  # a compressor's own inputs, in schema order


@dataclass
class AttentionParts:
    start_pos: fx.Node  # the start_pos placeholder
    compress: fx.Node  # the main compressor writing kv_cache (and kv_cache_scale)
    ring_writes: list[fx.Node]  # one per ring tensor (ring; and ring_scale when packed)

    def compress_args(self) -> list:
        """kv_proj, gate_proj, ape, norm_weight, inv_freq of the main compressor."""
        return [carg(self.compress, n) for n in (*PROJECTIONS, "inv_freq")]

    def states(self) -> list[fx.Node]:
        return [carg(self.compress, "kv_state"), carg(self.compress, "score_state")]


def compressor_of(cache: fx.Node, cache_scale: fx.Node | None = None) -> fx.Node | None:
    """The single compress node writing `cache` (a placeholder), or with `cache_scale` the single compress_packed
    node writing both; None otherwise."""
    if cache.op != "placeholder" or (cache_scale is not None and cache_scale.op != "placeholder"):
        return None
    node = only_user(cache, v4.compress.default if cache_scale is None else v4.compress_packed.default)
    if node is None or carg(node, "cache") is not cache:
        return None
    return node if cache_scale is None or carg(node, "cache_scale") is cache_scale else None


def _ring_write(m: Match, ring: fx.Node, kv, cat: fx.Node, sp: fx.Node) -> fx.Node | None:
    """The ring_write(ring, kv, start_pos) after the attention, when `ring` is read by nothing else."""
    cat_dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if ring.op != "placeholder" or cat_dim not in (1, -2):
        return None
    rw = only_user(ring, v4.ring_write.default)
    if rw is None or rw.args[0] is not ring or not same_value(rw.args[1], kv) or not same_value(rw.args[2], sp):
        return None
    if value_users(ring) != {cat, rw} or not order(m.graph)[m.root] < order(m.graph)[rw]:
        return None
    return rw


def attention_parts(m: Match) -> AttentionParts | None:
    """The compress / ring_write(s) around a matched attention, or None when a fusion would not be exact."""
    packed = is_packed(m)
    ring, kv_cache = m["ring"], m["kv_cache"]
    caches = [kv_cache, m["kv_cache_scale"]] if packed else [kv_cache]
    comp = compressor_of(*caches)
    if comp is None:
        return None
    sp = strip_casts(carg(comp, "start_pos"))
    window = m["window"]  # window_indices(start_pos, T, W): from start_pos and sizes alone, W per query
    if sp.op != "placeholder" or not derives_only_from(window, {sp}) \
            or not int_index_of_width(window, ring.meta["val"].shape[1]):
        return None
    rings = [(ring, m["kv"], m["cat"])] + ([(m["ring_scale"], m["kv_scale"], m["cat_scale"])] if packed else [])
    writes = [_ring_write(m, *r, sp) for r in rings]
    if any(w is None for w in writes) or not order(m.graph)[comp] < order(m.graph)[m.root]:
        return None
    parts = AttentionParts(sp, comp, writes)
    if not all(s.op == "placeholder" and value_users(s) == {comp} for s in parts.states()):
        return None
    if not all(value_users(c) <= {comp, m.root} for c in caches):
        return None
    return parts


def erase_moved(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    """Erase the cache-writing nodes the fused op now performs (they have no users)."""
    for n in nodes:
        assert not n.users, f"{n.name} still has users"
        graph.erase_node(n)

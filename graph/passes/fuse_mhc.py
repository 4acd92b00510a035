"""Fuse the mHC pre map: hc_mix -> sinkhorn -> hc_collapse becomes one v4::hc_pre node per sublayer.

The post map (v4::hc_post) is already a single primitive op in the captured graph, so nothing to fuse there.
"""

from __future__ import annotations

import logging
import operator

from torch import fx

from v4compile.graph.capture import Captured
from v4compile.graph.passes._common import getitem_user, only_user, order, v4
from v4compile.graph.pattern import Any, Match, P, rewrite, rules
from v4compile.model.config import ModelConfig

log = logging.getLogger(__name__)

_MIX = P(v4.hc_mix, Any("x"), Any("fn"), Any("scale"), Any("base"), Any("norm_eps"), Any("hc_eps"), name="mix")
_PATTERN = P(v4.hc_collapse, Any("x"), P(operator.getitem, _MIX, 0, name="pre", single_user=True))


def _hc_pre(m: Match) -> dict[str, fx.Node] | None:
    mix = m["mix"]
    posts, logits = getitem_user(mix, 1), getitem_user(mix, 2)
    if len(posts) > 1 or len(logits) != 1 or len(mix.users) != 1 + len(posts) + 1:
        return None
    sink = only_user(logits[0], v4.sinkhorn.default)
    if sink is None or len(logits[0].users) != 1 or sink.args[2] != m["hc_eps"]:
        return None
    pos = order(m.graph)
    moved = [sink, *posts]  # their values are produced at the root now: every consumer must come later
    if any(pos[u] <= pos[m.root] for n in moved for u in n.users):
        return None
    fused = m.call(v4.hc_pre.default, m["x"], m["fn"], m["scale"], m["base"], m["norm_eps"], m["hc_eps"],
                   sink.args[1])
    u, post, comb = (m.call(operator.getitem, fused, i) for i in range(3))
    sink.replace_all_uses_with(comb)
    m.graph.erase_node(sink)
    m.graph.erase_node(logits[0])
    for p in posts:
        p.replace_all_uses_with(post)
        m.graph.erase_node(p)
    return {"root": u}


RULES = rules(
    "fuse_mhc",
    (_PATTERN, _hc_pre),  # hc_collapse(x, hc_mix(x)[0]), hc_mix(x)[1], sinkhorn(hc_mix(x)[2]) == hc_pre(x)
)


def fuse_mhc(g: Captured, cfg: ModelConfig) -> Captured:
    """Rewrite every hc_mix -> sinkhorn -> hc_collapse chain into one v4::hc_pre node."""
    n = rewrite(g.graph_module, RULES)
    log.info("fuse_mhc: %d hc_pre nodes", n)
    return g

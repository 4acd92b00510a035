"""Erase nodes whose values nobody uses (leftovers of fusions: window index math, casts, views).

A node with side effects (a schema that writes an argument) always stays. Metadata assertions
(aten._assert_tensor_metadata) that torch.export emits around casts go with the value they check when
nothing else uses that value.
"""

from __future__ import annotations

import logging

import torch
from torch import fx

from v4compile.graph.capture import Captured
from v4compile.graph.passes._common import mutated_args
from v4compile.model.config import ModelConfig

log = logging.getLogger(__name__)

_ASSERTS = (torch.ops.aten._assert_tensor_metadata.default,)


def _is_assert(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in _ASSERTS


def _dead(n: fx.Node) -> bool:
    if n.op != "call_function" or _is_assert(n) or mutated_args(n):
        return False
    schema = getattr(n.target, "_schema", None)
    if schema is not None and schema.is_mutable:
        return False
    return all(_is_assert(u) for u in n.users)


def remove_dead_code(g: Captured, cfg: ModelConfig) -> Captured:
    """Erase unused pure nodes (and the metadata assertions on them) until none is left."""
    graph, erased = g.graph_module.graph, 0
    changed = True
    while changed:
        changed = False
        for n in reversed(list(graph.nodes)):
            if _dead(n):
                for a in list(n.users):
                    graph.erase_node(a)
                    erased += 1
                graph.erase_node(n)
                erased += 1
                changed = True
    graph.lint()
    g.graph_module.recompile()
    log.info("remove_dead_code: %d nodes erased", erased)
    return g

"""Constant folding on an unlifted graph module: subgraphs that depend only on parameters / buffers are
evaluated once at build time and stored as float buffers.

Why here: weight preprocessing in the model (FP8 weight dequantisation of the compressor projections,
`Linear.dense`) would otherwise run on every call, and Inductor cannot compile float8_e8m0fnu scale tensors
(KeyError in codegen, torch 2.13): after folding no e8m0 tensor is left in the graph. Values are computed by
the same aten ops eagerly, so results are bit-identical.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import fx

log = logging.getLogger(__name__)

_MAX_FOLD_NUMEL = 1 << 26  # do not materialise broadcasts bigger than this


def _fetch(gm: fx.GraphModule, target: str):
    return functools.reduce(getattr, target.split("."), gm)


def fold_constants(gm: fx.GraphModule) -> int:
    """Replace every pure call whose inputs are all constants by a buffer; drop parameters left unused.
    Returns the number of buffers created."""
    values: dict[fx.Node, object] = {}
    checked: list[fx.Node] = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            values[node] = _fetch(gm, node.target)
        elif node.op == "call_function" and _foldable(node, values):
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: values[n])
            out = node.target(*args, **kwargs)
            if isinstance(out, torch.Tensor) and out.numel() <= _MAX_FOLD_NUMEL:
                values[node] = out
            elif node.target is torch.ops.aten._assert_tensor_metadata.default:
                checked.append(node)  # it just passed on the constant; keeping it would keep the raw weight alive
    for node in checked:
        gm.graph.erase_node(node)
    n = 0
    for node, value in values.items():
        if node.op == "get_attr" or not isinstance(value, torch.Tensor):
            continue
        if any(u not in values for u in node.users):  # a boundary: a runtime node consumes this constant
            name = f"_v4_const_{n}"
            gm.register_buffer(name, value.detach().clone().contiguous())
            with gm.graph.inserting_before(node):
                attr = gm.graph.get_attr(name)
            node.replace_all_uses_with(attr)
            n += 1
    gm.graph.eliminate_dead_code()
    _drop_unused_attrs(gm)
    gm.recompile()
    log.info("folded %d constant subgraphs", n)
    return n


def _foldable(node: fx.Node, values: dict) -> bool:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        if target.namespace == "v4" or target._schema.is_mutable or torch.Tag.nondeterministic_seeded in target.tags:
            return False
    elif target not in (getattr,) and not callable(target):
        return False
    inputs = node.all_input_nodes
    return bool(inputs) and all(i in values for i in inputs)


def _drop_unused_attrs(gm: fx.GraphModule) -> None:
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [k for k, _ in gm.named_parameters()] + [k for k, _ in gm.named_buffers()]:
        if name not in used:
            owner_path, _, leaf = name.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            delattr(owner, leaf)

"""Graph queries shared by the passes: cast stripping, provenance, mutation and ordering checks."""

from __future__ import annotations

import operator
from collections import Counter

import torch
from torch import fx

aten = torch.ops.aten
v4 = torch.ops.v4

_NOOP_CASTS = (aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default, aten.alias.default)


def _val(n: fx.Node):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def strip_casts(n):
    """The node behind a chain of value-preserving casts (`.to(same dtype/device)`, alias) of `n`."""
    while isinstance(n, fx.Node) and n.op == "call_function" and n.target in _NOOP_CASTS and n.args:
        src = n.args[0]
        a, b = _val(src), _val(n)
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dtype != b.dtype \
                or a.device != b.device:
            break
        n = src
    return n


def same_value(a, b) -> bool:
    """Whether two arguments are the same graph value up to no-op casts (or equal constants)."""
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return strip_casts(a) is strip_casts(b)
    return a == b


def derives_only_from(n: fx.Node, allowed: set[fx.Node]) -> bool:
    """True when every placeholder feeding `n` lies in `allowed`; sizes (sym_size) of any input are fine."""
    seen, work = set(), [n]
    while work:
        cur = work.pop()
        if cur in seen:
            continue
        seen.add(cur)
        if cur.op == "placeholder":
            if cur not in allowed:
                return False
        elif cur.op == "call_function":
            if cur.target is aten.sym_size.int:
                continue
            work.extend(cur.all_input_nodes)
        elif cur.op != "get_attr":
            return False
    return True


def int_index_of_width(n: fx.Node, width) -> bool:
    """`n` is an int32 index tensor whose last dim is `width` (the shape window / block picks have)."""
    v = _val(n)
    return isinstance(v, torch.Tensor) and v.dtype == torch.int32 and v.dim() == 3 and v.shape[-1] == width


def placeholder(gm: fx.GraphModule, name: str) -> fx.Node | None:
    return next((n for n in gm.graph.nodes if n.op == "placeholder" and n.name == name), None)


def user_input(gm: fx.GraphModule, sig, index: int) -> fx.Node:
    """The placeholder of the index-th user input of an ExportedProgram graph signature."""
    name = sig.user_inputs[index]
    node = placeholder(gm, name)
    assert node is not None, f"user input {name} has no placeholder"
    return node


def value_users(n: fx.Node) -> set[fx.Node]:
    """Users that read `n`'s values (a sym_size only reads its shape, which no in-place write changes)."""
    return {u for u in n.users if u.target is not aten.sym_size.int}


def only_user(n: fx.Node, target) -> fx.Node | None:
    """The single user of `n` whose target is `target`, or None when there is not exactly one."""
    hits = [u for u in n.users if u.op == "call_function" and u.target == target]
    return hits[0] if len(hits) == 1 else None


def getitem_user(n: fx.Node, index: int) -> list[fx.Node]:
    return [u for u in n.users if u.target is operator.getitem and u.args[1] == index]


def order(graph: fx.Graph) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(graph.nodes)}


def mutated_args(n: fx.Node) -> list[fx.Node]:
    """Arguments that `n`'s schema writes in place (alias_info.is_write)."""
    schema = getattr(n.target, "_schema", None)
    if n.op != "call_function" or schema is None:
        return []
    out = []
    for i, a in enumerate(schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            v = n.args[i] if i < len(n.args) else n.kwargs.get(a.name)
            if isinstance(v, fx.Node):
                out.append(v)
    return out


def op_name(target) -> str:
    """'v4.csa_attention', 'aten.add', 'getitem' ... (overload dropped)."""
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}"
    return getattr(target, "__name__", str(target))


def op_counts(gm: fx.GraphModule) -> Counter:
    return Counter(op_name(n.target) for n in gm.graph.nodes if n.op == "call_function")

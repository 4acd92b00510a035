"""The rewrite layer: named captures, rules returning None leave the graph untouched, step limit."""

import operator

import pytest
import torch
from torch import fx

from v4compile.graph.pattern import Any, Match, P, RewriteError, rewrite, rules

aten = torch.ops.aten


class AddMul(torch.nn.Module):
    def forward(self, x, y, z):
        a = torch.ops.aten.add.Tensor(x, y)
        b = torch.ops.aten.mul.Tensor(a, z)
        return torch.ops.aten.relu.default(b), torch.ops.aten.neg.default(a)


def _export(mod, *args):
    return torch.export.export(mod, args).graph_module


def _ops(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def fuse_add_mul(m: Match):
    """(x + y) * z == x*z + y*z (a distributive rewrite, enough to exercise the driver)."""
    xz = m.call(aten.mul.Tensor, m["x"], m["z"])
    yz = m.call(aten.mul.Tensor, m["y"], m["z"])
    return {"root": m.call(aten.add.Tensor, xz, yz)}


def never(m: Match):
    return None


def test_rule_rewrites_and_keeps_semantics():
    x, y, z = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    gm = _export(AddMul(), x, y, z)
    ref = gm(x, y, z)
    pat = P(aten.mul, P(aten.add, Any("x"), Any("y"), name="sum"), Any("z"))
    n = rewrite(gm, rules("distribute", (pat, fuse_add_mul)))
    assert n == 1
    out = gm(x, y, z)
    torch.testing.assert_close(out[0], ref[0])
    torch.testing.assert_close(out[1], ref[1])
    # the add is still used by neg, so it survives; the original mul is gone
    assert _ops(gm).count(aten.mul.Tensor) == 2 and aten.add.Tensor in _ops(gm)
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "call_function"]
    assert all(v is not None and tuple(v.shape) == (3, 4) for v in vals)


def test_single_user_blocks_fusion_when_intermediate_escapes():
    gm = _export(AddMul(), torch.randn(2), torch.randn(2), torch.randn(2))
    pat = P(aten.mul, P(aten.add, Any("x"), Any("y"), single_user=True), Any("z"))
    assert rewrite(gm, rules("distribute", (pat, fuse_add_mul))) == 0


def test_rule_returning_none_leaves_graph_untouched():
    gm = _export(AddMul(), torch.randn(2), torch.randn(2), torch.randn(2))
    before = str(gm.graph)
    pat = P(aten.mul, P(aten.add, Any(), Any()), Any())
    assert rewrite(gm, rules("noop", (pat, never))) == 0
    assert str(gm.graph) == before


def test_no_match_leaves_graph_untouched():
    gm = _export(AddMul(), torch.randn(2), torch.randn(2), torch.randn(2))
    before = str(gm.graph)
    assert rewrite(gm, rules("none", (P(aten.sub, Any(), Any()), fuse_add_mul))) == 0
    assert str(gm.graph) == before


def flip(m: Match):
    """neg(x) -> neg(neg(neg(x))): never reaches a fixed point."""
    a = m.call(aten.neg.default, m["x"])
    b = m.call(aten.neg.default, a)
    return {"root": m.call(aten.neg.default, b)}


def test_step_limit_names_rule_set():
    gm = _export(AddMul(), torch.randn(2), torch.randn(2), torch.randn(2))
    with pytest.raises(RewriteError, match="'explode'"):
        rewrite(gm, rules("explode", (P(aten.neg, Any("x")), flip)), max_steps=20)


def test_rule_sets_compose_with_plus_and_same_name_binds_same_node():
    a = rules("a", (P(aten.sub, Any(), Any()), never))
    b = rules("b", (P(aten.neg, Any()), never))
    assert (a + b).name == "a+b" and len((a + b).rules) == 2

    class Sq(torch.nn.Module):
        def forward(self, x, y):
            return torch.ops.aten.mul.Tensor(x, x), torch.ops.aten.mul.Tensor(x, y)

    gm = _export(Sq(), torch.randn(2), torch.randn(2))
    seen = []

    def record(m: Match):
        seen.append(m.root)
        return None

    rewrite(gm, rules("square", (P(aten.mul, Any("v"), Any("v")), record)))
    assert len(seen) == 1  # only x*x binds "v" twice to the same node


def test_getitem_patterns():
    class MinMax(torch.nn.Module):
        def forward(self, x):
            r = torch.ops.aten.max.dim(x, 0)
            return r[0] + 1

    gm = _export(MinMax(), torch.randn(3, 4))
    hits = []

    def rec(m: Match):
        hits.append(m["src"])
        return None

    rewrite(gm, rules("g", (P(operator.getitem, P(aten.max, Any("src")), 0), rec)))
    assert len(hits) == 1


def test_list_arguments_match_element_by_element():
    class Cat(torch.nn.Module):
        def forward(self, x, y):
            return torch.ops.aten.cat.default([x, y], 1), torch.ops.aten.cat.default([x, x, y], 1)

    gm = _export(Cat(), torch.randn(2, 3), torch.randn(2, 3))
    hits = []

    def rec(m: Match):
        hits.append((m["a"].name, m["b"].name))
        return None

    rewrite(gm, rules("pairs", (P(aten.cat, [Any("a"), Any("b")]), rec)))
    assert hits == [("x", "y")]  # the three-tensor cat has a list of another length

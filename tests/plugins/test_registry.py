"""Kernel registry: priority order, capability predicates, one error listing every unsupported node."""

import pytest
import torch

from v4compile.errors import UnsupportedOpError
from v4compile.plugins import registry as reg

OP = "v4test::scale"


@pytest.fixture
def clean():
    yield
    for e in reg.registered(OP):
        reg.unregister_kernel(e.op, e.target, e.name)


def test_priority_then_predicate(clean):
    reg.register_kernel(OP, "h200", priority=1, name="generic")(lambda x: x)
    reg.register_kernel(OP, "h200", supports=lambda x: x.dtype == torch.bfloat16, priority=5,
                        name="bf16_only")(lambda x: x * 2)
    bf = torch.ones(2, dtype=torch.bfloat16)
    assert reg.lookup(OP, "h200", bf).name == "bf16_only"
    assert reg.lookup(OP, "h200", bf.float()).name == "generic"  # fast path declines, fallback accepts
    assert reg.lookup(OP, "h100", bf) is None  # registered for h200 only


def test_equal_priorities_keep_registration_order_and_reregistering_replaces(clean):
    reg.register_kernel(OP, ("h100", "h200"), name="a")(lambda x: 1)
    reg.register_kernel(OP, ("h100", "h200"), name="b")(lambda x: 2)
    assert [e.name for e in reg.registered(OP, "h100")] == ["a", "b"]
    reg.register_kernel(OP, "h100", priority=3, name="a")(lambda x: 3)
    assert [e.name for e in reg.registered(OP, "h100")] == ["a", "b"]
    assert reg.lookup(OP, "h100", None).fn(None) == 3


def test_strict_selection_lists_every_unsupported_node(clean):
    reg.register_kernel(OP, "h200", supports=lambda x: x.shape[0] <= 4, name="small")(lambda x: x)
    calls = [("n0", OP, (torch.ones(2),), {}), ("n1", OP, (torch.ones(9),), {}),
             ("n2", "v4test::missing", (), {})]
    with pytest.raises(UnsupportedOpError) as ei:
        reg.select_kernels(calls, "h200")
    msg = str(ei.value)
    assert "2 node(s)" in msg and "n1 (v4test::scale)" in msg and "n2 (v4test::missing): no kernel registered" in msg
    assert ei.value.exit_code == 3
    chosen = reg.select_kernels(calls, "h200", strict=False)
    assert chosen["n0"].name == "small" and chosen["n1"] is None and chosen["n2"] is None


def test_bad_registrations_are_rejected():
    with pytest.raises(ValueError, match="namespace::name"):
        reg.register_kernel("scale", "h200")
    with pytest.raises(ValueError, match="no target"):
        reg.register_kernel(OP, [])


def test_node_call_reads_fx_metadata(clean):
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(lambda x: torch.ops.aten.relu.default(x) + 1)(torch.randn(3))
    node = next(n for n in gm.graph.nodes if n.op == "call_function" and "relu" in str(n.target))
    name, op, args, kwargs = reg.node_call(node)
    assert op == "aten::relu" and args[0].shape == (3,)
    reg.register_kernel("aten::relu", "h200", supports=lambda x: x.shape == (3,), name="relu3")(torch.relu)
    try:
        assert reg.select_kernels([reg.node_call(node)], "h200")[name].name == "relu3"
    finally:
        reg.unregister_kernel("aten::relu", "h200", "relu3")

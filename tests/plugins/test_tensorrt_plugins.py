"""The TensorRT plugin description layer (plugins/tensorrt/specs.py, trt_plugins.plugin_signature) against the ops'
fake implementations, and the plugin registration itself where TensorRT exists (skipped with the reason here)."""

import pytest
import torch

from v4compile.errors import UnsupportedOpError
from v4compile.graph import fused_ops  # noqa: F401 - registers v4::csa_attention / hca_attention
from v4compile.plugins.tensorrt.specs import SPECS, get_spec
from v4compile.plugins.tensorrt.trt_plugins import plugin_signature


def _csa_inputs(B, T, H=3, D=16, W=8, N=7, Hi=2, Di=8, R=4, topk=3, act=torch.float32):
    f, m = torch.float32, 4  # CSA: ratio 4, c = 2
    z = torch.zeros
    return [z(B, T, H, D, dtype=act), z(B, T, D, dtype=act), z(B, dtype=torch.int64), z(B, W, D, dtype=act),
            z(B, T, 2 * D, dtype=f), z(B, T, 2 * D, dtype=f), z(m, 2 * D, dtype=f), z(D, dtype=act), z(R // 2, dtype=f),
            z(B, 2 * m, 2 * D, dtype=f), z(B, 2 * m, 2 * D, dtype=f), z(B, N, D, dtype=act),
            z(B, T, Hi, Di, dtype=act), z(B, T, Hi, dtype=act), z(B, T, 2 * Di, dtype=f), z(B, T, 2 * Di, dtype=f),
            z(m, 2 * Di, dtype=f), z(Di, dtype=act), z(B, 2 * m, 2 * Di, dtype=f), z(B, 2 * m, 2 * Di, dtype=f),
            z(B, N, Di, dtype=act), z(H, dtype=f)], (0.25, 1e-6, topk)


def _hca_inputs(B, T, H=2, D=16, W=8, N=5, R=4, m=16, act=torch.float32):
    f, z = torch.float32, torch.zeros
    return [z(B, T, H, D, dtype=act), z(B, T, D, dtype=act), z(B, dtype=torch.int64), z(B, W, D, dtype=act),
            z(B, T, D, dtype=f), z(B, T, D, dtype=f), z(m, D, dtype=f), z(D, dtype=act), z(R // 2, dtype=f),
            z(B, m, D, dtype=f), z(B, m, D, dtype=f), z(B, N, D, dtype=act), z(H, dtype=f)], (0.25, m, 1e-6)


def _fake_outputs(op, tensors, attrs):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        out = op(*[mode.from_tensor(t) for t in tensors], *attrs)
    return out if isinstance(out, tuple) else (out,)


def _spec_outputs(spec, tensors, attrs):
    named = dict(zip(spec.attr_names, attrs))
    shapes = spec.output_shapes([tuple(t.shape) for t in tensors], named)
    dtypes = spec.output_dtypes([str(t.dtype).removeprefix("torch.") for t in tensors])
    return list(zip(shapes, dtypes))


@pytest.mark.parametrize("B,T", [(1, 1), (2, 9), (3, 130)])
@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16])
def test_attention_shape_rules_match_fake_impl(B, T, act):
    """Results of the plugin == the fused op's fake outputs; updated caches == the mutated inputs' shape/dtype."""
    for name, make, op in (("csa_attention", _csa_inputs, torch.ops.v4.csa_attention),
                           ("hca_attention", _hca_inputs, torch.ops.v4.hca_attention)):
        spec = get_spec(name)
        tensors, attrs = make(B, T, act=act)
        rules = _spec_outputs(spec, tensors, attrs)
        fake = _fake_outputs(op, tensors, attrs)
        assert len(fake) == spec.n_results, f"{name}: op returns {len(fake)} results, spec says {spec.n_results}"
        for (shape, dt), f in zip(rules, fake):
            assert shape == tuple(f.shape) and dt == str(f.dtype).removeprefix("torch."), (name, shape, dt, f.shape)
        for u, (shape, dt) in zip(spec.updates, rules[spec.n_results:]):
            t = tensors[spec.inputs.index(u)]
            assert (shape, dt) == (tuple(t.shape), str(t.dtype).removeprefix("torch.")), (name, u)


@pytest.mark.parametrize("N,E,k,hash_", [(1, 4, 2, False), (7, 8, 3, True), (129, 16, 6, False)])
def test_moe_shape_rules_match_fake_impl(N, E, k, hash_):
    d, inter, V = 32, 16, 50
    x = torch.zeros(N, d, dtype=torch.bfloat16)
    route = [x, torch.zeros(E, d), torch.zeros(E), torch.zeros(V if hash_ else 0, k, dtype=torch.int64),
             torch.zeros(N, dtype=torch.int64)]
    fake = _fake_outputs(torch.ops.v4.moe_route, route, (k, 1.5, hash_))
    rules = _spec_outputs(SPECS["moe_route"], route, (k, 1.5, hash_))
    assert rules == [(tuple(f.shape), str(f.dtype).removeprefix("torch.")) for f in fake]
    w1, w3, w2 = torch.zeros(E, inter, d), torch.zeros(E, inter, d), torch.zeros(E, d, inter)
    experts = [x, fake[0].new_zeros(N, k), torch.zeros(N, k, dtype=torch.int64), w1, w3, w2]
    # the reference op takes (weight, scale) pairs; plain-float experts ignore the scales
    ref = _fake_outputs(torch.ops.v4.moe_experts, [x, experts[1], experts[2], w1, torch.zeros(0), w3,
                                                   torch.zeros(0), w2, torch.zeros(0)], (10.0,))
    assert _spec_outputs(SPECS["moe_experts"], experts, (10.0,)) == [(tuple(ref[0].shape), "float32")]


def test_plugin_spec_matches_op_schema():
    """Tensor inputs and attributes of each plugin are the op's arguments, same names, same order."""
    from v4compile.targets.trt_ops import op

    for name, spec in SPECS.items():
        args = op(name)._schema.arguments
        assert [a.name for a in args] == [*spec.inputs, *spec.attr_names], name
        assert len(op(name)._schema.returns) == len(spec.outputs), name
        if name in ("csa_attention", "hca_attention"):
            v4 = getattr(torch.ops.v4, name).default._schema.arguments
            assert [a.name for a in v4] == [*spec.inputs, *spec.attr_names], name
            mutated = [a.name for a in v4 if a.alias_info is not None and a.alias_info.is_write]
            assert sorted(mutated) == sorted(spec.updates), name


def test_attrs_checked_and_unknown_plugin_named():
    spec = get_spec("hca_attention")
    spec.check_attrs({"scale": 0.1, "ratio": 16, "norm_eps": 1e-6})
    with pytest.raises(UnsupportedOpError, match="ratio"):
        spec.check_attrs({"scale": 0.1, "ratio": 1.5, "norm_eps": 1e-6})
    with pytest.raises(UnsupportedOpError, match="norm_eps"):
        spec.check_attrs({"scale": 0.1, "ratio": 16})
    with pytest.raises(UnsupportedOpError, match="sparse_attention"):
        get_spec("sparse_attention")
    with pytest.raises(UnsupportedOpError, match="input shapes"):
        spec.output_shapes([(1, 2)], {})


def test_plugin_signature_is_what_trtp_register_reads():
    """The generated descriptor signature: typed tensor inputs then typed attributes, spec order."""
    class Desc:
        pass

    for spec in SPECS.values():
        sig = plugin_signature(spec, Desc, tuple[Desc, ...])
        names = list(sig.parameters)
        assert names == [*spec.inputs, *spec.attr_names]
        kinds = {n: p.annotation for n, p in sig.parameters.items()}
        assert all(kinds[n] is Desc for n in spec.inputs)
        assert [kinds[n] for n in spec.attr_names] == [{"float": float, "int": int, "bool": bool}[k]
                                                       for _, k in spec.attrs]
        assert sig.return_annotation == tuple[Desc, ...]


def test_register_plugins_with_tensorrt():
    trtp = pytest.importorskip("tensorrt.plugin", reason="TensorRT >= 10.9 (tensorrt.plugin) is not installed here")
    from v4compile.plugins.tensorrt.trt_plugins import register_plugins
    from v4compile.targets.trt_ops import BODIES_TRT

    register_plugins(BODIES_TRT)
    for spec in SPECS.values():
        assert spec.plugin_id in trtp.QDP_REGISTRY, spec.plugin_id  # type: ignore[attr-defined]


class _Desc:
    """Stand-in for trtp.TensorDesc: what the descriptor function reads (shape_expr, like())."""

    def __init__(self, shape, dtype):
        self.shape_expr, self.dtype = tuple(shape), dtype

    def like(self):
        return _Desc(self.shape_expr, self.dtype)


class _Trtp:
    TensorDesc, Tensor = _Desc, object

    @staticmethod
    def from_shape_expr(shape, dtype):
        return _Desc(shape, dtype)


class _Trt:
    float32, int64, int32 = "f32", "i64", "i32"


@pytest.mark.parametrize("B,T", [(1, 1), (2, 9)])
def test_descriptor_function_outputs(B, T):
    """The function handed to trtp.register computes every output descriptor from the spec (TensorRT stand-ins)."""
    from v4compile.plugins.tensorrt.trt_plugins import _descriptor

    spec = SPECS["csa_attention"]
    tensors, attrs = _csa_inputs(B, T)
    descs = [_Desc(t.shape, str(t.dtype)) for t in tensors]
    out = _descriptor(spec, _Trt, _Trtp)(*descs, *attrs)
    assert len(out) == len(spec.outputs)
    assert out[0].shape_expr == tuple(tensors[0].shape) and out[1].shape_expr == (B, T, attrs[2])
    assert out[1].dtype == "i32"
    for u, d in zip(spec.updates, out[spec.n_results:]):
        assert d.shape_expr == tuple(tensors[spec.inputs.index(u)].shape)
    route = _descriptor(SPECS["moe_route"], _Trt, _Trtp)(*[_Desc((5, 8), "f32")] * 5, topk=3, route_scale=1.0,
                                                          hash=False)
    assert [(d.shape_expr, d.dtype) for d in route] == [((5, 3), "f32"), ((5, 3), "i64")]

"""Functional torch ops `v4trt::<name>` for the TensorRT target, one per plugin of plugins/tensorrt/specs.py.

TensorRT and ONNX have no in-place inputs, so the tensorrt target's lowering replaces each fused V4 node by the
functional op (same tensor inputs and attributes, the updated caches returned after the result) followed by
copies into the caches, which re-export turns into cache outputs. Each op's eager body IS the reference: the
fused op's plain-torch body run on clones of the caches (or the cpu target's dequantised-weight MoE body), so
the ONNX local functions exported from these bodies carry the same semantics as the eager model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from v4compile.graph.fused_ops import FUSED_BODIES
from v4compile.model.ops import BODIES
from v4compile.plugins.tensorrt.specs import NAMESPACE, SPECS, PluginSpec
from v4compile.targets.cpu_fold import moe_experts_dequantized

_SCHEMA_TYPES = {"float": "float", "int": "int", "bool": "bool"}
_DTYPES = {"float32": torch.float32, "int64": torch.int64, "int32": torch.int32}
_RECORDING: list[list[tuple[str, tuple[Any, ...]]]] = []

_lib = torch.library.Library(NAMESPACE, "DEF")


def _csa(*a: Any) -> tuple[Tensor, ...]:
    return _with_updates("csa_attention", a)


def _hca(*a: Any) -> tuple[Tensor, ...]:
    return _with_updates("hca_attention", a)


def _with_updates(name: str, args: tuple[Any, ...]) -> tuple[Tensor, ...]:
    """Run the fused op's mutating body on clones of its `updates` inputs; return (*results, *updated)."""
    spec = SPECS[name]
    n = len(spec.inputs)
    tensors = dict(zip(spec.inputs, args[:n]))
    clones = {u: tensors[u].clone() for u in spec.updates}
    out = FUSED_BODIES[name](*[clones.get(k, v) for k, v in tensors.items()], *args[n:])
    results = out if isinstance(out, tuple) else (out,)
    if len(results) != spec.n_results:
        raise TypeError(f"v4::{name}'s body returned {len(results)} results, plugin {spec.plugin_id} declares "
                        f"{spec.n_results}: graph/fused_ops.py and plugins/tensorrt/specs.py disagree")
    return (*results, *(clones[u] for u in spec.updates))


def _moe_route(x, gate_w, bias, tid2eid, token_ids, topk, route_scale, hash):
    return BODIES["moe_route"](x, gate_w, bias, tid2eid, token_ids, topk, route_scale, hash)


def _moe_experts(x, weights, ids, w1, w3, w2, swiglu_limit):
    return moe_experts_dequantized(x, weights, ids, w1, w3, w2, swiglu_limit)


BODIES_TRT: dict[str, Callable[..., Any]] = {"csa_attention": _csa, "hca_attention": _hca,
                                             "moe_route": _moe_route, "moe_experts": _moe_experts}
"""Plugin name -> functional plain-torch body (positional: tensor inputs, then attributes in spec order)."""


def schema(spec: PluginSpec) -> str:
    """torch.library schema of v4trt::<name> from the spec (tensors, then attributes; one Tensor per output)."""
    args = [f"Tensor {n}" for n in spec.inputs] + [f"{_SCHEMA_TYPES[k]} {n}" for n, k in spec.attrs]
    rets = ", ".join("Tensor" for _ in spec.outputs)
    return f"{spec.name}({', '.join(args)}) -> ({rets})" if len(spec.outputs) > 1 else \
        f"{spec.name}({', '.join(args)}) -> Tensor"


def _fake(spec: PluginSpec) -> Callable[..., Any]:
    def fake(*args: Any) -> Any:
        n = len(spec.inputs)
        tensors, attrs = args[:n], dict(zip(spec.attr_names, args[n:]))
        shapes = spec.output_shapes([t.shape for t in tensors], attrs)
        dtypes = spec.output_dtypes([str(t.dtype).removeprefix("torch.") for t in tensors])
        outs = tuple(tensors[0].new_empty(s, dtype=_dtype(d, tensors)) for s, d in zip(shapes, dtypes))
        return outs if len(outs) > 1 else outs[0]

    return fake


def _dtype(name: str, tensors: tuple[Tensor, ...]) -> torch.dtype:
    if name in _DTYPES:
        return _DTYPES[name]
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise TypeError(f"unknown dtype name {name!r}")
    return dt


def _eager(name: str) -> Callable[..., Any]:
    body = BODIES_TRT[name]

    def run(*args: Any) -> Any:
        if _RECORDING:
            _RECORDING[-1].append((name, args))
        return body(*args)

    return run


for _spec in SPECS.values():
    _lib.define(schema(_spec))
    _lib.impl(_spec.name, _eager(_spec.name), "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{_spec.name}", _fake(_spec), lib=_lib)


def op(name: str) -> torch._ops.OpOverload:
    """torch.ops.v4trt.<name>.default."""
    return getattr(torch.ops.v4trt, name).default


@contextlib.contextmanager
def record_calls() -> Iterator[list[tuple[str, tuple[Any, ...]]]]:
    """Collect (name, args) of every eager v4trt call made inside the block, in call order."""
    _RECORDING.append([])
    try:
        yield _RECORDING[-1]
    finally:
        _RECORDING.pop()

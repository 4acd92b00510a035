"""TensorRT Python plugins (`tensorrt.plugin`, TensorRT >= 10.9) for the V4 ops of specs.SPECS.

For each spec: `trtp.register("v4trt::<name>")` with a descriptor function whose signature (TensorDesc inputs,
typed attributes) and output rule come from the spec, and `trtp.impl` (JIT: TensorRT calls back into Python on
its stream; the body is the functional reference the tensorrt target lowers to, run with torch on the GPU).

Not here, and why: `trtp.aot_impl` returns ONE compiled kernel with its launch parameters per plugin, while each
fused op is several Triton kernels (csa_attention: two compressor passes, indexer scores + radix top-k in four
kernels, sparse attention; moe_route: one or two). AOT plugins need the graph split into one plugin node per
kernel (compress, indexer_topk, sparse_attention, ...) or one fused kernel per op; until then engines with these
plugins need Python at run time (docs/TENSORRT.md).

This module imports without TensorRT: `plugin_signature` (the pure-Python description) is tested here; calling
`register_plugins` without TensorRT raises TargetError.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Tuple

from v4compile.errors import TargetError
from v4compile.plugins.tensorrt.specs import SPECS, PluginSpec

_ATTR_PY = {"float": float, "int": int, "bool": bool}
_REGISTERED: set[str] = set()


def plugin_signature(spec: PluginSpec, tensor_type: Any, out_type: Any) -> inspect.Signature:
    """The signature trtp.register / trtp.impl inspect: tensor inputs typed `tensor_type`, then the attributes
    with their Python types; returns `out_type` (a Tuple of descriptors for several outputs)."""
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=tensor_type)
              for n in spec.inputs]
    params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=_ATTR_PY[k])
               for n, k in spec.attrs]
    return inspect.Signature(params, return_annotation=out_type)


def _typed(fn: Callable, sig: inspect.Signature, name: str) -> Callable:
    """Give `fn(*args, **kwargs)` the explicit signature and annotations the plugin decorators read."""
    fn.__signature__ = sig
    fn.__annotations__ = {p.name: p.annotation for p in sig.parameters.values()}
    if sig.return_annotation is not inspect.Signature.empty:
        fn.__annotations__["return"] = sig.return_annotation
    fn.__name__ = fn.__qualname__ = name
    return fn


def _bind(spec: PluginSpec, args: tuple, kwargs: dict) -> tuple[list[Any], dict[str, Any]]:
    sig = plugin_signature(spec, Any, Any)
    bound = sig.bind_partial(*args, **kwargs).arguments
    return [bound[n] for n in spec.inputs], {n: bound[n] for n in spec.attr_names}


def _descriptor(spec: PluginSpec, trt: Any, trtp: Any) -> Callable:
    dtypes = {"float32": trt.float32, "int64": trt.int64, "int32": trt.int32}

    def desc(*args: Any, **kwargs: Any) -> Any:
        tensors, attrs = _bind(spec, args, kwargs)
        named = dict(zip(spec.inputs, tensors))
        shapes = spec.output_shapes([t.shape_expr for t in tensors], attrs)
        outs = []
        for rule, shape in zip(spec.outputs, shapes):
            if rule.dtype.startswith("same:"):
                outs.append(named[rule.dtype.removeprefix("same:")].like())
            else:
                outs.append(trtp.from_shape_expr(tuple(shape), dtype=dtypes[rule.dtype]))
        return tuple(outs) if len(outs) > 1 else outs[0]

    out_type = Tuple[trtp.TensorDesc] if len(spec.outputs) > 1 else trtp.TensorDesc  # noqa: UP006 - as documented
    return _typed(desc, plugin_signature(spec, trtp.TensorDesc, out_type), f"{spec.name}_desc")


def _jit_impl(spec: PluginSpec, body: Callable, trtp: Any) -> Callable:
    import torch

    n = len(spec.inputs) + len(spec.attrs)

    def impl(*args: Any, **kwargs: Any) -> None:
        extra = dict(zip(("outputs", "stream"), args[n:]))  # TensorRT may pass them positionally
        outputs, stream = kwargs.pop("outputs", extra.get("outputs")), kwargs.pop("stream", extra.get("stream"))
        tensors, attrs = _bind(spec, args[:n], kwargs)
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            ins = [torch.as_tensor(t, device="cuda") for t in tensors]
            res = body(*ins, *[attrs[a] for a in spec.attr_names])
            res = res if isinstance(res, tuple) else (res,)
            for dst, src in zip(outputs, res, strict=True):
                torch.as_tensor(dst, device="cuda").copy_(src)

    sig = plugin_signature(spec, trtp.Tensor, inspect.Signature.empty)
    params = [*sig.parameters.values(),
              inspect.Parameter("outputs", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Tuple[trtp.Tensor]),  # noqa: UP006
              inspect.Parameter("stream", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=int)]
    return _typed(impl, inspect.Signature(params), f"{spec.name}_impl")


def register_plugins(bodies: dict[str, Callable]) -> list[str]:
    """Register every spec's plugin with TensorRT (idempotent); `bodies`: plugin name -> functional body
    (targets/trt_ops.BODIES_TRT). Returns the plugin ids registered by this call."""
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except Exception as e:
        raise TargetError(f"registering the v4 TensorRT plugins needs tensorrt >= 10.9 with tensorrt.plugin "
                          f"({type(e).__name__}: {e})") from e
    done = []
    for name, spec in SPECS.items():
        if spec.plugin_id in _REGISTERED:
            continue
        if name not in bodies:
            raise TargetError(f"no functional body for plugin {spec.plugin_id}")
        trtp.register(spec.plugin_id)(_descriptor(spec, trt, trtp))
        trtp.impl(spec.plugin_id)(_jit_impl(spec, bodies[name], trtp))
        _REGISTERED.add(spec.plugin_id)
        done.append(spec.plugin_id)
    return done

"""TensorRT Python plugins (`tensorrt.plugin`, TensorRT >= 10.9) for the V4 ops of specs.SPECS.

Two sets, two registration calls:
- `register_plugins(bodies)`: the FUSED plugins (specs.SPECS, ids "v4trt::<name>"), one node per fused op, with a
  JIT implementation (`trtp.impl`: TensorRT calls back into Python on its stream and runs the functional
  reference body with torch). Plans built from them need Python at run time.
- `register_kernel_plugins()`: the per-kernel AOT plugins (specs.KERNEL_SPECS, ids "v4trt_aot::<name>"), one
  Triton kernel launch each, with ONLY an AOT implementation (`trtp.aot_impl` returns the kernel name, its sm_90
  PTX, the launch parameters and the int32 extra arguments, all from plugins/tensorrt/aot.py); in-place outputs
  are declared `aliased()`. An AOT plan (fused nodes expanded, plugins/tensorrt/plan.py) runs without Python.
Registering only one implementation per plugin leaves TensorRT no JIT / AOT choice to make.

This module imports without TensorRT: `plugin_signature` / `aot_signature` (the pure-Python descriptions) are
tested here; both registration calls raise TargetError without TensorRT.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Tuple, Union

from v4compile.errors import TargetError
from v4compile.plugins.tensorrt.specs import KERNEL_SPECS, SPECS, PluginSpec

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


def _descriptor(spec: PluginSpec, trt: Any, trtp: Any, aliased: bool = False) -> Callable:
    """The trtp.register function; `aliased`: the spec's updated outputs share their input's buffer (AOT kernels
    update in place), else they are new tensors like the input (JIT plugins copy into them)."""
    dtypes = {"float32": trt.float32, "int64": trt.int64, "int32": trt.int32,
              "float8_e4m3fn": getattr(trt, "fp8", None)}  # the MoE kernel plugins' e4m3 rows

    def desc(*args: Any, **kwargs: Any) -> Any:
        tensors, attrs = _bind(spec, args, kwargs)
        named = dict(zip(spec.inputs, tensors))
        shapes = spec.output_shapes([t.shape_expr for t in tensors], attrs)
        outs = []
        for j, (rule, shape) in enumerate(zip(spec.outputs, shapes)):
            if aliased and j >= spec.n_results:
                outs.append(named[spec.updates[j - spec.n_results]].aliased())
            elif rule.dtype.startswith("same:"):
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


def aot_signature(spec: PluginSpec, tensor_type: Any, out_type: Any) -> inspect.Signature:
    """The signature trtp.aot_impl inspects: inputs, attributes, then `outputs` and `tactic`."""
    sig = plugin_signature(spec, tensor_type, out_type)
    params = [*sig.parameters.values(),
              inspect.Parameter("outputs", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Tuple[tensor_type]),  # noqa: UP006
              inspect.Parameter("tactic", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=int)]
    return inspect.Signature(params, return_annotation=out_type)


def trt_dtype_names(trt: Any) -> dict[Any, str]:
    """tensorrt.DataType -> the dtype names of specs / aot.TRITON_DTYPES."""
    names = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "int32": "int32", "int64": "int64",
             "int8": "int8", "uint8": "uint8", "bool": "bool", "fp8": "float8_e4m3fn"}
    return {getattr(trt, k): v for k, v in names.items() if hasattr(trt, k)}


def aot_result(spec: PluginSpec, shapes: list[Any], dtypes: list[str], attrs: dict[str, Any], trtp: Any) -> tuple:
    """(kernel name, PTX, trtp.KernelLaunchParams, trtp.SymIntExprs) for one kernel plugin instance."""
    from v4compile.plugins.tensorrt.aot import compile_plan, describe

    plan = describe(spec.name, shapes, dtypes, attrs)
    compiled = compile_plan(plan)
    params = trtp.KernelLaunchParams()
    params.grid_x, params.grid_y, params.grid_z = plan.grid
    params.block_x = compiled.block_x
    params.shared_mem = compiled.shared_mem
    extra = trtp.SymIntExprs(len(plan.extras))
    for i, e in enumerate(plan.extras):
        extra[i] = trtp.SymInt32(e)
    return compiled.name, compiled.ptx, params, extra


def _aot_impl(spec: PluginSpec, trt: Any, trtp: Any) -> Callable:
    n = len(spec.inputs) + len(spec.attrs)
    names = trt_dtype_names(trt)

    def impl(*args: Any, **kwargs: Any) -> Any:
        kwargs.pop("outputs", None)  # TensorRT's output descriptors: the plan derives everything from the inputs
        kwargs.pop("tactic", None)
        tensors, attrs = _bind(spec, args[:n], kwargs)
        return aot_result(spec, [tuple(t.shape_expr) for t in tensors], [names[t.dtype] for t in tensors], attrs,
                          trtp)

    ret = Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]  # noqa: UP006,UP007
    return _typed(impl, aot_signature(spec, trtp.TensorDesc, ret), f"{spec.name}_aot_impl")


def register_kernel_plugins() -> list[str]:
    """Register every per-kernel AOT plugin with TensorRT (descriptor + aot_impl only; idempotent)."""
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except Exception as e:
        raise TargetError(f"registering the v4 AOT kernel plugins needs tensorrt >= 10.9 with tensorrt.plugin "
                          f"({type(e).__name__}: {e})") from e
    done = []
    for spec in KERNEL_SPECS.values():
        if spec.plugin_id in _REGISTERED:
            continue
        trtp.register(spec.plugin_id)(_descriptor(spec, trt, trtp, aliased=True))
        trtp.aot_impl(spec.plugin_id)(_aot_impl(spec, trt, trtp))
        _REGISTERED.add(spec.plugin_id)
        done.append(spec.plugin_id)
    return done

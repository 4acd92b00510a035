"""Functional torch ops `v4trt::<name>` for the TensorRT target, one per plugin of plugins/tensorrt/specs.py, and
`v4trt_aot::<name>`, one per per-kernel AOT plugin (specs.KERNEL_SPECS), with the fused ops composed from them.

TensorRT and ONNX have no in-place inputs, so the tensorrt target's lowering replaces each fused V4 node by the
functional op (same tensor inputs and attributes, the updated caches returned after the result) followed by
copies into the caches, which re-export turns into cache outputs. Each op's eager body IS the reference: the
fused op's plain-torch body run on clones of the caches (or the cpu target's dequantised-weight MoE body), so
the ONNX local functions exported from these bodies carry the same semantics as the eager model.

AOT_BODIES: each fused plugin as the kernel launches an AOT TensorRT plan runs (compressor pool + state passes,
indexer scores, two radix histogram passes, compaction, finish, sparse attention; the router) plus the plain-torch
glue between them (positions, window indices, ring write), which the plan keeps as TensorRT layers.
The eager body of a v4trt_aot op is plugins/tensorrt/aot.launch: the Triton kernel launched exactly as TensorRT
launches the AOT plugin, so running AOT_BODIES eagerly tests the plans against BODIES_TRT.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from v4compile.graph.fused_ops import CSA_RATIO, FUSED_BODIES
from v4compile.model.ops import BODIES, positions_of, visible_block_indices, window_indices
from v4compile.plugins.tensorrt.specs import KERNEL_NAMESPACE, KERNEL_SPECS, NAMESPACE, SPECS, PluginSpec
from v4compile.targets.cpu_fold import moe_experts_dequantized

_SCHEMA_TYPES = {"float": "float", "int": "int", "bool": "bool"}
_DTYPES = {"float32": torch.float32, "int64": torch.int64, "int32": torch.int32}
_RECORDING: list[list[tuple[str, tuple[Any, ...]]]] = []

_lib = torch.library.Library(NAMESPACE, "DEF")
_aot_lib = torch.library.Library(KERNEL_NAMESPACE, "DEF")


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


def _moe_experts_fp8(x, weights, ids, w1, s1, w3, s3, w2, s2, swiglu_limit):
    """v4::moe_experts on e4m3 experts: each weight dequantised (e4m3 x its float32 block scale, exact), then the
    same math as the reference body (FP8 activation rows per 128 channels, acc_dtype matmuls rounded to the act
    dtype, SwiGLU clamp, routing weight before W2, experts added in ascending order), written without
    data-dependent shapes (every expert on every token, unrouted pairs masked) so that it exports to ONNX."""
    from v4compile.quant.formats import dequant_fp8_block

    return moe_experts_dequantized(x, weights, ids, dequant_fp8_block(w1, s1), dequant_fp8_block(w3, s3),
                                   dequant_fp8_block(w2, s2), swiglu_limit)


BODIES_TRT: dict[str, Callable[..., Any]] = {"csa_attention": _csa, "hca_attention": _hca,
                                             "moe_route": _moe_route, "moe_experts": _moe_experts,
                                             "moe_experts_fp8": _moe_experts_fp8}
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


def _kernel_eager(name: str) -> Callable[..., Any]:
    spec = KERNEL_SPECS[name]

    def run(*args: Any) -> Any:
        from v4compile.plugins.tensorrt.aot import launch

        n = len(spec.inputs)
        outs = launch(name, args[:n], dict(zip(spec.attr_names, args[n:])))
        return outs if len(outs) > 1 else outs[0]

    return run


for _spec in SPECS.values():
    _lib.define(schema(_spec))
    _lib.impl(_spec.name, _eager(_spec.name), "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{_spec.name}", _fake(_spec), lib=_lib)
for _spec in KERNEL_SPECS.values():
    _aot_lib.define(schema(_spec))
    _aot_lib.impl(_spec.name, _kernel_eager(_spec.name), "CompositeExplicitAutograd")
    torch.library.register_fake(f"{KERNEL_NAMESPACE}::{_spec.name}", _fake(_spec), lib=_aot_lib)


def op(name: str) -> torch._ops.OpOverload:
    """torch.ops.v4trt.<name>.default."""
    return getattr(torch.ops.v4trt, name).default


def kernel_op(name: str) -> torch._ops.OpOverload:
    """torch.ops.v4trt_aot.<name>.default (one AOT plugin = one kernel launch)."""
    return getattr(torch.ops.v4trt_aot, name).default


# ---------------------------------------------------------------------------------------------- AOT compositions


def _compress_k(kv_proj, gate_proj, ape, norm_weight, inv_freq, start_pos, kv_state, score_state, cache, ratio,
                norm_eps, rotate) -> tuple[Tensor, Tensor, Tensor]:
    """v4::compress as its two launches: (cache, kv_state, score_state) updated."""
    cache = kernel_op("compress_pool")(kv_proj, gate_proj, ape, norm_weight, inv_freq, start_pos, kv_state,
                                       score_state, cache, ratio, norm_eps, rotate)
    kv_state, score_state = kernel_op("compress_state")(kv_proj, gate_proj, ape, start_pos, kv_state, score_state,
                                                        cache, ratio)
    return cache, kv_state, score_state


def _indexer_topk_k(q, weights, cache, positions, ratio: int, k: int) -> Tensor:
    """topk_select(indexer_scores(q, weights, cache[:, :-1], positions, ratio), k) as its launches: scores (which
    zero the top-k workspace), the histogram passes, compaction, finish (radix_topk.launch_select)."""
    from v4compile.plugins.tensorrt.aot import H200, topk_config

    B, T = q.shape[:2]
    cfg = topk_config(k)
    tk = (k, ratio, H200.n_sms, cfg.cand)
    scores, ws = kernel_op("indexer_scores")(q, weights, cache, positions, ratio, H200.n_sms)
    for level in (1, 2, 3) if cfg.hist3 else (1, 2):
        ws = kernel_op("topk_hist")(scores, positions, ws, level, *tk)
    runs, cands, ws = kernel_op("topk_compact")(scores, positions, ws, *tk)
    idx, _, _ = kernel_op("topk_finish")(scores, positions, ws, runs, cands, *tk)
    return idx.view(B, T, k)


def _attend_k(q, kv, start_pos, ring, kv2, idx2, sink, scale) -> tuple[Tensor, Tensor]:
    """Window + picked rows + sink attention, and the ring after the write: (o, ring)."""
    idx = window_indices(start_pos, q.shape[1], ring.shape[1])
    o = kernel_op("sparse_attention")(q, torch.cat((ring, kv), 1), idx, kv2, idx2, sink, scale)
    ring = ring.clone()
    BODIES["ring_write"](ring, kv, start_pos)
    return o, ring


def _csa_k(q, kv, start_pos, ring, kv_proj, gate_proj, ape, norm_weight, inv_freq, kv_state, score_state, kv_cache,
           idx_q, idx_weights, idx_kv_proj, idx_gate_proj, idx_ape, idx_norm_weight, idx_kv_state, idx_score_state,
           idx_cache, sink, scale, norm_eps, topk) -> tuple[Tensor, ...]:
    kv_cache, kv_state, score_state = _compress_k(kv_proj, gate_proj, ape, norm_weight, inv_freq, start_pos, kv_state,
                                                  score_state, kv_cache, CSA_RATIO, norm_eps, False)
    idx_cache, idx_kv_state, idx_score_state = _compress_k(idx_kv_proj, idx_gate_proj, idx_ape, idx_norm_weight,
                                                           inv_freq, start_pos, idx_kv_state, idx_score_state,
                                                           idx_cache, CSA_RATIO, norm_eps, True)
    picks = _indexer_topk_k(idx_q, idx_weights, idx_cache, positions_of(start_pos, q.shape[1]), CSA_RATIO, topk)
    o, ring = _attend_k(q, kv, start_pos, ring, kv_cache, picks, sink, scale)
    return o, picks, ring, kv_state, score_state, kv_cache, idx_kv_state, idx_score_state, idx_cache


def _hca_k(q, kv, start_pos, ring, kv_proj, gate_proj, ape, norm_weight, inv_freq, kv_state, score_state, kv_cache,
           sink, scale, ratio, norm_eps) -> tuple[Tensor, ...]:
    kv_cache, kv_state, score_state = _compress_k(kv_proj, gate_proj, ape, norm_weight, inv_freq, start_pos, kv_state,
                                                  score_state, kv_cache, ratio, norm_eps, False)
    picks = visible_block_indices(positions_of(start_pos, q.shape[1]), kv_cache.shape[1] - 1, ratio)
    o, ring = _attend_k(q, kv, start_pos, ring, kv_cache, picks, sink, scale)
    return o, ring, kv_state, score_state, kv_cache


def _moe_route_k(x, gate_w, bias, tid2eid, token_ids, topk, route_scale, hash):
    return kernel_op("moe_route")(x, gate_w, bias, tid2eid, token_ids, topk, route_scale, hash)


def _moe_experts_fp8_k(x, weights, ids, w1, s1, w3, s3, w2, s2, swiglu_limit):
    """plugins/triton/moe_gemm's grouped path (what its launcher runs for a token count unknown at build time) as
    six launches: FP8 rows of x (+ zeroed route counts), count, scatter into expert groups padded to BM, GEMM1 +
    SwiGLU + h quantisation, GEMM2, combine."""
    from v4compile.plugins.tensorrt.aot import moe_configs

    E, inter, dim = w1.shape
    bm = moe_configs(ids.shape[1], E, inter, dim)[0].block_m
    xq, xs, counts = kernel_op("moe_quant_act")(x, E)
    rank, counts = kernel_op("moe_count")(ids, counts)
    sroute = kernel_op("moe_scatter")(ids, counts, rank, bm)
    h, hs = kernel_op("moe_gemm1")(x, xq, xs, w1, w3, s1, s3, weights, ids, counts, sroute, swiglu_limit, bm)
    o = kernel_op("moe_gemm2")(x, h, hs, w2, s2, ids, counts, sroute, bm)
    return kernel_op("moe_combine")(o, ids, E)


AOT_BODIES: dict[str, Callable[..., Any]] = {"csa_attention": _csa_k, "hca_attention": _hca_k,
                                             "moe_route": _moe_route_k, "moe_experts_fp8": _moe_experts_fp8_k}
"""Fused plugin name -> the same function (arguments and results as BODIES_TRT) composed of v4trt_aot kernel
ops and torch glue. moe_experts (fp32 / bf16 builds) has none: the network holds dequantised float experts, which
the FP8 Triton MoE kernels do not take, so an AOT plan computes it with its reference function (TensorRT layers),
as the h200 target does for non-FP8 experts; fp8 builds carry moe_experts_fp8, composed of the six MoE kernels."""


@contextlib.contextmanager
def record_calls() -> Iterator[list[tuple[str, tuple[Any, ...]]]]:
    """Collect (name, args) of every eager v4trt call made inside the block, in call order."""
    _RECORDING.append([])
    try:
        yield _RECORDING[-1]
    finally:
        _RECORDING.pop()

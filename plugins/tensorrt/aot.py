"""AOT implementations of the per-kernel TensorRT plugins (specs.KERNEL_SPECS), without TensorRT.

`describe(name, shapes, dtypes, attrs)` -> LaunchPlan: what `trtp.aot_impl` must return for one plugin, from its
input shapes (ints, dims.Sym, or TensorRT ShapeExprs) and dtype names: the entry kernel (aot_kernels.py) with its
Triton signature (pointer dtypes from the descriptors), the constexprs (attributes and block sizes, chosen as the
plugins/triton launchers choose them for an sm_90 GPU), the int32 extra arguments and the 3-D grid as dim
expressions, warps and stages. `compile_plan(plan)` compiles it for sm_90 (no GPU needed) and checks that the
result fits TensorRT's AOT launch (no scratch memory, one CTA per cluster, no PDL / cooperative launch);
`launch(name, tensors, attrs)` runs a plugin the way TensorRT would run it (outputs allocated from the spec,
aliased outputs sharing the input's buffer, arguments in TensorRT's order, the plan's grid), through Triton's
JIT or its CPU interpreter, so the plans are tested numerically against the ops' references.

The descriptions never branch on a dynamic dim (dims.Sym enforces it in the tests): a symbolic batch / length is
handled as the launchers handle it under torch.export (no decode split-K, prefill score config).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from v4compile.errors import ExportError, UnsupportedOpError
from v4compile.plugins.tensorrt.dims import Dim, cdiv, constant, evaluate, smax, smin
from v4compile.plugins.tensorrt.specs import get_kernel_spec, topk_chunks


@dataclass(frozen=True)
class AotTarget:
    """The GPU the PTX is compiled for, and its SM count (the indexer / top-k launches size their chunks by it)."""

    arch: int = 90
    warp_size: int = 32
    n_sms: int = 132  # H200 (ENVIRONMENT.md)


H200 = AotTarget()
HIDDEN_PARAMS = 2  # Triton 3.6 appends global_scratch and profile_scratch pointers; TensorRT passes null for both

TRITON_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int64": "i64", "int32": "i32",
                 "int8": "i8", "uint8": "u8", "bool": "i1", "float8_e4m3fn": "fp8e4nv"}


@dataclass(frozen=True)
class LaunchPlan:
    """One plugin launch: entry kernel signature / constexprs, extra args and grid as dim expressions."""

    plugin: str
    signature: dict[str, str]  # every parameter of the entry kernel, in order: "*fp32", "i32", "constexpr"
    constexprs: dict[str, Any]
    extras: tuple[Dim, ...]  # values of spec.extras, in order
    grid: tuple[Dim, Dim, Dim]
    num_warps: int
    num_stages: int | None  # None: Triton's default (the launcher passes none)

    @property
    def kernel(self) -> Any:
        from v4compile.plugins.tensorrt.aot_kernels import ENTRIES

        return ENTRIES[self.plugin]

    def concrete(self, env: dict[str, int]) -> tuple[tuple[int, ...], tuple[int, int, int]]:
        """(extras, grid) with the Sym dims bound by `env` (ints pass through)."""
        return tuple(evaluate(e, env) for e in self.extras), tuple(evaluate(g, env) for g in self.grid)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _static(x: Dim, what: str) -> int:
    v = constant(x)
    if v is None:
        raise UnsupportedOpError(f"AOT plugin: {what} must be a build-time constant, got {x!r}")
    return v


def _compress_pool(s, dt, a, tg):
    from v4compile.plugins.triton.compressor import SLOTS_PER_STEP

    B, T, CW = s["kv_proj"]
    m, rotate = int(a["ratio"]), bool(a["rotate"])
    c = 2 if m == 4 else 1
    D = _static(CW, "the compressor width") // c
    DP = D if rotate else max(_pow2(D), 64)
    cx = dict(M=m, C=c, D=D, DP=DP, R=2 * _static(s["inv_freq"][0], "rope width"), SB=min(SLOTS_PER_STEP, _pow2(m)),
              ROTATE=rotate, EPS=float(a["norm_eps"]), HD_SCALE=float(D ** -0.5))
    return (T, s["cache"][1]), (B, T // m + 1, 1), cx, 4 if DP <= 256 else 8, None


def _compress_state(s, dt, a, tg):
    from v4compile.plugins.triton.compressor import STATE_ELEMS

    B, T, CW = s["kv_proj"]
    m = int(a["ratio"])
    c = 2 if m == 4 else 1
    CW = _static(CW, "the compressor width")
    sp = _pow2(c * m)
    cb = min(_pow2(CW), max(16, STATE_ELEMS // sp))
    return (T,), (B, cdiv(CW, cb), 1), dict(M=m, C=c, CW=CW, SP=sp, CB=cb), 4, None


def score_config(T: Dim, n_heads: int) -> Any:
    """indexer_topk.pick_score_config on a CUDA device: the decode config only when T is the constant 1."""
    from v4compile.plugins.triton.indexer_topk import SCORE_CONFIGS, ScoreConfig

    decode = constant(T) == 1
    cfg = next(c for c in SCORE_CONFIGS if (c.bt == 1) == decode)
    return ScoreConfig(max(cfg.bt, 16 // n_heads), cfg.block_n, cfg.num_warps, cfg.num_stages)


def topk_config(k: int, cand: int | None = None) -> Any:
    """radix_topk.pick_topk_config on a CUDA device with room for 2 k candidates (or the candidate capacity `cand`
    of a plugin's attribute), restricted to what the plugin graph runs: separate hist / compact / finish launches
    with the third histogram pass (the first such entry of TOPK_CONFIGS)."""
    from dataclasses import replace

    from v4compile.plugins.triton.radix_topk import TOPK_CONFIGS

    base = next(c for c in TOPK_CONFIGS if not (c.fuse_finish or c.fuse_hist1) and c.hist3)
    return replace(base, cand=cand if cand is not None else min(8192, max(base.cand, 2 * _pow2(k))))


def _indexer_scores(s, dt, a, tg):
    B, T, Hi, Di = s["q"]
    Hi, Di = _static(Hi, "index heads"), _static(Di, "index head dim")
    N = _static(s["k_cache"][1], "indexer cache rows") - 1  # the scratch row is never scored
    cfg = score_config(T, Hi)
    n_tiles = cdiv(N, cfg.block_n)
    row_blocks = B * cdiv(T, cfg.bt)
    chunks = smax(1, smin(n_tiles, cdiv(2 * int(a["n_sms"]), row_blocks)))
    tiles = smax(1, cdiv(n_tiles, chunks))
    cx = dict(RATIO=int(a["ratio"]), HI=Hi, DI=Di, BT=cfg.bt, BLOCK_N=cfg.block_n,
              DOT_PREC="ieee" if dt["q"] == "float32" else "tf32", NUM_STAGES=cfg.num_stages)
    return (T, N, tiles), (row_blocks, smax(1, cdiv(n_tiles, tiles)), 1), cx, cfg.num_warps, None


def _topk(s, a):
    """(extras, grid, constexprs, config) shared by the top-k passes."""
    R, N = s["scores"]
    T = s["positions"][1]
    cfg = topk_config(int(a["k"]), int(a["capacity"]))
    chunk, n_chunks = topk_chunks(R, N, cfg.block, int(a["n_sms"]))
    return (T, N, chunk, n_chunks), (R, n_chunks, 1), dict(K=int(a["k"]), RATIO=int(a["ratio"]), CAP=cfg.cand), cfg


def _topk_hist(s, dt, a, tg):
    extras, grid, cx, cfg = _topk(s, a)
    if int(a["level"]) not in (1, 2, 3):
        raise UnsupportedOpError(f"topk_hist level {a['level']}: expected 1, 2 or 3")
    return extras[:3], grid, dict(LEVEL=int(a["level"]), **cx, BLOCK=cfg.block), cfg.num_warps, None


def _topk_compact(s, dt, a, tg):
    extras, grid, cx, cfg = _topk(s, a)
    return extras, grid, dict(**cx, BLOCK=cfg.block, HIST3=cfg.hist3), cfg.num_warps, None


def _topk_finish(s, dt, a, tg):
    extras, (R, _, _), cx, cfg = _topk(s, a)
    return extras, (R, 1, 1), dict(**cx, HIST3=cfg.hist3), cfg.finish_warps, None


def _sparse_attention(s, dt, a, tg):
    import torch

    from v4compile.plugins.triton.sparse_attention import LOG2E, pick_config

    B, T, H, D = s["q"]
    H, D = _static(H, "heads"), _static(D, "head dim")
    cfg = pick_config(D, torch.device("cuda"), fp8=False)  # a device object only: no GPU needed
    block_h = min(64, max(16, _pow2(H)))
    cx = dict(QK_SCALE=float(a["scale"]) * LOG2E, SINK_SCALE=LOG2E, BLOCK_H=block_h, BLOCK_N=cfg.block_n,
              BLOCK_D=max(16, _pow2(D)), DOT_PREC="ieee")
    extras = (T, H, D, s["kv"][1], s["kv2"][1], s["idx"][2], s["idx2"][2])
    return extras, (B * T, cdiv(H, block_h), 1), cx, cfg.num_warps, cfg.num_stages


def _moe_route(s, dt, a, tg):
    from v4compile.plugins.triton.moe_route import pick_route_config

    N, D = s["x"]
    E = _static(s["gate_w"][0], "experts")
    topk, use_hash = int(a["topk"]), bool(a["hash"])
    cfg = pick_route_config(E, "float32" in (dt["x"], dt["gate_w"]))
    has_bias = _static(s["bias"][0], "router bias length") > 0 and not use_hash
    cx = dict(ROUTE_SCALE=float(a["route_scale"]), TOPK=topk, HASH=use_hash, HAS_BIAS=has_bias, BM=cfg.block_m,
              BE=_pow2(E), BK=cfg.block_k, KP=_pow2(topk), FP32_DOT=cfg.fp32_dot)
    return (N, E, D), (cdiv(N, cfg.block_m), 1, 1), cx, cfg.num_warps, cfg.num_stages


def moe_configs(k: int, n_experts: int, inter: int, dim: int) -> tuple[Any, Any]:
    """(GEMM1, GEMM2) configs of moe_gemm's launcher for a token count unknown at build time (its torch.export
    case: the grouped path, BM 64): pick_configs("grouped", None, ...)."""
    from v4compile.plugins.triton.moe_gemm import pick_configs

    return pick_configs("grouped", None, k, n_experts, inter, dim)


def _moe_quant_act(s, dt, a, tg):
    N, d = s["x"]
    d, E = _static(d, "the hidden width"), int(a["n_experts"])
    return (N,), (cdiv(N, 16), d // 128, 1), dict(D=d, BR=16, E=E, EP=_pow2(E)), 4, None


def _moe_count(s, dt, a, tg):
    N, k = s["ids"]
    k, E = _static(k, "experts per token"), _static(s["counts"][0], "experts")
    R = N * k
    return (R,), (cdiv(R, 1024), 1, 1), dict(K=k, E=E, BLOCK=1024), 4, None


def _moe_scatter(s, dt, a, tg):
    (R,), grid, cx, warps, stages = _moe_count(s, dt, a, tg)
    E = cx["E"]
    return (R,), grid, dict(K=cx["K"], E=E, BM=int(a["block_m"]), EP=_pow2(E), BLOCK=1024), warps, stages


def _moe_problem(s, w: str, sc: str) -> tuple[int, int, int, int, int]:
    """(E, out rows, reduction width, scale rows per block SCALE_BN, scale channels per block SK) of `w`/`sc`."""
    E, O, K = (_static(x, f"{w} dims") for x in s[w])
    so, sk = (_static(x, f"{sc} dims") for x in s[sc][1:])
    return E, O, K, O // so, K // sk


def _moe_gemm(s, a, gemm: int):
    """(k, E, I, d, t_max, config) of GEMM `gemm` (1 or 2), checked against the launcher's block_m."""
    from v4compile.plugins.tensorrt.specs import moe_tiles

    N, k = s["ids"]
    k = _static(k, "experts per token")
    if gemm == 1:
        E, I, d, _, _ = _moe_problem(s, "w1", "s1")
    else:
        E, d, I, _, _ = _moe_problem(s, "w2", "s2")
    cfg = moe_configs(k, E, I, d)[gemm - 1]
    if int(a["block_m"]) != cfg.block_m:
        raise UnsupportedOpError(f"moe_gemm{gemm}: block_m {a['block_m']} != the launcher's grouped BM {cfg.block_m}")
    return k, E, I, d, moe_tiles(N * k, cfg.block_m, E), cfg


def _moe_gemm1(s, dt, a, tg):
    k, E, I, d, tiles, cfg = _moe_gemm(s, a, 1)
    _, _, _, sbn, sk = _moe_problem(s, "w1", "s1")
    cx = dict(LIMIT=float(a["swiglu_limit"]), K=k, E=E, BM=cfg.block_m, BN=cfg.block_n, EP=_pow2(E),
              SCALE_BN=sbn, SK=sk, ROUND=dt["x"] == "bfloat16")
    return (I, d), (tiles * (I // cfg.block_n), 1, 1), cx, cfg.num_warps, cfg.num_stages


def _moe_gemm2(s, dt, a, tg):
    k, E, I, d, tiles, cfg = _moe_gemm(s, a, 2)
    _, _, _, sbn, sk = _moe_problem(s, "w2", "s2")
    cx = dict(K=k, E=E, BM=cfg.block_m, BN=cfg.block_n, EP=_pow2(E), SCALE_BN=sbn, SK=sk)
    return (d, I), (tiles * (d // cfg.block_n), 1, 1), cx, cfg.num_warps, cfg.num_stages


def _moe_combine(s, dt, a, tg):
    N, k = s["ids"]
    d = _static(s["o"][1], "the hidden width")
    bd = min(1024, _pow2(d))
    cx = dict(D=d, K=_static(k, "experts per token"), E=int(a["n_experts"]), BD=bd)
    return (), (N, cdiv(d, bd), 1), cx, 4, None


_DESCRIBE: dict[str, Callable] = {
    "compress_pool": _compress_pool, "compress_state": _compress_state, "indexer_scores": _indexer_scores,
    "topk_hist": _topk_hist, "topk_compact": _topk_compact, "topk_finish": _topk_finish,
    "sparse_attention": _sparse_attention, "moe_route": _moe_route, "moe_quant_act": _moe_quant_act,
    "moe_count": _moe_count, "moe_scatter": _moe_scatter, "moe_gemm1": _moe_gemm1, "moe_gemm2": _moe_gemm2,
    "moe_combine": _moe_combine,
}


def describe(name: str, shapes: Sequence[Sequence[Dim]], dtypes: Sequence[str], attrs: dict[str, Any],
             target: AotTarget = H200) -> LaunchPlan:
    """The launch of kernel plugin `name` for input shapes / dtype names in spec order (module doc)."""
    spec = get_kernel_spec(name)
    spec.check_attrs(attrs)
    named = spec._named([tuple(x) for x in shapes])
    out_dtypes = spec.output_dtypes(list(dtypes))
    dt = dict(zip(spec.inputs, dtypes))
    extras, grid, cx, warps, stages = _DESCRIBE[name](named, dt, attrs, target)
    ptr = {}
    for n, d in (*zip(spec.inputs, dtypes), *zip(spec.output_names, out_dtypes)):
        if d not in TRITON_DTYPES:
            raise UnsupportedOpError(f"plugin {spec.plugin_id}: {n} has dtype {d}, not one of {sorted(TRITON_DTYPES)}")
        ptr[n] = "*" + TRITON_DTYPES[d]
    from v4compile.plugins.tensorrt.aot_kernels import ENTRIES

    order = list(ENTRIES[name].arg_names)  # the entry kernel's parameters, declaration order
    if order[:len(spec.arg_names)] != list(spec.arg_names) or set(order[len(spec.arg_names):]) != set(cx):
        raise ExportError(f"plugin {spec.plugin_id}: entry kernel parameters {order} != {list(spec.arg_names)} + "
                          f"constexprs {sorted(cx)}")
    sig = {n: ptr.get(n, "constexpr" if n in cx else "i32") for n in order}
    cx = {n: cx[n] for n in order if n in cx}
    return LaunchPlan(name, sig, cx, tuple(extras), tuple(grid), warps, stages)


# ---------------------------------------------------------------------------------------------- compile


@dataclass(frozen=True)
class CompiledPlugin:
    """What `trtp.aot_impl` returns besides the launch expressions: the kernel name, its PTX, block and smem."""

    name: str
    ptx: str
    num_warps: int
    block_x: int
    shared_mem: int
    kernel: Any = field(default=None, compare=False, repr=False)  # the triton CompiledKernel (GPU emulation)


_COMPILED: dict[Any, CompiledPlugin] = {}


def compile_plan(plan: LaunchPlan, target: AotTarget = H200) -> CompiledPlugin:
    """Compile the plan's entry kernel to PTX for `target` (cached per signature / constexprs / options)."""
    key = (plan.plugin, tuple(plan.signature.items()), tuple(sorted(plan.constexprs.items())), plan.num_warps,
           plan.num_stages, target)
    if key in _COMPILED:
        return _COMPILED[key]
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = plan.kernel
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise ExportError(f"AOT compile of {plan.plugin}: its entry kernel is a {type(fn).__name__}, not a JITFunction "
                          "(TRITON_INTERPRET=1 replaces @triton.jit kernels); compile in a process without it")
    options = {"num_warps": plan.num_warps}
    if plan.num_stages is not None:
        options["num_stages"] = plan.num_stages
    try:
        k = triton.compile(ASTSource(fn=fn, signature=dict(plan.signature), constexprs=dict(plan.constexprs)),
                           target=GPUTarget("cuda", target.arch, target.warp_size), options=options)
    except Exception as e:  # Triton raises CompilationError, RuntimeError (ptxas), ...
        raise ExportError(f"AOT compile of plugin {plan.plugin} for sm_{target.arch} failed: {type(e).__name__}: "
                          f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}") from e
    check_launch_metadata(plan.plugin, k.metadata)
    out = CompiledPlugin(k.name, k.asm["ptx"], k.metadata.num_warps, k.metadata.num_warps * target.warp_size,
                         k.metadata.shared, k)
    _COMPILED[key] = out
    return out


def check_launch_metadata(plugin: str, md: Any) -> None:
    """Refuse what TensorRT's AOT launch cannot provide: scratch memory (it passes null), clusters, PDL."""
    bad = {f: getattr(md, f, None) for f in ("global_scratch_size", "profile_scratch_size") if getattr(md, f, 0)}
    if getattr(md, "num_ctas", 1) != 1:
        bad["num_ctas"] = md.num_ctas
    for f in ("launch_cooperative_grid", "launch_pdl", "tensordesc_meta"):
        if getattr(md, f, None):
            bad[f] = getattr(md, f)
    if bad:
        raise ExportError(f"AOT plugin {plugin}: the compiled kernel needs {bad}, which a TensorRT AOT launch "
                          "does not provide")


def ptx_entry(ptx: str) -> tuple[str, list[str]]:
    """(entry name, parameter kinds 'ptr' / 'u32' / ...) of the one .entry in `ptx`."""
    m = re.search(r"\.visible\s+\.entry\s+(\w+)\s*\((.*?)\)", ptx, re.S)
    if m is None:
        raise ExportError("no .entry in the PTX")
    kinds = []
    for p in re.findall(r"\.param\s+([^,]*?)\s+\w+_param_\d+", m.group(2)):
        kinds.append("ptr" if ".ptr" in p else p.split()[0].lstrip("."))
    return m.group(1), kinds


# ---------------------------------------------------------------------------------------------- emulation


_POISON: list[bool] = []
_COMPILED_LAUNCH: list[bool] = []


@contextlib.contextmanager
def poisoned() -> Iterator[None]:
    """Inside the block, `launch` fills every non-aliased output with NaN / -1 before the kernel runs (tests: an
    element a kernel should write but does not shows as a mismatch)."""
    _POISON.append(True)
    try:
        yield
    finally:
        _POISON.pop()


@contextlib.contextmanager
def compiled_launches() -> Iterator[None]:
    """Inside the block (CUDA tensors on an sm_90 GPU), `launch` runs the AOT-compiled binary of compile_plan with
    TensorRT's argument list (inputs, int32 extras, outputs; scratch pointers null) instead of the jit entry."""
    _COMPILED_LAUNCH.append(True)
    try:
        yield
    finally:
        _COMPILED_LAUNCH.pop()


def launch(name: str, tensors: Sequence[Any], attrs: dict[str, Any], target: AotTarget = H200) -> tuple[Any, ...]:
    """Run kernel plugin `name` as TensorRT would (module doc) and return its outputs in spec order."""
    import torch

    spec = get_kernel_spec(name)
    dtypes = [str(t.dtype).removeprefix("torch.") for t in tensors]
    plan = describe(name, [tuple(t.shape) for t in tensors], dtypes, attrs, target)
    shapes = spec.output_shapes([tuple(t.shape) for t in tensors], attrs)
    ins = list(tensors)
    poison = bool(_POISON)
    outs = []
    for j, (shape, d) in enumerate(zip(shapes, spec.output_dtypes(dtypes))):
        if j >= spec.n_results:  # aliased: the output IS the input's buffer, updated in place
            i = spec.inputs.index(spec.updates[j - spec.n_results])
            ins[i] = ins[i].clone()
            outs.append(ins[i])
            continue
        dtype = getattr(torch, d)
        fill = float("nan") if dtype.is_floating_point else -1
        outs.append(torch.full(shape, fill, dtype=dtype, device=tensors[0].device) if poison
                    else torch.empty(shape, dtype=dtype, device=tensors[0].device))
    extras, grid = plan.concrete({})
    if _COMPILED_LAUNCH:
        # triton's launcher for a CompiledKernel takes every signature entry, constexprs included (it skips them)
        compile_plan(plan, target).kernel[grid](*ins, *extras, *outs, *plan.constexprs.values())
    else:
        plan.kernel[grid](*ins, *extras, *outs, **plan.constexprs, num_warps=plan.num_warps,
                          **({"num_stages": plan.num_stages} if plan.num_stages is not None else {}))
    return tuple(outs)

"""AOT TensorRT plugins of the FP8 MoE experts (moe_experts_fp8 = six kernel plugins of plugins/triton/moe_gemm's
grouped path), without TensorRT: plans against the launcher (two shapes, fp32 / bf16 activations), symbolic plans,
sm_90 PTX with TensorRT's parameter list, and the composition run through the Triton interpreter (TensorRT's
argument order, outputs NaN-poisoned) against the reference body v4::moe_experts on e4m3 experts."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import v4compile.model.ops  # noqa: F401  (registers torch.ops.v4.*)
from v4compile.plugins.tensorrt import aot
from v4compile.plugins.tensorrt.dims import Sym, evaluate
from v4compile.plugins.tensorrt.specs import KERNEL_SPECS
from v4compile.plugins.triton import moe_gemm as mg
from v4compile.quant import formats as qf
from v4compile.targets import trt_ops
from v4compile.validate import TOLERANCES, calc_diff, nonfinite_mismatch

from test_tensorrt_aot import (compile_cases, _compare, _LaunchRecorder, _PlanRecorder,  # tests/plugins
                               check_compiled_entry)

pytestmark = pytest.mark.usefixtures("exact_interpreter_casts")  # e4m3 casts as the GPU's (conftest.py)
MOE_KERNELS = ["moe_quant_act", "moe_count", "moe_scatter", "moe_gemm1", "moe_gemm2", "moe_combine"]
LIMIT = 10.0
# (E, d, I, k, weight block): the tiny model's experts (128x128 blocks) and a wider stack with the per-row scales
# of an exact MXFP4 repack
SHAPES = {"tiny": (8, 256, 128, 2, (128, 128)), "rows": (16, 512, 256, 4, (1, 128))}


def _experts(E, d, inter, block, device="cpu", seed=0):
    """e4m3 w1, s1, w3, s3, w2, s2 with float32 block scales (what the fp8 pipeline leaves after lowering)."""
    if device == "expand":  # V4-Flash sizes for the plans only: no storage (aot.describe reads shapes)
        out = []
        for O, K in ((inter, d), (inter, d), (d, inter)):
            out += [torch.zeros(1, 1, 1, dtype=torch.float8_e4m3fn).expand(E, O, K),
                    torch.zeros(1, 1, 1).expand(E, O // block[0], K // block[1])]
        return out
    g = torch.Generator().manual_seed(seed)
    out = []
    for O, K in ((inter, d), (inter, d), (d, inter)):
        q, s = qf.quant_fp8_block(torch.randn(E, O, K, generator=g) / K ** 0.5, block)
        out += [q, qf.scale_to_float(s)]
    return out


def _tokens(N, d, E, k, act, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, d, generator=g) * 2).to(act)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
    w = torch.rand(N, k, generator=g) + 0.2
    return x.to(device), w.to(device), ids.to(device)


def _call(body, x, w, ids, ex):
    w1, s1, w3, s3, w2, s2 = ex
    return body(x, w, ids, w1, s1, w3, s3, w2, s2, LIMIT)


@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_moe_plans_match_the_triton_launcher_under_export(monkeypatch, shape, act):
    """The composition's six plans == moe_experts_launch's launches for a token count unknown at build time (its
    torch.export case: the grouped path with pick_configs("grouped", None, ...)), for 1 and 77 tokens."""
    E, d, inter, k, block = SHAPES[shape]
    launches, plans = _LaunchRecorder(), _PlanRecorder()
    monkeypatch.setattr(mg, "launcher", launches)
    monkeypatch.setattr(aot, "launch", plans)
    ex = _experts(E, d, inter, block)
    for N in (1, 77):
        x, w, ids = _tokens(N, d, E, k, act)
        w1, s1, w3, s3, w2, s2 = ex
        mg.moe_experts_launch(x, w, ids, w1, w3, s1, s3, w2, s2, LIMIT, 0, "grouped", aot.moe_configs(k, E, inter, d))
        _call(trt_ops.AOT_BODIES["moe_experts_fp8"], x, w, ids, ex)
    assert [p.plugin for p in plans.plans] == MOE_KERNELS * 2
    assert [c[0].fn.__name__ for c in launches.calls] == [KERNEL_SPECS[n].kernel.split(".")[1] for n in
                                                          MOE_KERNELS] * 2
    for plan, call in zip(plans.plans, launches.calls):
        _compare(plan, call)
    gemm1 = plans.plans[3]
    assert gemm1.constexprs["ROUND"] == (act == torch.bfloat16) and gemm1.constexprs["BM"] == 64


def _moe_cases(N, shape_key, act, device="cpu"):
    E, d, inter, k, block = SHAPES[shape_key] if shape_key in SHAPES else shape_key
    rec = _PlanRecorder()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(aot, "launch", rec)
        x, w, ids = _tokens(N, d, E, k, act)
        _call(trt_ops.AOT_BODIES["moe_experts_fp8"], x, w, ids, _experts(E, d, inter, block, device))
    return rec.cases


def test_moe_symbolic_plans_evaluate_to_the_concrete_plans():
    """Plans and output shapes from a symbolic token count N (the data-dependent buffer sizes are shape
    expressions: t_max = min(N k, cdiv(N k, BM) + E)) evaluate to the concrete ones."""
    env, n = {"N": 37}, Sym.dim("N")
    E, d, inter, k, _ = SHAPES["tiny"]
    for label, name, shapes, dtypes, attrs in _moe_cases(37, "tiny", torch.bfloat16):
        spec = KERNEL_SPECS[name]
        rows = {37: n, 37 * k: n * k}
        sym = [list(s) for s in shapes]
        for i, s in enumerate(shapes):
            if spec.inputs[i] in ("x", "xq", "xs", "weights", "ids", "rank", "o"):
                sym[i][0] = rows.get(s[0], s[0])
            elif spec.inputs[i] in ("sroute", "h", "hs"):
                from v4compile.plugins.tensorrt.specs import moe_tiles

                sym[i][0] = moe_tiles(n * k, 64, E) * 64
                assert evaluate(sym[i][0], env) == s[0], (name, spec.inputs[i], s)
        sp, cp = aot.describe(name, sym, dtypes, attrs), aot.describe(name, shapes, dtypes, attrs)
        assert sp.concrete(env) == cp.concrete({}) and sp.constexprs == cp.constexprs, name
        got = [tuple(evaluate(x, env) for x in s) for s in spec.output_shapes(sym, attrs)]
        assert got == spec.output_shapes(shapes, attrs), name


def test_moe_kernel_plugins_compile_to_sm90_ptx_with_the_tensorrt_parameter_list():
    """tiny fp32 (the CI model's shapes) and V4-Flash bf16 (E 256, d 4096, I 2048, top-6; weights expanded from
    one element): every launch compiles for sm_90 in a process without TRITON_INTERPRET."""
    cases = [(f"tiny fp32 {c[1]}", *c[1:]) for c in _moe_cases(5, "tiny", torch.float32)]
    cases += [(f"flash bf16 {c[1]}", *c[1:]) for c in _moe_cases(3, (256, 4096, 2048, 6, (128, 128)),
                                                                     torch.bfloat16, "expand")]
    results = compile_cases(cases)
    assert [r["name"] for r in results] == MOE_KERNELS * 2
    for r in results:
        check_compiled_entry(r)


@pytest.mark.parametrize("shape,act", [("tiny", torch.float32), ("tiny", torch.bfloat16), ("rows", torch.bfloat16)])
def test_moe_composition_matches_reference_body(shape, act):
    """Each kernel launched as TensorRT launches its plugin (interpreter), outputs NaN-poisoned: y against
    v4::moe_experts on the e4m3 experts and against the ONNX reference function's body, within the fp8 kernel
    tolerance; tokens 1 (decode) and 37 (prefill), including ids of a token repeated across tokens."""
    E, d, inter, k, block = SHAPES[shape]
    ex = _experts(E, d, inter, block)
    for N in (1, 37):
        x, w, ids = _tokens(N, d, E, k, act, seed=N)
        ref = _call(torch.ops.v4.moe_experts, x, w, ids, ex)
        body = _call(trt_ops.BODIES_TRT["moe_experts_fp8"], x, w, ids, ex)
        with aot.poisoned():
            got = _call(trt_ops.AOT_BODIES["moe_experts_fp8"], x, w, ids, ex)
        tol = TOLERANCES["kernel"]["fp8"]
        for what, a, b in (("composition vs v4::moe_experts", got, ref), ("onnx body vs v4::moe_experts", body, ref)):
            assert nonfinite_mismatch(a, b) == 0 and calc_diff(a, b) < tol, (what, N, calc_diff(a, b))

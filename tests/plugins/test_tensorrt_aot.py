"""AOT TensorRT plugins without TensorRT (plugins/tensorrt/aot.py, aot_kernels.py, specs.KERNEL_SPECS).

- every per-kernel plugin compiles to sm_90 PTX (one subprocess without TRITON_INTERPRET, tiny fp32 and V4-Flash
  bf16 shapes); the PTX entry is the kernel name returned, its parameters are what TensorRT passes (inputs,
  int32 extras, outputs, then Triton's two scratch pointers, which TensorRT pads with null);
- each fused op's AOT composition issues the same kernels, in the same order, with the same grids, warps,
  block sizes and scalar arguments as the plugins/triton launchers for two concrete shapes;
- symbolic (dims.Sym) plans evaluate to the concrete ones (no branch on a dynamic dim);
- the compositions, each kernel launched as TensorRT would launch it (interpreter), match the fused ops' reference
  bodies over prefill / decode / continuation calls, outputs NaN-poisoned first;
- the TensorRT expansion function lists one plugin node per launch and prepares into an AOT model.
TensorRT itself is absent: the registration test skips with the reason."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib
import json
import subprocess
import sys
from dataclasses import replace

import pytest

import torch

from v4compile.errors import ExportError
from v4compile.model.ops import positions_of, window_indices
from v4compile.plugins.tensorrt import aot
from v4compile.plugins.tensorrt.aot_kernels import ENTRIES
from v4compile.plugins.tensorrt.dims import Sym, evaluate
from v4compile.plugins.tensorrt.specs import (AOT_BY_REFERENCE, DOMAIN, EXPAND_DOMAIN, KERNEL_DOMAIN, KERNEL_SPECS,
                                              SPECS, TOPK_MAX_CHUNKS, TOPK_WS_INTS)
from v4compile.plugins.triton import compressor, indexer_topk, moe_route, radix_topk, sparse_attention
from v4compile.targets import trt_ops
from v4compile.validate import assert_kernel_close

from aot_cases import F, FLASH, I32, I64, TINY, _attrs, _csa_io, _drive, _hca_io, _route_io, _zeros  # tests/plugins


class _PlanRecorder:
    """Stand-in for aot.launch: records each plugin launch (label, name, shapes, dtypes, attrs) and its
    LaunchPlan, returns zeros (aliased outputs: the inputs)."""

    def __init__(self):
        self.plans, self.cases, self.label = [], [], ""

    def __call__(self, name, tensors, attrs, target=aot.H200):
        spec = KERNEL_SPECS[name]
        dtypes = [str(t.dtype).removeprefix("torch.") for t in tensors]
        self.cases.append((self.label, name, [tuple(t.shape) for t in tensors], dtypes, dict(attrs)))
        self.plans.append(aot.describe(name, [tuple(t.shape) for t in tensors], dtypes, attrs))
        shapes = spec.output_shapes([tuple(t.shape) for t in tensors], attrs)
        outs = [torch.zeros(s, dtype=getattr(torch, dt)) for s, dt in zip(shapes, spec.output_dtypes(dtypes))]
        for j, u in enumerate(spec.updates):
            outs[spec.n_results + j] = tensors[spec.inputs.index(u)].clone()
        return tuple(outs)


class _LaunchRecorder:
    """Stand-in for plugins/triton's `launcher`: records (kernel, grid, args, kwargs), runs nothing."""

    def __init__(self):
        self.calls = []

    def __call__(self, kernel, *tensors):
        rec = self

        class _Grid:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: rec.calls.append((kernel, tuple(grid), args, kwargs))

        return _Grid()


def _inner_kernel(spec):
    module, fn = spec.kernel.split(".")
    return getattr(importlib.import_module(f"v4compile.plugins.triton.{module}"), fn)


def _same_scalar(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return torch.tensor(float(a), dtype=torch.float32).item() == torch.tensor(float(b), dtype=torch.float32).item()
    return int(a) == int(b)


def _compare(plan, call):
    """One AOT plan against one recorded launcher call: kernel, grid, warps / stages, constexprs, scalars."""
    spec = KERNEL_SPECS[plan.plugin]
    kernel, grid, args, kwargs = call
    inner = _inner_kernel(spec)
    assert kernel is inner, f"{plan.plugin}: the launcher ran {kernel}, the plugin's kernel is {spec.kernel}"
    extras, aot_grid = plan.concrete({})
    assert aot_grid == tuple(grid) + (1,) * (3 - len(grid)), (plan.plugin, aot_grid, grid)
    assert kwargs.get("num_warps") == plan.num_warps, (plan.plugin, kwargs.get("num_warps"), plan.num_warps)
    assert kwargs.get("num_stages") == plan.num_stages, (plan.plugin, kwargs.get("num_stages"), plan.num_stages)
    shared = [k for k in kwargs if k in plan.constexprs]
    assert shared, f"{plan.plugin}: no constexpr in common with the launcher's {sorted(kwargs)}"
    for k in shared:
        assert plan.constexprs[k] == kwargs[k], (plan.plugin, k, plan.constexprs[k], kwargs[k])
    named = dict(zip(inner.arg_names, args))
    checked = 0
    for p, v in named.items():
        if p in spec.extras:
            want = extras[spec.extras.index(p)]
        elif p.upper() in plan.constexprs and not isinstance(v, torch.Tensor):
            want = plan.constexprs[p.upper()]
        else:
            continue
        assert _same_scalar(v, want), f"{plan.plugin}: launcher passes {p}={v}, the AOT plugin {want}"
        checked += 1
    assert checked, f"{plan.plugin}: no scalar argument compared"


@pytest.fixture
def recorders(monkeypatch):
    """Launcher calls of plugins/triton and the plans of the AOT compositions, on an H200 (132 SMs)."""
    launches, plans = _LaunchRecorder(), _PlanRecorder()
    for mod in (compressor, indexer_topk, radix_topk, sparse_attention, moe_route):
        monkeypatch.setattr(mod, "launcher", launches)
    monkeypatch.setattr(indexer_topk, "_sm_count", lambda device: aot.H200.n_sms)
    monkeypatch.setattr(radix_topk, "_sm_count", lambda device: aot.H200.n_sms)
    monkeypatch.setattr(aot, "launch", plans)
    return launches, plans


def _attention_launchers(a, d, csa: bool) -> None:
    """What the GPU lowering runs for one csa / hca_attention call (launchers with the sm_90 choices)."""
    q, kv, start, ring = a[:4]
    T, D = q.shape[1], d["D"]
    m = 4 if csa else d["m"]
    compressor.compress_launch(*a[4:9], start, *[t.clone() for t in a[9:12]], m, 1e-6, False)
    if csa:
        ikvp, igp, iape, inw, ikvs, iscs, ic = a[14:21]
        compressor.compress_launch(ikvp, igp, iape, inw, a[8], start, ikvs.clone(), iscs.clone(), ic.clone(), 4,
                                   1e-6, True)
        pos = positions_of(start, T)
        picks = indexer_topk.indexer_topk_launch(a[12], a[13], ic[:, :-1], pos, 4, d["topk"],
                                                 config=aot.score_config(T, d["Hi"]),
                                                 topk_config=aot.topk_config(d["topk"]))
        kv2 = a[11]
    else:
        kv2 = a[11]
        picks = torch.zeros(q.shape[0], T, kv2.shape[1] - 1, dtype=torch.int32)
    cfg = sparse_attention.pick_config(D, torch.device("cuda"))
    sparse_attention.sparse_attention_launch(q, torch.cat((ring, kv), 1), window_indices(start, T, ring.shape[1]),
                                             kv2, picks, a[-1], D ** -0.5, config=cfg, num_splits=1)


@pytest.mark.parametrize("B,T", [(1, 1), (3, 37)])
@pytest.mark.parametrize("op", ["csa_attention", "hca_attention"])
def test_attention_plans_match_the_triton_launchers(recorders, op, B, T):
    launches, plans = recorders
    csa = op == "csa_attention"
    shapes, dtypes = (_csa_io if csa else _hca_io)(B, T, TINY, F)
    a = _zeros(shapes, dtypes)
    _attention_launchers(a, TINY, csa)
    trt_ops.AOT_BODIES[op](*a, *_attrs(op, TINY))
    names = [p.plugin for p in plans.plans]
    assert len(plans.plans) == len(launches.calls), (names, [c[0].fn.__name__ for c in launches.calls])
    for plan, call in zip(plans.plans, launches.calls):
        _compare(plan, call)


@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_hash", [False, True])
def test_router_plan_matches_the_triton_launcher(recorders, monkeypatch, act, use_hash):
    launches, plans = recorders
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the launcher's interpreter-only fp32 upcast would differ
    for n in (1, 77):
        shapes, dtypes = _route_io(n, TINY, str(act).removeprefix("torch."), use_hash)
        a = _zeros(shapes, dtypes)
        moe_route.moe_route_launch(*a, TINY["k"], 1.5, use_hash, split=1)
        trt_ops.AOT_BODIES["moe_route"](*a, TINY["k"], 1.5, use_hash)
    assert [p.plugin for p in plans.plans] == ["moe_route"] * 2 and len(launches.calls) == 2
    for plan, call in zip(plans.plans, launches.calls):
        _compare(plan, call)


def test_config_choices_are_the_launchers_cuda_choices(monkeypatch):
    """score / top-k configs: what pick_score_config / pick_topk_config return for a CUDA device; top-k as the
    plugin graph runs it (separate finish launch, third histogram pass), with the launcher's capacity."""
    monkeypatch.setattr(indexer_topk, "INTERPRET", False)
    monkeypatch.setattr(radix_topk, "INTERPRET", False)
    cuda = torch.device("cuda")
    for T in (1, 7):
        for hi in (4, 64):
            assert aot.score_config(T, hi) == indexer_topk.pick_score_config(T, hi, cuda), (T, hi)
    assert aot.score_config(Sym.dim("T"), 64) == aot.score_config(7, 64)  # a dynamic T is a prefill length
    for k in (4, 512, 1024, 8192):
        got, launcher = aot.topk_config(k), radix_topk.pick_topk_config(cuda, k=k)
        assert got.cand == launcher.cand and not got.fuse_finish and not got.fuse_hist1 and got.hist3, (k, got)
        assert got in [replace(c, cand=got.cand) for c in radix_topk.TOPK_CONFIGS], got


def test_constants_and_tables_agree_with_the_kernels():
    assert TOPK_MAX_CHUNKS == radix_topk.MAX_CHUNKS.value and TOPK_WS_INTS == radix_topk.WS_INTS.value
    assert set(trt_ops.AOT_BODIES) | set(AOT_BY_REFERENCE) == set(SPECS) and not set(trt_ops.AOT_BODIES) & set(
        AOT_BY_REFERENCE)
    assert set(ENTRIES) == set(KERNEL_SPECS)
    for name, spec in KERNEL_SPECS.items():
        fn = ENTRIES[name]
        constexpr = {n for n, a in fn.fn.__annotations__.items() if "constexpr" in str(a)}
        runtime = [n for n in fn.arg_names if n not in constexpr]
        assert tuple(runtime) == spec.arg_names, (name, runtime, spec.arg_names)
        assert fn.fn.__name__ == f"v4trt_{name}" and _inner_kernel(spec) is not None
        assert spec.plugin_id == f"v4trt_aot::{name}"


def _all_cases(B, T, d, act):
    """(label, plugin, shapes, dtypes, attrs) of every kernel plugin launch the three compositions make."""
    rec = _PlanRecorder()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(aot, "launch", rec)
        for op, io in (("csa_attention", _csa_io), ("hca_attention", _hca_io)):
            rec.label = op
            shapes, dtypes = io(B, T, d, act)
            trt_ops.AOT_BODIES[op](*_zeros(shapes, dtypes), *_attrs(op, d))
        for use_hash in (False, True):
            rec.label = "hash" if use_hash else "biased"
            shapes, dtypes = _route_io(B * T, d, act, use_hash)
            trt_ops.AOT_BODIES["moe_route"](*_zeros(shapes, dtypes), d["k"], 1.5, use_hash)
    return rec.cases


def test_symbolic_plans_evaluate_to_the_concrete_plans():
    """Plans from Sym batch / length (what TensorRT's shape expressions see) == plans from ints, and the output
    shape rules too: nothing branches on a dynamic dim."""
    B, T = Sym.dim("B"), Sym.dim("T")
    env = {"B": 3, "T": 11}  # no other dim of TINY equals 3, 11, 33 or 19
    for label, name, shapes, dtypes, attrs in _all_cases(3, 11, TINY, F):
        sym_shapes = [tuple(_symbolic(x, env, B, T) for x in s) for s in shapes]
        sp, cp = aot.describe(name, sym_shapes, dtypes, attrs), aot.describe(name, shapes, dtypes, attrs)
        assert sp.concrete(env) == cp.concrete({}), (label, name)
        assert sp.constexprs == cp.constexprs and sp.signature == cp.signature, (label, name)
        spec = KERNEL_SPECS[name]
        got = [tuple(evaluate(x, env) for x in s) for s in spec.output_shapes(sym_shapes, attrs)]
        assert got == spec.output_shapes(shapes, attrs), (label, name)


def _symbolic(x, env, B, T):
    """The Sym expression a concrete dim of the 3 x 11 call stands for (batch, length, rows, window + length)."""
    table = {env["B"]: B, env["T"]: T, env["B"] * env["T"]: B * T, TINY["W"] + env["T"]: TINY["W"] + T}
    return table.get(x, x)


COMPILE_SCRIPT = r"""
import dataclasses, json, sys
from v4compile.plugins.tensorrt.aot import compile_plan, describe, ptx_entry
ints_as_one = sys.argv[1:] == ["ints-as-1"]  # every int32 argument a constexpr 1, as Triton's JIT passes a 1
out = []
for label, name, shapes, dtypes, attrs in json.load(sys.stdin):
    try:
        p = describe(name, shapes, dtypes, attrs)
        if ints_as_one:
            ints = [k for k, v in p.signature.items() if v == "i32"]
            p = dataclasses.replace(p, signature={k: "constexpr" if k in ints else v for k, v in p.signature.items()},
                                    constexprs={**p.constexprs, **{k: 1 for k in ints}})
        c = compile_plan(p)
        entry, kinds = ptx_entry(c.ptx)
        out.append(dict(label=label, name=name, kernel=c.name, entry=entry, kinds=kinds, block_x=c.block_x,
                        warps=c.num_warps, shared=c.shared_mem, ptx=len(c.ptx)))
    except Exception as e:
        out.append(dict(label=label, name=name, error=f"{type(e).__name__}: {e}"))
print(json.dumps(out))
"""


def compile_cases(cases: list, ints_as_one: bool = False) -> list[dict]:
    """COMPILE_SCRIPT's result per case, run in a process without TRITON_INTERPRET (the interpreter replaces
    @triton.jit kernels)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, *(["ints-as-1"] if ints_as_one else [])],
                         input=json.dumps(cases), capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def compiled():
    """Compile every kernel plugin launch of the tiny fp32 and the V4-Flash bf16 compositions for sm_90, once, in
    a process without TRITON_INTERPRET (the interpreter replaces @triton.jit kernels)."""
    cases = []
    for tag, d, act in (("tiny fp32", TINY, F), ("flash bf16", FLASH, "bfloat16")):
        seen = set()
        for label, name, shapes, dtypes, attrs in _all_cases(2, 3, d, act):
            key = (name, tuple(dtypes), json.dumps(attrs, sort_keys=True), label)
            if key not in seen:
                seen.add(key)
                cases.append((f"{tag} {label}", name, shapes, dtypes, attrs))
    return cases, compile_cases(cases)


def test_every_kernel_plugin_compiles_to_sm90_ptx_with_the_tensorrt_parameter_list(compiled):
    cases, results = compiled
    moe = {n for n in KERNEL_SPECS if n.startswith("moe_") and n != "moe_route"}  # test_tensorrt_aot_moe.py
    assert len(results) == len(cases) and {r["name"] for r in results} == set(KERNEL_SPECS) - moe
    for r in results:
        check_compiled_entry(r)


def test_entry_kernels_compile_with_integer_arguments_specialised_to_one():
    """Triton's JIT passes an integer argument equal to 1 (T at decode, one cache block) as a constexpr, a Python
    int: an entry kernel that calls `.to` on it fails to compile (the GPU test of the JIT entries at T = 1 did, on
    an H100 in session 8). Every V4-Flash entry compiled with all its int32 arguments as constexpr 1."""
    seen, cases = set(), []
    for label, name, shapes, dtypes, attrs in _all_cases(2, 3, FLASH, "bfloat16"):
        key = (name, json.dumps(attrs, sort_keys=True))
        if key not in seen:
            seen.add(key)
            cases.append((label, name, shapes, dtypes, attrs))
    results = compile_cases(cases, ints_as_one=True)
    assert {r["name"] for r in results} == {n for _, n, *_ in cases} and len(results) >= 8
    assert [r for r in results if "error" in r] == []


def check_compiled_entry(r: dict) -> None:
    """One COMPILE_SCRIPT result: compiled, the PTX entry is the kernel named, its parameters are TensorRT's list
    (inputs, int32 extras, outputs, Triton's hidden scratch pointers), launch fits sm_90."""
    assert "error" not in r, r
    spec = KERNEL_SPECS[r["name"]]
    assert r["entry"] == r["kernel"] == f"v4trt_{r['name']}", r
    want = ["ptr"] * len(spec.inputs) + ["u32"] * len(spec.extras) + ["ptr"] * len(spec.outputs)
    assert r["kinds"] == want + ["ptr"] * aot.HIDDEN_PARAMS, (r["label"], r["kinds"], want)
    assert r["block_x"] == 32 * r["warps"] and r["shared"] <= 232448, r  # sm_90: 227 KiB per block


def test_launch_metadata_check_refuses_what_tensorrt_cannot_launch():
    class Md:
        global_scratch_size, profile_scratch_size, num_ctas, launch_pdl = 0, 0, 1, False
        launch_cooperative_grid, tensordesc_meta = False, []

    aot.check_launch_metadata("x", Md())
    Md.global_scratch_size = 256
    with pytest.raises(ExportError, match="global_scratch_size"):
        aot.check_launch_metadata("x", Md())


# ---------------------------------------------------------------------------------------------- numerics


def test_csa_composition_matches_reference_prefill_decode_continuation():
    _drive("csa_attention", [13, 1, 9, 1], [0, 4])


def test_hca_composition_matches_reference_prefill_decode_continuation():
    _drive("hca_attention", [21, 1, 12], [0, 16])


@pytest.mark.parametrize("use_hash", [False, True])
def test_router_composition_matches_reference(use_hash):
    g = torch.Generator().manual_seed(3)
    shapes, dtypes = _route_io(37, TINY, F, use_hash)
    a = [torch.randn(s, generator=g) if dt == F else torch.randint(0, TINY["E"] if i == 3 else TINY["V"], s,
                                                                    generator=g)
         for i, (s, dt) in enumerate(zip(shapes, dtypes))]
    ref = trt_ops.BODIES_TRT["moe_route"](*a, TINY["k"], 1.5, use_hash)
    with aot.poisoned():
        got = trt_ops.AOT_BODIES["moe_route"](*a, TINY["k"], 1.5, use_hash)
    assert torch.equal(got[1], ref[1]), "expert ids differ"
    assert_kernel_close(got[0], ref[0], "fp32", "routing weights")


# ---------------------------------------------------------------------------------------------- TensorRT side


def test_expansion_function_is_one_plugin_node_per_launch_and_prepares_for_an_aot_plan():
    import onnx
    from onnx import helper
    from torch.export import Dim

    from v4compile.plugins.tensorrt.plan import prepare_aot_model
    from v4compile.targets.onnx_functions import function_proto, onnx_attr_values, overload_key

    B, T, spec = 2, 5, SPECS["csa_attention"]
    shapes, dtypes = _csa_io(B, T, TINY, F)
    args = (*_zeros(shapes, dtypes), *_attrs("csa_attention", TINY))
    b, t = Dim("batch", min=1), Dim("seq", min=1)
    kind = {"bt": {0: b, 1: t}, "b": {0: b}, "": {}}
    dyn = tuple(kind[k] for k in ("bt bt b b bt bt _ _ _ b b b bt bt bt bt _ _ b b b _".replace("_", "").split(" ")))
    key = overload_key(spec, onnx_attr_values(spec, args[len(spec.inputs):]))
    fn, _ = function_proto(spec, args, dyn, key, 20, expansion=True)
    kernels = [(n.op_type, {a.name: helper.get_attribute_value(a) for a in n.attribute}) for n in fn.node
               if n.domain == KERNEL_DOMAIN]
    want = ["compress_pool", "compress_state"] * 2 + ["indexer_scores"] + ["topk_hist"] * 3 + \
        ["topk_compact", "topk_finish", "sparse_attention"]
    assert [k for k, _ in kernels] == want
    assert [a["rotate"] for k, a in kernels if k == "compress_pool"] == [0, 1]
    assert [a["level"] for k, a in kernels if k == "topk_hist"] == [1, 2, 3]
    assert all(a["plugin_namespace"] == b"v4trt_aot" for _, a in kernels)
    assert (fn.domain, fn.name, fn.overload) == (EXPAND_DOMAIN, "csa_attention", key)

    def model(functions):
        elem = {F: onnx.TensorProto.FLOAT, I64: onnx.TensorProto.INT64}
        ins = [helper.make_tensor_value_info(n, elem[dt], list(s)) for n, s, dt in zip(spec.inputs, shapes, dtypes)]
        node = helper.make_node("csa_attention", spec.inputs, spec.output_names, domain=DOMAIN, scale=0.1,
                                norm_eps=1e-6, topk=TINY["topk"])
        node.overload = key
        outs = [helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None) for n in spec.output_names]
        m = helper.make_model(helper.make_graph([node], "g", ins, outs), functions=functions,
                              opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(DOMAIN, 1)])
        m.ir_version = 10
        return m

    prepared, counts = prepare_aot_model(model([fn]))
    assert counts == {k: want.count(k) for k in set(want)}
    assert not [n for n in prepared.graph.node if n.domain in (DOMAIN, EXPAND_DOMAIN)]
    assert not [f for f in prepared.functions if f.domain in (DOMAIN, EXPAND_DOMAIN)]
    with pytest.raises(ExportError, match="no expansion function"):
        prepare_aot_model(model([]))


class _Desc:
    """Stand-in for trtp.TensorDesc (shape_expr, dtype, like(), aliased())."""

    def __init__(self, shape, dtype, alias_of=None):
        self.shape_expr, self.dtype, self.alias_of = tuple(shape), dtype, alias_of

    def like(self):
        return _Desc(self.shape_expr, self.dtype)

    def aliased(self):
        return _Desc(self.shape_expr, self.dtype, alias_of=self)


class _Params:
    pass


class _Trtp:
    TensorDesc, KernelLaunchParams = _Desc, _Params
    SymExprs = object

    @staticmethod
    def from_shape_expr(shape, dtype):
        return _Desc(shape, dtype)

    @staticmethod
    def SymIntExprs(n):  # noqa: N802 - tensorrt.plugin's name
        return [None] * n

    @staticmethod
    def SymInt32(e):  # noqa: N802
        return ("SymInt32", e)


class _Trt:
    float32, int64, int32 = "f32", "i64", "i32"


def test_tensorrt_adapters_wire_the_plan_into_the_aot_impl_result(monkeypatch):
    """register / aot_impl functions with TensorRT stand-ins: aliased in-place outputs, grid, block, smem and
    the int32 extras come from the plan (the compile itself is tested above)."""
    from v4compile.plugins.tensorrt import trt_plugins

    spec = KERNEL_SPECS["compress_state"]
    shapes, dtypes = _csa_io(2, 5, TINY, F)
    ins = [_Desc(s, dt) for s, dt in zip([shapes[i] for i in (4, 5, 6, 2, 9, 10, 11)], dtypes)]
    outs = trt_plugins._descriptor(spec, _Trt, _Trtp, aliased=True)(*ins, ratio=4)
    assert [o.alias_of for o in outs] == [ins[4], ins[5]]
    monkeypatch.setattr(aot, "compile_plan", lambda plan, target=aot.H200: aot.CompiledPlugin(
        f"v4trt_{plan.plugin}", ".entry", plan.num_warps, 32 * plan.num_warps, 1234))
    B, T = Sym.dim("B"), Sym.dim("T")
    name, ptx, params, extra = trt_plugins.aot_result(
        KERNEL_SPECS["sparse_attention"], [(B, T, 4, 96), (B, T + 8, 96), (B, T, 8), (B, 17, 96), (B, T, 4), (4,)],
        [F, F, I32, F, I32, F], {"scale": 0.1}, _Trtp)
    plan = aot.describe("sparse_attention", [(B, T, 4, 96), (B, T + 8, 96), (B, T, 8), (B, 17, 96), (B, T, 4), (4,)],
                        [F, F, I32, F, I32, F], {"scale": 0.1})
    assert name == "v4trt_sparse_attention" and ptx == ".entry"
    assert repr((params.grid_x, params.grid_y, params.grid_z)) == repr(plan.grid) and params.shared_mem == 1234
    assert params.block_x == 32 * plan.num_warps
    assert repr(extra) == repr([("SymInt32", e) for e in plan.extras]) and len(extra) == len(plan.extras) == 7
    sig = trt_plugins.aot_signature(spec, _Desc, object)
    assert list(sig.parameters) == [*spec.inputs, *spec.attr_names, "outputs", "tactic"]


def test_kernel_plugins_register_with_tensorrt():
    trtp = pytest.importorskip("tensorrt.plugin", reason="TensorRT >= 10.9 (tensorrt.plugin) is not installed here")
    from v4compile.plugins.tensorrt.trt_plugins import register_kernel_plugins

    register_kernel_plugins()
    for spec in KERNEL_SPECS.values():
        assert spec.plugin_id in trtp.QDP_REGISTRY, spec.plugin_id  # type: ignore[attr-defined]

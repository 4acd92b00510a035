"""tensorrt target, ONNX half: one tiny fp32 export per module (build_tensorrt via="onnx"), then the file is checked
(onnx.checker full check), run with onnxruntime against eager (prefill logits + every updated cache, then a decode
step fed with those caches), its plugin nodes' attributes read back, and the stop-after-ONNX message. Tests that
need TensorRT / Torch-TensorRT skip with the reason."""

import json
import math

import onnx
import pytest
import torch

from v4compile.errors import InputError, TargetError
from v4compile.model.config import ModelConfig
from v4compile.model.reference import ReferenceModel
from v4compile.plugins.tensorrt.specs import AOT_BY_REFERENCE, DOMAIN, EXPAND_DOMAIN, NAMESPACE, SPECS
from v4compile.runtime import manifest as mf
from v4compile.targets.onnx_export import round_e2m1_arith, ue8m0_scale_arith
from v4compile.targets.onnx_functions import node_attrs, overload_key
from v4compile.targets.tensorrt import build_tensorrt, build_plan, have_module, main
from v4compile.validate import TOLERANCES, calc_diff, nonfinite_mismatch

MAX_LEN, MAX_BATCH = 64, 4
pytestmark = pytest.mark.slow  # one tiny ONNX export per module: ~3 min on 2 idle cores (see the report)
NO_TRT = have_module("tensorrt")


@pytest.fixture(scope="module")
def tiny():
    return ReferenceModel(ModelConfig.preset("tiny"), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny):
    """(engine dir, the TargetError message or None when TensorRT finished the build)."""
    out = tmp_path_factory.mktemp("tensorrt") / "tiny.trt"
    if NO_TRT is None:
        return build_tensorrt(tiny, out, via="onnx", max_batch=MAX_BATCH, max_len=MAX_LEN), None
    with pytest.raises(TargetError) as err:
        build_tensorrt(tiny, out, via="onnx", max_batch=MAX_BATCH, max_len=MAX_LEN)
    return out, str(err.value)


@pytest.fixture(scope="module")
def manifest(built):
    return json.loads((built[0] / mf.MANIFEST).read_text())


def test_stops_after_onnx_naming_what_is_missing_and_the_command(built, manifest):
    if NO_TRT is None:
        pytest.skip("TensorRT is installed: the build does not stop after ONNX")
    out, msg = built
    assert "tensorrt does not import" in msg and f"python -m v4compile.targets.tensorrt build-plan {out}" in msg
    assert manifest["artifacts"]["plan"] is None and manifest["artifacts"]["onnx"] == "model.onnx"
    assert mf.file_hashes(out) == manifest["files"]  # a complete, checksummed directory for the ONNX half
    assert manifest["parity"]["ok"] and manifest["parity"]["prefill_logits_calc_diff"] < TOLERANCES["model_logits"]["fp32"]


def test_onnx_passes_full_check_with_external_weights_and_dynamic_dims(built):
    path = built[0] / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    assert (built[0] / "model.onnx.data").stat().st_size > 4 * path.stat().st_size  # weights live outside
    g = onnx.load(str(path), load_external_data=False).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in g.input}
    assert isinstance(dims["tokens"][0], str) and isinstance(dims["tokens"][1], str), dims["tokens"]
    assert dims["start_pos"][0] == dims["tokens"][0] and dims["blocks.1.kv"][0] == dims["tokens"][0]
    assert [o.name for o in g.output][:2] == ["logits", "blocks.0.ring.next"]


def _expected_plugin_nodes(cfg):
    """(op, attrs) per plugin node in layer order, derived from the config alone."""
    scale = cfg.head_dim ** -0.5
    want = []
    for i, r in enumerate(cfg.compress_ratios[:cfg.n_layers]):
        if r == 4:
            want.append(("csa_attention", {"scale": scale, "norm_eps": cfg.norm_eps, "topk": cfg.index_topk}))
        elif r:
            want.append(("hca_attention", {"scale": scale, "ratio": r, "norm_eps": cfg.norm_eps}))
        want.append(("moe_route", {"topk": cfg.n_activated_experts, "route_scale": cfg.route_scale,
                                   "hash": int(i < cfg.n_hash_layers)}))
        want.append(("moe_experts", {"swiglu_limit": cfg.swiglu_limit}))
    return want


def test_plugin_node_attributes_round_trip(built, manifest, tiny):
    """export -> load -> attributes == the graph's op arguments (manifest) == what the config implies."""
    model = onnx.load(str(built[0] / "model.onnx"), load_external_data=False)
    nodes = [n for n in model.graph.node if n.domain == DOMAIN]
    got = [(n.op_type, node_attrs(n)) for n in nodes]
    want = _expected_plugin_nodes(tiny.cfg)
    recorded = [(p["op"], p["attrs"]) for p in manifest["plugins"]["nodes"]]
    assert [op for op, _ in got] == [op for op, _ in want] == [op for op, _ in recorded]
    for (op, a), (_, w), (_, r) in zip(got, want, recorded):
        assert a.pop("plugin_namespace") == NAMESPACE.encode() and a.pop("plugin_version") == b"1"
        assert sorted(a) == sorted(SPECS[op].attr_names)
        for k, v in a.items():
            assert math.isclose(v, w[k], rel_tol=1e-7) and math.isclose(v, float(r[k]), rel_tol=1e-7), (op, k, v, w, r)
    functions = {(f.domain, f.name, f.overload): f for f in model.functions if f.domain == DOMAIN}
    for n in nodes:
        f = functions[(DOMAIN, n.op_type, n.overload)]
        assert n.overload == overload_key(SPECS[n.op_type], node_attrs(n))
        assert len(f.input) == len(n.input) and len(f.output) == len(n.output) == len(SPECS[n.op_type].outputs)
    assert {(d, name) for d, name, _ in functions} == {(DOMAIN, op) for op, _ in want}


def test_aot_expansions_prepare_into_one_kernel_plugin_per_launch(built, manifest, tiny):
    """Every csa / hca / moe_route overload carries its expansion (domain v4.trt.expand); prepared for an AOT
    plan the graph holds standard ops plus v4.trt.aot kernel plugin nodes only, moe_experts inlined."""
    from v4compile.plugins.tensorrt.plan import prepare_aot_model

    model = onnx.load(str(built[0] / "model.onnx"), load_external_data=False)
    fused = {(n.op_type, n.overload) for n in model.graph.node if n.domain == DOMAIN}
    expansions = {(f.name, f.overload) for f in model.functions if f.domain == EXPAND_DOMAIN}
    assert expansions == {x for x in fused if x[0] not in AOT_BY_REFERENCE}
    ops = [op for op, _ in _expected_plugin_nodes(tiny.cfg)]
    n_csa, n_hca, n_moe = ops.count("csa_attention"), ops.count("hca_attention"), ops.count("moe_route")
    prepared, counts = prepare_aot_model(model)
    assert counts == {"compress_pool": 2 * n_csa + n_hca, "compress_state": 2 * n_csa + n_hca,
                      "indexer_scores": n_csa, "topk_hist": 3 * n_csa, "topk_compact": n_csa, "topk_finish": n_csa,
                      "sparse_attention": n_csa + n_hca, "moe_route": n_moe}, counts
    assert not [n for n in prepared.graph.node if n.domain in (DOMAIN, EXPAND_DOMAIN)]
    assert manifest["plugins"]["aot"]["by_reference"] == ["moe_experts"]


def _compare(what, got, ref, tol):
    bad = nonfinite_mismatch(got, ref)
    diff = calc_diff(got, ref)
    assert bad == 0 and diff < tol, f"{what}: calc_diff {diff:.3e} (bound {tol:.0e}), {bad} inf/NaN mismatches"


def test_onnxruntime_matches_eager_prefill_caches_then_decode(built, manifest, tiny):
    from v4compile.targets.onnx_run import OnnxModel

    om = OnnxModel(built[0] / "model.onnx", manifest["cache"]["tensors"])
    tok = torch.randint(0, tiny.cfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(7))
    cache = tiny.new_cache(2, MAX_LEN)
    with torch.no_grad():
        ref = tiny(tok, 0, cache)
    got, caches = om(tok, 0, om.new_caches(2))
    model_tol, kernel_tol = TOLERANCES["model_logits"]["fp32"], TOLERANCES["kernel"]["fp32"]
    _compare("prefill logits", got, ref, model_tol)
    for (name, t), c in zip(cache.named_tensors().items(), caches, strict=True):
        _compare(f"prefill cache {name}", torch.from_numpy(c), t, kernel_tol)
    nxt = ref[:, -1].argmax(-1, keepdim=True)
    with torch.no_grad():
        ref2 = tiny(nxt, torch.tensor([13, 13]), cache)
    got2, caches2 = om(nxt, 13, caches)
    _compare("decode logits", got2, ref2, model_tol)
    for (name, t), c in zip(cache.named_tensors().items(), caches2, strict=True):
        _compare(f"decode cache {name}", torch.from_numpy(c), t, kernel_tol)


def test_build_plan_without_tensorrt_is_a_target_error(built):
    if NO_TRT is None:
        pytest.skip("TensorRT is installed")
    with pytest.raises(TargetError, match="tensorrt does not import"):
        build_plan(built[0])
    assert main(["build-plan", str(built[0])]) == 3
    assert main(["nonsense"]) == 2


def test_torch_tensorrt_route_missing_writes_nothing(tmp_path, tiny):
    if have_module("torch_tensorrt") is None:
        pytest.skip("torch_tensorrt is installed")
    with pytest.raises(TargetError, match="torch_tensorrt"):
        build_tensorrt(tiny, tmp_path / "e", via="torch_tensorrt", max_batch=2, max_len=MAX_LEN)
    assert not (tmp_path / "e").exists()
    with pytest.raises(InputError, match="via"):
        build_tensorrt(tiny, tmp_path / "e", via="trtexec")


@pytest.mark.tensorrt
def test_plan_built_where_tensorrt_exists(built, manifest):
    pytest.importorskip("tensorrt", reason="TensorRT >= 10.9 is not installed here (not installable on our machines)")
    if not torch.cuda.is_available():
        pytest.skip("a TensorRT plan needs a CUDA GPU")
    assert manifest["artifacts"]["plan"] == "model.plan" and (built[0] / "model.plan").stat().st_size > 0


@pytest.mark.tensorrt
def test_torch_tensorrt_route_builds_pt2(tmp_path, tiny):
    pytest.importorskip("torch_tensorrt", reason="torch_tensorrt is not installed here (not installable on our machines)")
    if not torch.cuda.is_available():
        pytest.skip("Torch-TensorRT needs a CUDA GPU")
    out = build_tensorrt(tiny.cuda(), tmp_path / "e", via="torch_tensorrt", max_batch=2, max_len=MAX_LEN)
    assert (out / "model.pt2").stat().st_size > 0


def _float_cases():
    g = torch.Generator().manual_seed(0)
    p = torch.exp2(torch.arange(-150, 130, dtype=torch.float32))
    inf = torch.tensor(math.inf)
    return torch.cat([p, torch.nextafter(p, inf), torch.nextafter(p, torch.tensor(0.0)), -p,
                      torch.randn(20000, generator=g) * 8, torch.exp(torch.randn(20000, generator=g) * 30),
                      torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])])


def test_bit_free_quantisation_helpers_are_bit_exact():
    """The ONNX-exportable scale / e2m1 rounding equal quant.formats' bit-cast versions on every value."""
    from v4compile.quant import formats as qf

    x = _float_cases()
    for qmax, lo in ((qf.E4M3_MAX, qf.FP8_MIN_AMAX), (qf.E2M1_MAX, qf.FP4_MIN_AMAX)):
        a, b = qf.ue8m0_scale(x, qmax, lo), ue8m0_scale_arith(x, qmax, lo)
        same = (a == b) | (a.isnan() & b.isnan())
        assert bool(same.all()), f"scale differs at {x[~same][:4].tolist()}: {a[~same][:4]} vs {b[~same][:4]}"
    a, b = qf.round_e2m1(x), round_e2m1_arith(x)
    same = ((a == b) & (torch.signbit(a) == torch.signbit(b))) | (a.isnan() & b.isnan())
    assert bool(same.all()), f"e2m1 differs at {x[~same][:4].tolist()}: {a[~same][:4]} vs {b[~same][:4]}"


# ---------------------------------------------------------------------------------------------- fp8 experts


@pytest.fixture(scope="module")
def fp8_built(tmp_path_factory):
    """(engine dir, model) of an fp8 build of a one-layer tiny model with float32 activations (onnxruntime's CPU
    provider has no bfloat16 kernels): the MoE node carries e4m3 experts (MXFP4 repacked exactly by
    quantize_moe_experts). ~35 s on 2 cores."""
    import dataclasses

    c0 = ModelConfig.preset("tiny")
    cfg = dataclasses.replace(c0, n_layers=1, n_hash_layers=1,
                              compress_ratios=c0.compress_ratios[:1] + c0.compress_ratios[c0.n_layers:])
    torch.manual_seed(0)
    model = ReferenceModel(cfg, dtype=torch.float32).eval()
    out = tmp_path_factory.mktemp("tensorrt_fp8") / "tiny1.trt"
    if NO_TRT is None:
        return build_tensorrt(model, out, via="onnx", precision="fp8", max_batch=2, max_len=32), model
    with pytest.raises(TargetError, match="tensorrt does not import"):
        build_tensorrt(model, out, via="onnx", precision="fp8", max_batch=2, max_len=32)
    return out, model


def test_fp8_experts_are_float8_initialisers_and_match_eager_in_onnxruntime(fp8_built):
    from onnx import TensorProto

    from v4compile.plugins.tensorrt.plan import prepare_aot_model
    from v4compile.targets.onnx_run import OnnxModel

    out, model = fp8_built
    path = out / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    m = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in m.graph.initializer}
    nodes = [n for n in m.graph.node if n.domain == DOMAIN and n.op_type.startswith("moe_experts")]
    assert [n.op_type for n in nodes] == ["moe_experts_fp8"], [n.op_type for n in nodes]
    spec = SPECS["moe_experts_fp8"]
    named = dict(zip(spec.inputs, nodes[0].input))
    for w, s in (("w1", "s1"), ("w3", "s3"), ("w2", "s2")):
        assert inits[named[w]].data_type == TensorProto.FLOAT8E4M3FN, (w, inits[named[w]].data_type)
        assert inits[named[s]].data_type == TensorProto.FLOAT, (s, inits[named[s]].data_type)
    manifest = json.loads((out / mf.MANIFEST).read_text())
    tol = TOLERANCES["model_logits"]["fp8"]
    assert manifest["precision"] == "fp8" and manifest["parity"]["ok"], manifest["parity"]
    assert manifest["plugins"]["aot"]["by_reference"] == [], manifest["plugins"]["aot"]
    om = OnnxModel(path, manifest["cache"]["tensors"])
    tok = torch.randint(0, model.cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    cache = model.new_cache(2, 32)
    with torch.no_grad():
        ref = model(tok, 0, cache)
        nxt = ref[:, -1].argmax(-1, keepdim=True)
        ref2 = model(nxt, torch.tensor([9, 9]), cache)
    got, caches = om(tok, 0, om.new_caches(2))
    got2, _ = om(nxt, 9, caches)
    _compare("fp8 prefill logits", got, ref, tol)
    _compare("fp8 decode logits", got2, ref2, tol)
    prepared, counts = prepare_aot_model(m)  # the AOT plan: the MoE as its six kernel plugins, nothing by reference
    assert {k: v for k, v in counts.items() if k != "moe_route"} == {
        "moe_quant_act": 1, "moe_count": 1, "moe_scatter": 1, "moe_gemm1": 1, "moe_gemm2": 1, "moe_combine": 1}
    assert not [n for n in prepared.graph.node if n.domain in (DOMAIN, EXPAND_DOMAIN)]

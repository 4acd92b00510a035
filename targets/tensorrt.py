"""The tensorrt target: `build_tensorrt(model, out_dir, via="onnx" | "torch_tensorrt", ...)`.

via="onnx" (always its first half): capture + PIPELINE -> lowering with the fused V4 ops as plugin nodes ->
model.onnx + model.onnx.data (targets/onnx_export.py; each fused node also carries its per-kernel expansion),
checked with onnxruntime against eager; then, where TensorRT is importable, build_plan parses it into a strongly
typed network and writes model.plan: by default an AOT plan (fused nodes expanded into one AOT plugin per Triton
kernel launch, PTX in the plan, no Python at run time), or with kind="jit" the fused JIT plugins. Without TensorRT the build stops after ONNX: the engine directory is complete for its ONNX
half (manifest with "plan": null) and a TargetError names what is missing and the one command that finishes
the build on a machine that has TensorRT:  python -m v4compile.targets.tensorrt build-plan <engine dir>.

via="torch_tensorrt": the same functional lowered program compiled by torch_tensorrt.dynamo.compile, every v4trt
op converted to its plugin by the converters of plugins/tensorrt/converters.py, saved as an AOTInductor .pt2
(torch_tensorrt.save(output_format="aot_inductor")).

The directory follows the engine format of the other targets (manifest.json with the sha256 of every file,
written in a temp dir renamed into place); the runtime's load_engine reads model.pt2 engines only, so a tensorrt
directory is loaded by onnxruntime (targets/onnx_run.py), the TensorRT runtime (.plan) or AOTInductor (.pt2):
docs/TENSORRT.md.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from v4compile.errors import ConfigError, InputError, TargetError
from v4compile.runtime import manifest as mf
from v4compile.targets.base import Target

TENSORRT = Target(
    name="tensorrt", arch="sm_90", device="cuda", precisions=("fp32", "bf16", "fp8"), kernel_policy="plugins",
    tested=False, separate_decode=False, max_batch=256, max_len=1 << 20,
    notes="fused V4 ops as TensorRT plugins (v4::<op>); ONNX half checked with onnxruntime on CPU; .plan built "
          "where TensorRT >= 10.9 is installed (not on this project's machines)",
)

ONNX_FILE, PLAN_FILE, PT2_FILE = "model.onnx", "model.plan", "model.pt2"
VIAS = ("onnx", "torch_tensorrt")
FINISH = "python -m v4compile.targets.tensorrt build-plan {dir}"
"""The one command that turns an ONNX-only tensorrt engine directory into a complete one (TensorRT machine)."""


def have_module(name: str) -> str | None:
    """None when `name` imports, else the reason it does not."""
    try:
        importlib.import_module(name)
    except Exception as e:  # ImportError, or a broken install raising anything at import
        return f"{type(e).__name__}: {e}"
    return None


def build_tensorrt(model: Any, out_dir: str | Path, *, via: str = "onnx", precision: str = "fp32",
                   max_batch: int | None = None, max_len: int | None = None, check: bool = True,
                   overwrite: bool = False) -> Path:
    """Build a tensorrt engine directory from a ReferenceModel (module doc). Returns out_dir when complete;
    raises TargetError after writing the ONNX half when TensorRT is missing (via="onnx"), or before writing
    anything when torch_tensorrt is missing (via="torch_tensorrt")."""
    from v4compile.graph.capture import example_inputs, example_len
    from v4compile.targets.onnx_export import capture_for_tensorrt, lower_for_plugins

    if via not in VIAS:
        raise InputError(f"via {via!r}; expected one of {', '.join(VIAS)}")
    act = TENSORRT.act_dtype(precision)
    # fp8 = FP8 experts: bf16 activations as deployed, or float32 ones (the form onnxruntime's CPU provider, which
    # has no bfloat16 kernels, checks against eager; the same kernels take both)
    allowed = (act, torch.float32) if precision == "fp8" else (act,)
    if getattr(model, "act_dtype", None) not in allowed:
        raise ConfigError(f"model activation dtype {getattr(model, 'act_dtype', None)} does not match precision "
                          f"{precision} ({' or '.join(map(str, allowed))})")
    if via == "torch_tensorrt" and (why := have_module("torch_tensorrt")):
        raise TargetError(f"--via torch_tensorrt needs torch_tensorrt (>= 2.6 with TensorRT >= 10.9), which does not "
                          f"import here ({why}); pip install torch-tensorrt, or build with --via onnx")
    cfg = model.cfg
    max_batch, max_len = TENSORRT.engine_limits(cfg, max_batch, max_len)
    out = mf.check_out_dir(out_dir, overwrite)
    times: dict[str, float] = {}
    with mf.atomic_engine_dir(out) as tmp:
        t0 = time.perf_counter()
        g = capture_for_tensorrt(model, "prefill", max_len, precision)
        ex = example_inputs(model, "prefill", 2, example_len(cfg, max_len), max_len)
        fp = lower_for_plugins(g, ex, max(2, max_batch), fp8_experts=precision == "fp8")
        times["capture + passes + lowering"] = round(time.perf_counter() - t0, 2)
        manifest = _manifest(model, precision, via, max_batch, max_len, fp, times)
        if via == "onnx":
            _onnx_half(model, fp, tmp, manifest, check, times)
        else:
            _torch_tensorrt(fp, tmp, manifest, precision, max_batch, max_len, times)
    if via == "onnx" and manifest["artifacts"]["plan"] is None:
        checked = "checked with onnxruntime" if (manifest["parity"] or {}).get("ok") else "not checked"
        raise TargetError(f"{out}: ONNX half written (model.onnx {checked}), no TensorRT plan: "
                          f"{manifest['artifacts']['plan_missing']}. Finish on a machine with TensorRT >= 10.9 and "
                          f"an sm_90 GPU: {FINISH.format(dir=out)}")
    return out


def _manifest(model: Any, precision: str, via: str, max_batch: int, max_len: int, fp: Any,
              times: dict[str, float]) -> dict[str, Any]:
    import v4compile
    from v4compile.plugins.tensorrt.specs import DOMAIN, SPECS
    from v4compile.targets.onnx_export import output_name, plugin_nodes

    nodes = [{"op": n.target._opname, "attrs": dict(zip(SPECS[n.target._opname].attr_names,
                                                        n.args[len(SPECS[n.target._opname].inputs):]))}
             for n in plugin_nodes(fp.program)]
    return {
        "format_version": mf.FORMAT_VERSION, "v4compile": v4compile.__version__, "torch": torch.__version__,
        "triton": None, "target": TENSORRT.name, "arch": TENSORRT.arch, "precision": precision,
        "tested_target": TENSORRT.tested, "config": model.cfg.to_dict(),
        "build": {"via": via, "max_batch": max_batch, "max_len": max_len, "stage_seconds": times,
                  "activations": str(model.act_dtype).removeprefix("torch."),
                  "weights": ("e4m3 experts + float32 block scales (moe_experts_fp8), other weights dequantised "
                              "float" if precision == "fp8" else "dequantised float") + ", external data "
                             "(model.onnx.data)"},
        "kernels": dict(sorted(fp.kernels.items())),
        "plugins": {"domain": DOMAIN, "nodes": nodes, "aot": _aot_summary(nodes)},
        "entry_points": {
            "prefill": {"model": "model", "batch": [1, max_batch], "tokens": [1, max_len]},
            "decode": {"model": "model", "batch": [1, max_batch], "tokens": [1, 1], "program": "prefill"},
            "io": {"inputs": ["tokens", "start_pos", *fp.cache_names],
                   "outputs": ["logits", *(output_name(n) for n in fp.cache_names)]},
        },
        "cache": {"max_batch": max_batch, "max_len": max_len, "kv_layout": "reference",  # its plugins' layout
                  "tensors": mf.cache_layout(model.cfg, max_len, model.act_dtype)},
        "artifacts": {"onnx": None, "plan": None, "pt2": None},
        "parity": None,
    }


def _aot_summary(nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """How an AOT plan computes each fused op: expanded into kernel plugins, or by its reference function."""
    from v4compile.plugins.tensorrt.specs import AOT_BY_REFERENCE, KERNEL_NAMESPACE, KERNEL_SPECS

    ops = sorted({n["op"] for n in nodes})
    return {"expanded": [o for o in ops if o not in AOT_BY_REFERENCE],
            "by_reference": [o for o in ops if o in AOT_BY_REFERENCE],
            "kernel_plugins": [f"{KERNEL_NAMESPACE}::{k}" for k in KERNEL_SPECS], "arch": "sm_90"}


def _onnx_half(model: Any, fp: Any, tmp: Path, manifest: dict[str, Any], check: bool, times: dict[str, float]) -> None:
    from v4compile.targets.onnx_export import DATA_FILE, export_onnx

    t0 = time.perf_counter()
    export_onnx(fp, tmp / ONNX_FILE)
    times["onnx export"] = round(time.perf_counter() - t0, 2)
    manifest["artifacts"].update(onnx=ONNX_FILE, onnx_data=DATA_FILE)
    if check and manifest["build"]["activations"] != "float32":
        manifest["parity"] = {"ok": None, "skipped": "onnxruntime's CPU provider lacks bfloat16 kernels; the "
                                                    "onnxruntime check runs for float32 activations (fp32, or "
                                                    "fp8 with a float32 model)"}
    elif check:
        t0 = time.perf_counter()
        manifest["parity"] = check_onnx_parity(model, tmp / ONNX_FILE, manifest["cache"]["tensors"],
                                               manifest["cache"]["max_len"], manifest["precision"])
        times["onnxruntime parity check"] = round(time.perf_counter() - t0, 2)
    if (why := have_module("tensorrt")) is None:
        mf.write_manifest(tmp, manifest)
        build_plan(tmp)
        manifest.update(mf.read_manifest(tmp))
    else:
        manifest["artifacts"]["plan_missing"] = f"tensorrt does not import ({why})"
        mf.write_manifest(tmp, manifest)


def check_onnx_parity(model: Any, path: Path, layout: list[dict[str, Any]], max_len: int, precision: str,
                      n_prompt: int = 11) -> dict[str, Any]:
    """onnxruntime vs eager on one seeded prompt: prefill logits and one decode step (calc_diff against the
    model tolerance); raises ParityError beyond it."""
    from v4compile.errors import ParityError
    from v4compile.targets.onnx_run import OnnxModel
    from v4compile.validate import TOLERANCES, calc_diff, nonfinite_mismatch

    n = max(1, min(n_prompt, max_len - 1))
    tok = torch.randint(0, model.cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(1234))
    onnx_model = OnnxModel(path, layout)
    cache = model.new_cache(1, max_len)
    with torch.no_grad():
        ref = model(tok, 0, cache)
        nxt = ref[:, -1].argmax(-1, keepdim=True)
        ref2 = model(nxt, torch.tensor([n]), cache)
    got, caches = onnx_model(tok, 0, onnx_model.new_caches(1))
    got2, _ = onnx_model(nxt, n, caches)
    tol = TOLERANCES["model_logits"][precision]
    summary = {"runtime": "onnxruntime (CPU)", "prompt": n, "prefill_logits_calc_diff": calc_diff(got, ref),
               "decode_logits_calc_diff": calc_diff(got2, ref2),
               "nonfinite_mismatch": nonfinite_mismatch(got, ref) + nonfinite_mismatch(got2, ref2), "tolerance": tol}
    worst = max(summary["prefill_logits_calc_diff"], summary["decode_logits_calc_diff"])
    summary["ok"] = bool(worst < tol and summary["nonfinite_mismatch"] == 0)
    if not summary["ok"]:
        raise ParityError(f"model.onnx (onnxruntime) vs eager logits: calc_diff {worst:.3e} (bound {tol:.0e}), "
                          f"{summary['nonfinite_mismatch']} inf/NaN mismatches")
    return summary


def build_plan(engine_dir: str | Path, *, kind: str = "aot", workspace_gib: float | None = None) -> Path:
    """Parse <engine_dir>/model.onnx into a strongly typed TensorRT network with the v4 plugins registered, build
    model.plan for the manifest's batch / length ranges, and rewrite the manifest. Needs TensorRT >= 10.9.
    kind "aot": per-kernel AOT plugins (no Python at run time); "jit": fused JIT plugins (plugins/tensorrt/plan.py)."""
    from v4compile.plugins.tensorrt.plan import PLAN_KINDS, build_serialized_plan
    from v4compile.targets.trt_ops import BODIES_TRT

    if kind not in PLAN_KINDS:
        raise InputError(f"plan kind {kind!r}; expected one of {', '.join(PLAN_KINDS)}")
    root = Path(engine_dir)
    manifest = mf.read_manifest(root)
    if manifest["target"] != TENSORRT.name or not manifest.get("artifacts", {}).get("onnx"):
        raise InputError(f"{root} is not a tensorrt engine directory with an ONNX half "
                         f"(target {manifest['target']!r})")
    if (why := have_module("tensorrt")) is not None:
        raise TargetError(f"build-plan needs TensorRT >= 10.9 (pip install tensorrt) and a GPU; tensorrt does not "
                          f"import here ({why})")
    _verify(root, manifest)
    t0 = time.perf_counter()
    plan = build_serialized_plan(root / manifest["artifacts"]["onnx"], manifest, BODIES_TRT, kind=kind,
                                 workspace_gib=workspace_gib)
    (root / PLAN_FILE).write_bytes(plan)
    manifest["artifacts"]["plan"] = PLAN_FILE
    manifest["artifacts"]["plan_kind"] = kind
    manifest["artifacts"].pop("plan_missing", None)
    manifest["build"]["stage_seconds"]["tensorrt plan"] = round(time.perf_counter() - t0, 2)
    mf.write_manifest(root, manifest)
    return root / PLAN_FILE


def _verify(root: Path, manifest: dict[str, Any]) -> None:
    """Checksums of the listed files (manifest.verify_files also demands model.pt2, which .plan engines lack)."""
    from v4compile.errors import EngineError

    for rel, digest in manifest["files"].items():
        p = root / rel
        if not p.is_file() or mf.sha256_file(p) != digest:
            raise EngineError(f"engine file {rel} is missing or differs from the manifest's sha256")


def _torch_tensorrt(fp: Any, tmp: Path, manifest: dict[str, Any], precision: str, max_batch: int, max_len: int,
                    times: dict[str, float]) -> None:
    from v4compile.plugins.tensorrt.converters import compile_and_save
    from v4compile.targets.trt_ops import BODIES_TRT

    t0 = time.perf_counter()
    compile_and_save(fp.program, fp.example, tmp / PT2_FILE, BODIES_TRT, precision=precision, max_batch=max_batch,
                     max_len=max_len)
    times["torch_tensorrt compile + save"] = round(time.perf_counter() - t0, 2)
    manifest["artifacts"]["pt2"] = PT2_FILE
    mf.write_manifest(tmp, manifest)


def main(argv: list[str] | None = None) -> int:
    """`python -m v4compile.targets.tensorrt build-plan ENGINE_DIR [--jit]`: finish an ONNX-only tensorrt engine
    (AOT kernel plugins by default; --jit: the fused JIT plugins, Python at run time)."""
    from v4compile.errors import V4Error

    args = sys.argv[1:] if argv is None else argv
    jit = "--jit" in args
    args = [a for a in args if a != "--jit"]
    if len(args) != 2 or args[0] != "build-plan":
        print("usage: python -m v4compile.targets.tensorrt build-plan ENGINE_DIR [--jit]", file=sys.stderr)
        return 2
    try:
        path = build_plan(args[1], kind="jit" if jit else "aot")
    except V4Error as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(json.dumps({"plan": str(path)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

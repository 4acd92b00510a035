"""`v4compile bench model` (issue #8): an engine's decode and prefill next to the eager reference (bf16) and
torch.compile of it, the decode floor, peak GPU memory and KV bytes per token, all measured in one run.

    v4compile bench model --preset bench --contexts 4096,131072,1048576 --batch 1,8,64 --json model.json
    v4compile bench model --preset bench --no-engine --batch 1 --json eager.json      # eager / compile / floor only
    v4compile bench model --engine ENGINE --contexts 32,64 --batch 2 --prefill 16 --steps 2 --json out.json

The engine: --engine DIR, else the cached build of --preset / --checkpoint for the machine's target (h100 / h200
at fp8 on a GPU, cpu at bf16) under --engine-cache, built with api.build when missing (max_batch = the largest
--batch, max_len = the largest context or prefill, within the target's limits). How decode is timed and the
caches filled: model_measure; what the floor counts: model_floor. torch.compile of the reference (its UE8M0
scales widened to float32 first, exact: Inductor cannot compile e8m0) runs by default on a GPU only (~30 s per
shape for tiny on this CPU; --compile forces it); its "compile_s" is the first call at each shape, compile or
recompile included, and "calc_diff_vs_eager" compares its last logits with the eager run's (same seeded caches
and tokens). Everything printed comes from this run: the ceilings (copy bandwidth for the floor) are measured in
it, and "command" in the JSON reruns it.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

import v4compile
from v4compile.bench.common import Ceilings, Row, measure_ceilings
from v4compile.bench.model_floor import decode_floor
from v4compile.bench.model_measure import CACHE_FILL, Plan, eager_phase, engine_phase, first_line
from v4compile.bench.model_report import plot_latency, print_report
from v4compile.errors import ConfigError, InputError, V4Error
from v4compile.model.config import ModelConfig
from v4compile.model.kv_bytes import V32_BYTES_PER_TOKEN_PER_LAYER, kv_bytes, v32_bytes_per_token
from v4compile.runtime import manifest as mf

IMPLS = ("engine", "eager", "compile")
DEFAULTS = dict(contexts=(4096, 131072, 1048576), batches=(1, 8, 64), prefills=(8192, 65536, 131072))


def resolve_model(preset: str | None, checkpoint: str | None, manifest: dict[str, Any] | None
                  ) -> tuple[ModelConfig, str | None]:
    """(config, source for the eager weights and a build: preset name / checkpoint dir / None = seeded init)."""
    if preset and checkpoint:
        raise InputError("--preset and --checkpoint: give one")
    if checkpoint:
        cfg, source = ModelConfig.from_pretrained(checkpoint), str(checkpoint)
    elif preset:
        cfg, source = ModelConfig.preset(preset), preset
    elif manifest is not None:  # the engine's own config; its recorded source where there is one
        cfg = ModelConfig.from_dict(manifest["config"])
        rec = manifest.get("build", {}).get("source") or {}
        ckpt = rec.get("checkpoint")
        source = rec.get("preset") or (ckpt if ckpt and Path(ckpt).is_dir() else None)
    else:
        cfg, source = ModelConfig.preset("bench"), "bench"
    if manifest is not None and ModelConfig.from_dict(manifest["config"]) != cfg:
        raise ConfigError(f"the engine's config differs from {'--checkpoint' if checkpoint else '--preset'}'s "
                          "(pass the engine alone to use its config)")
    return cfg, source


def _cache_root(engine_cache: str | None) -> Path:
    if engine_cache:
        return Path(engine_cache)
    return Path(os.environ.get("V4COMPILE_CACHE", Path.home() / ".cache" / "v4compile")) / "bench"


def cached_engine(source: str, cfg: ModelConfig, target: str, precision: str, plan: Plan,
                  engine_cache: str | None) -> tuple[Any, dict[str, Any]]:
    """The cached build of `source` for (target, precision, limits); built now with api.build (no parity
    check: `v4compile validate` is the parity tool) when missing or not loadable."""
    from v4compile.api import build, load_engine
    from v4compile.errors import EngineError
    from v4compile.targets import get_target

    tgt = get_target(target)
    max_len = max(2, min(max(plan.contexts + plan.prefills), tgt.max_len, cfg.max_position_embeddings))
    max_batch = max(1, min(max(plan.batches), tgt.max_batch))
    name = source
    if Path(source).is_dir():  # keyed by path (hashing a bench checkpoint's 28 GB would take minutes)
        name = "ckpt-" + hashlib.sha1(str(Path(source).resolve()).encode()).hexdigest()[:10]
    versions = f"v{v4compile.__version__}-torch{torch.__version__}"
    layout = tgt.kv_layout(precision)  # api.build's default for the target and precision
    out = _cache_root(engine_cache) / f"{name}-{target}-{precision}-{layout}-b{max_batch}-l{max_len}-{versions}"
    info: dict[str, Any] = {"dir": str(out)}
    if out.exists():
        try:
            return load_engine(out), {**info, "how": "cached"}
        except EngineError as e:  # damaged or from another version: rebuild
            info["stale_cache"] = first_line(e)
    t0 = time.perf_counter()
    build(source, target, precision, out, check=False, max_batch=max_batch, max_len=max_len, overwrite=True)
    info.update(how="built", build_s=time.perf_counter() - t0)
    return load_engine(out), info


def eager_model(cfg: ModelConfig, source: str | None, device: torch.device) -> Any:
    """The bf16 reference: the checkpoint's weights, else the seeded init (seed 0, what api.build uses)."""
    if source is not None and Path(source).is_dir():
        from v4compile.model.checkpoint import load_checkpoint

        return load_checkpoint(source, dtype=torch.bfloat16, device=device).eval()
    from v4compile.model.reference import ReferenceModel

    return ReferenceModel(cfg, dtype=torch.bfloat16, device=device, seed=0).eval()


def kv_report(cfg: ModelConfig, measured: dict[str, Any]) -> dict[str, Any]:
    """Measured cache bytes per token (engine session, eager cache) next to the layouts' per-token bytes."""
    prod = kv_bytes(cfg, "production").per_token
    v32, v32_same = v32_bytes_per_token(), V32_BYTES_PER_TOKEN_PER_LAYER * cfg.n_layers
    out: dict[str, Any] = {
        "engine_measured": measured.get("engine"), "eager_measured": measured.get("eager"),
        "production_per_token": prod, "reference_per_token": kv_bytes(cfg, "reference").per_token,
        "v32_per_token": v32, "v32_same_layers_per_token": v32_same,
        "note": "measured per_token = all allocated cache bytes / (batch * max_len), window rings and compressor "
                "states included; growing_per_token counts the compressed-entry and indexer-key tensors only; "
                "entries_per_token (measured_per_token) is the long-context bytes per token of the allocation "
                "(each entry tensor's row bytes / its layer's ratio), comparable with production_per_token. "
                "v32_same_layers = V3.2's 788 B per layer times this config's n_layers."}
    key = "engine" if measured.get("engine") else "eager" if measured.get("eager") else None
    if key:
        m = measured[key]["per_token"]
        entries = measured[key]["entries_per_token"]
        out.update(measured_from=key, measured_layout=measured[key]["layout"], measured_per_token=entries,
                   ratio_v32_over_measured_per_token=v32 / entries if entries else None,
                   ratio_v32_over_measured=v32 / m, ratio_v32_same_layers_over_measured=v32_same / m)
        if prod > 0:
            out.update(ratio_measured_over_production=m / prod,
                       ratio_growing_over_production=measured[key]["growing_per_token"] / prod)
    return out


def _off(reason: str) -> dict[str, Any]:
    return {"status": "off", "reason": reason}


def assemble_decode(cfg: ModelConfig, plan: Plan, layout: list[dict[str, Any]], ceil: Ceilings,
                    engine: dict, eager: dict, engine_missing: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per (batch, context): floor, each implementation's result, time / floor and the speed-ups."""
    out = []
    for b in plan.batches:
        for c in plan.contexts:
            floor = decode_floor(cfg, layout, b, c, ceil.copy_gbps)
            row: dict[str, Any] = {"batch": b, "context": c, "floor": floor,
                                   "engine": engine.get((b, c), dict(engine_missing)),
                                   **eager.get((b, c), {"eager": _off("not run"), "compile": _off("not run")})}
            for impl in IMPLS:
                if row[impl]["status"] == "ok":
                    row[impl]["x_floor"] = row[impl]["step_us"] / floor["us"]
            if row["engine"]["status"] == "ok":
                for impl in ("eager", "compile"):
                    if row[impl]["status"] == "ok":
                        row[f"{impl}_over_engine"] = row[impl]["step_us"] / row["engine"]["step_us"]
            out.append(row)
    return out


def json_rows(decode: list[dict[str, Any]], prefill: list[dict[str, Any]]) -> list[Row]:
    """The flat Row list of bench.common's JSON shape (measured entries only; the rest stays in decode/prefill)."""
    rows = []
    for d in decode:
        name, f = f"decode_b{d['batch']}_ctx{d['context']}", d["floor"]
        rows.append(Row(name, "floor", f["us"], bytes=f["bytes"], floor_us=f["us"]))
        for impl in IMPLS:
            r = d[impl]
            if r["status"] == "ok":
                rows.append(Row(name, impl, r["step_us"], bytes=f["bytes"], floor_us=f["us"],
                                extra={"tokens_per_s": r["tokens_per_s"]}))
    for p in prefill:
        for impl in ("engine", "eager"):
            r = p[impl]
            if r["status"] == "ok":
                rows.append(Row(f"prefill_{p['tokens']}", impl, r["seconds"] * 1e6,
                                extra={"tokens_per_s": r["tokens_per_s"]}))
    return rows


def _payload(ceil: Ceilings, rows: list[Row], meta: dict[str, Any]) -> dict[str, Any]:
    """bench.common.write_json's shape: time, versions, ceilings, rows, then this benchmark's own keys."""
    import triton

    return dict(time=time.strftime("%Y-%m-%dT%H:%M:%S"), torch=torch.__version__, triton=triton.__version__,
                ceilings=asdict(ceil), rows=[r.to_dict() for r in rows], **meta)


def _engine_stage(engine: str | None, no_engine: bool, preset: str | None, checkpoint: str | None,
                  target: str | None, precision: str | None, plan: Plan, engine_cache: str | None,
                  measured: dict[str, Any], log: Any, profile: bool = False
                  ) -> tuple[ModelConfig, str | None, dict, dict, dict, tuple]:
    """Load / build the engine, time it (and with `profile` its decode step's kernels: info["profile"]), free it:
    (cfg, source, info, decode, prefill, (cache layout, name))."""
    eng, info = None, {"status": "off", "reason": "--no-engine"}
    if engine and not no_engine:
        from v4compile.api import load_engine

        eng, info = load_engine(engine), {"dir": str(engine), "how": "given"}
    cfg, source = resolve_model(preset, checkpoint, eng.manifest if eng else None)
    if eng is None and not no_engine:
        if source is None:
            raise ConfigError("no engine to time: pass --engine DIR, --preset NAME or --checkpoint DIR, or --no-engine")
        from v4compile.demo import default_target

        target = target or default_target()[0]
        precision = precision or ("bf16" if target == "cpu" else "fp8")
        try:
            eng, info = cached_engine(source, cfg, target, precision, plan, engine_cache)
        except (RuntimeError, MemoryError, V4Error) as e:  # the eager / compile / floor columns still run
            info = {"status": "error", "reason": f"engine build for {target} {precision} failed: {first_line(e)}"}
            log(f"[bench model] {info['reason']}")
    if eng is None:
        return cfg, source, info, {}, {}, (mf.cache_layout(cfg, cfg.max_seq_len, torch.bfloat16), "reference bf16")
    m = eng.manifest
    info.update(status="on", target=m["target"], precision=m.get("precision"), max_batch=eng.max_batch,
                max_len=eng.max_len, device=str(eng.device))
    decode, prefill = engine_phase(eng, plan, measured, log)
    if profile:
        from v4compile.bench.engine_profile import profile_decode

        b, c = plan.batches[0], plan.contexts[0]
        try:
            info["profile"] = profile_decode(eng, b, min(c, eng.max_len), plan)
            log(f"engine decode b{b} ctx{c} profiled: {info['profile']['kernels_per_step']:.0f} "
                f"{info['profile']['what']} per step, {info['profile']['busy_us_per_step']:.1f} us busy")
        except (RuntimeError, MemoryError, V4Error) as e:  # the timed rows stay
            info["profile"] = {"status": "error", "error": first_line(e)}
    layout = (eng.layout, "engine manifest")
    del eng
    gc.collect()
    if plan.device.type == "cuda":
        torch.cuda.empty_cache()
    return cfg, source, info, decode, prefill, layout


def _eager_stage(cfg: ModelConfig, source: str | None, plan: Plan, eager: bool, compile_off: str | None,
                 measured: dict[str, Any], log: Any) -> tuple[dict, dict]:
    """Eager and compile decode rows and eager prefills; a model that cannot be built (e.g. an OOM) is recorded
    in every entry, so the engine's numbers of the same run are kept."""
    if not eager and compile_off:
        return {}, {}
    try:
        model = eager_model(cfg, source, plan.device)
    except (RuntimeError, MemoryError, V4Error) as e:
        err = {"status": "error", "error": f"eager model: {first_line(e)}"}
        return ({(b, c): {"eager": err, "compile": err} for b in plan.batches for c in plan.contexts},
                {n: err for n in plan.prefills})
    try:
        return eager_phase(model, plan, measured, log, eager, compile_off)
    finally:
        del model
        gc.collect()


def run_model_bench(*, preset: str | None = None, checkpoint: str | None = None, engine: str | None = None,
                    no_engine: bool = False, engine_cache: str | None = None, target: str | None = None,
                    precision: str | None = None, contexts: tuple[int, ...] = DEFAULTS["contexts"],
                    batches: tuple[int, ...] = DEFAULTS["batches"], prefills: tuple[int, ...] = DEFAULTS["prefills"],
                    steps: int = 8, warmup: int | None = None, eager: bool = True, use_compile: bool | None = None,
                    compile_mode: str = "default", prefill_chunk: int = 0, device: str | None = None,
                    seed: int = 0, json_path: str | None = None, plot: str | None = None,
                    command: str | None = None, quiet: bool = False, profile: bool = False) -> dict[str, Any]:
    """Measure everything (see module doc); returns the JSON payload (also written to `json_path`).
    use_compile None: torch.compile on a GPU only. profile: the engine's decode kernels (bench/engine_profile.py)
    at the first batch and context, in payload["engine"]["profile"]."""
    from rich.console import Console

    console = Console(stderr=True, quiet=quiet)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    plan = Plan(tuple(contexts), tuple(batches), tuple(prefills), steps, warmup or (2 if dev.type == "cuda" else 1),
                dev, seed, prefill_chunk, compile_mode)
    if plan.steps < 1 or plan.warmup < 1 or not plan.contexts or not plan.batches or \
            min(plan.batches + plan.contexts + plan.prefills) < 1:
        raise InputError(f"steps {steps} / warmup {plan.warmup} / batches {list(plan.batches)} / contexts "
                         f"{list(plan.contexts)} / prefills {list(plan.prefills)}: each must be >= 1 (and given)")
    ceil = measure_ceilings(dev)
    console.print(f"[bench model] {ceil.device}: copy {ceil.copy_gbps:.1f} GB/s, bf16 {ceil.bf16_tflops:.2f} TFLOP/s")
    measured: dict[str, Any] = {}
    cfg, source, engine_info, e_dec, e_pre, (layout, layout_name) = _engine_stage(
        engine, no_engine, preset, checkpoint, target, precision, plan, engine_cache, measured, console.print,
        profile)
    compile_off = ("--no-compile" if use_compile is False else
                   "off by default on the CPU (--compile runs it)" if use_compile is None and dev.type == "cpu"
                   else None)
    x_dec, x_pre = _eager_stage(cfg, source, plan, eager, compile_off, measured, console.print)
    missing = {"status": "error" if engine_info["status"] == "error" else "off",
               "reason": engine_info.get("reason", "not run")}
    decode = assemble_decode(cfg, plan, layout, ceil, e_dec, x_dec, missing)
    prefill = [{"tokens": n, "engine": e_pre.get(n, dict(missing)), "eager": x_pre.get(n, _off("--no-eager"))}
               for n in plan.prefills]
    meta = {"command": command, "device": ceil.device, "config": {"source": source, **cfg.to_dict()},
            "engine": engine_info, "eager_dtype": "bfloat16",
            "compile_variant": "torch.compile(EntryPoint(reference)) with UE8M0 weight scales widened to float32",
            "plan": {**asdict(plan), "device": str(dev)},
            "cache_fill": CACHE_FILL, "floor_cache_layout": layout_name,
            "floor_definition": "bytes (bench.model_floor: main-stack weights at checkpoint dtypes, routed experts "
                                "only min(batch * top_k, n_routed) per layer, embedding / hash-table rows looked up; "
                                "caches touched) / copy bandwidth measured in this run",
            "decode": decode, "prefill": prefill, "kv_bytes": kv_report(cfg, measured)}
    payload = _payload(ceil, json_rows(decode, prefill), meta)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(payload, indent=1, default=str))
        console.print(f"[bench model] wrote {json_path}")
    if plot:
        plot_latency(payload, plot)
        console.print(f"[bench model] wrote {plot}")
    if not quiet:
        print_report(payload)
    return payload


def _ints(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise InputError(f"expected comma-separated integers, got {s!r}") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="v4compile bench model", description=(
        "Engine decode / prefill vs the eager reference (bf16) and torch.compile of it, the decode floor, peak "
        "GPU memory and KV bytes per token, measured in one run (module doc: v4compile/bench/model.py)."))
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--preset", help="model preset (default bench; with --engine: the engine's config)")
    src.add_argument("--checkpoint", help="official checkpoint directory")
    ap.add_argument("--engine", help="engine directory to time (default: build or reuse one)")
    ap.add_argument("--no-engine", action="store_true", help="eager / compile / floor / KV bytes only")
    ap.add_argument("--engine-cache", help="where built engines are kept (default $V4COMPILE_CACHE/bench)")
    ap.add_argument("--target", help="target of a built engine (default: this machine's)")
    ap.add_argument("--precision", choices=("fp32", "bf16", "fp8"), help="default fp8 on a GPU, bf16 on the CPU")
    ap.add_argument("--contexts", default=",".join(map(str, DEFAULTS["contexts"])),
                    help="decode contexts C (the last timed step sees C positions)")
    ap.add_argument("--batch", default=",".join(map(str, DEFAULTS["batches"])), help="decode batch sizes")
    ap.add_argument("--prefill", default=",".join(map(str, DEFAULTS["prefills"])),
                    help="prefill lengths ('' for none)")
    ap.add_argument("--prefill-chunk", type=int, default=0, help="prefill in calls of N tokens (0: one call)")
    ap.add_argument("--steps", type=int, default=8, help="timed decode steps (median)")
    ap.add_argument("--warmup", type=int, help="untimed decode steps first (default 2 on a GPU, 1 on the CPU)")
    ap.add_argument("--no-eager", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile on the CPU too")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode")
    ap.add_argument("--device", help="eager device (default cuda when present)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    ap.add_argument("--plot", help="PNG of latency vs context (needs matplotlib)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile the engine's decode kernels at the first batch and context")
    args = sys.argv[1:] if argv is None else list(argv)
    a = ap.parse_args(args)
    if a.no_compile and a.compile:
        ap.error("--compile and --no-compile: give one")
    run_model_bench(preset=a.preset, checkpoint=a.checkpoint, engine=a.engine, no_engine=a.no_engine,
                    engine_cache=a.engine_cache, target=a.target, precision=a.precision, contexts=_ints(a.contexts),
                    batches=_ints(a.batch), prefills=_ints(a.prefill), steps=a.steps, warmup=a.warmup,
                    eager=not a.no_eager, use_compile=False if a.no_compile else True if a.compile else None,
                    compile_mode=a.compile_mode, prefill_chunk=a.prefill_chunk, device=a.device, seed=a.seed,
                    json_path=a.json, plot=a.plot, profile=a.profile,
                    command=shlex.join(["v4compile", "bench", "model", *args]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

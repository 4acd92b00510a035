"""GPU check of a registry target's lowering without AOTInductor: capture -> pipeline -> lower (Triton kernels
from the registry, fused ops composed from them), then run the lowered programs eagerly next to the reference.

    python -m v4compile.bench.lowered_check --preset tiny --target h200 --precision bf16 [--kv-layout L] [--json OUT]

Prints which implementation every v4 op got and the logits calc_diff of prefill and of decode steps; for bf16 / fp8
also each call's precision floor (the bf16 reference vs its float32 twin) and the program's distance to that twin,
judged as the build's parity check does (api.check_parity). `--target cpu` runs the same harness on the CPU.

`--engine DIR` also runs a built engine of the same model on the same inputs (its own fresh session) and reports
its distance to the lowered program and to eager: what AOTInductor and the engine's weight binding add on top of
the kernels. The engine is refused unless its manifest names the same preset, target, precision and KV layout.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--target", default="h200")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=77)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--engine", help="engine directory built from the same preset / target / precision")
    ap.add_argument("--kv-layout", choices=("production", "reference"),
                    help="cache layout of the programs (default: the target's for the precision, as build does)")
    ap.add_argument("--json")
    a = ap.parse_args(argv)

    from v4compile.api import fp32_twin
    from v4compile.graph.capture import capture, example_inputs
    from v4compile.graph.passes import run_pipeline
    from v4compile.model.config import ModelConfig
    from v4compile.model.reference import ReferenceModel
    from v4compile.targets import get_target
    from v4compile.targets.lower import lower
    from v4compile.validate import TOLERANCES, calc_diff, logits_within

    tgt = get_target(a.target)
    model = ReferenceModel(ModelConfig.preset(a.preset), dtype=tgt.act_dtype(a.precision), device=tgt.device).eval()
    layout = tgt.kv_layout(a.precision, a.kv_layout)
    engine = session = None
    if a.engine:
        from v4compile.runtime.engine import load_engine

        engine = load_engine(a.engine)  # checked before the (slow) lowering
        want = {"target": a.target, "precision": a.precision, "kv_layout": layout, "preset": a.preset}
        have = {"target": engine.manifest.get("target"), "precision": engine.manifest.get("precision"),
                "kv_layout": engine.manifest.get("cache", {}).get("kv_layout", "reference"),
                "preset": engine.manifest.get("build", {}).get("source", {}).get("preset")}
        if have != want:
            raise SystemExit(f"--engine {a.engine}: built for {have}, this check runs {want}")
        session = engine.new_session(a.batch)
    res: dict = {"preset": a.preset, "target": a.target, "precision": a.precision, "kv_layout": layout,
                 "torch": torch.__version__}
    progs, t0 = {}, time.perf_counter()
    for entry in ("prefill", "decode"):
        g = run_pipeline(capture(model, entry, max_len=a.max_len, kv_layout=layout), precision=a.precision)
        ex = example_inputs(model, entry, 2, 37, a.max_len, layout)
        lo = lower(g, tgt, ex, 4)
        progs[entry] = lo.program.module()
        res[f"kernels_{entry}"] = lo.kernels
    res["lower_seconds"] = round(time.perf_counter() - t0, 1)
    gen = torch.Generator().manual_seed(0)
    B = a.batch
    prompt = torch.randint(0, model.cfg.vocab_size, (B, a.prompt), generator=gen).to(tgt.device)
    cache = model.new_cache(B, a.max_len)
    caches = list(model.new_cache(B, a.max_len, layout).named_tensors().values())  # the engine's own, fresh
    # bf16 / fp8: the float32 twin of the reference gives each call's precision floor, as in the build's check
    twin = fp32_twin(model) if model.act_dtype != torch.float32 else None
    twin_cache = twin.new_cache(B, a.max_len) if twin is not None else None
    bound = TOLERANCES["model_logits"][a.precision]
    margin = TOLERANCES["model_logits_floor_margin"][a.precision]
    rows = []

    def row(call: str, tokens: int, got, ref, exact, argmax_ok: bool, eng=None) -> None:
        r = {"call": call, "tokens": tokens, "calc_diff": calc_diff(got, ref), "argmax_equal": argmax_ok}
        if exact is not None:
            r["floor"], r["vs_fp32"] = calc_diff(ref, exact), calc_diff(got, exact)
        r["ok"] = logits_within(r["calc_diff"], a.precision, r.get("floor"), r.get("vs_fp32"))
        if eng is not None:
            eng = eng.to(got.device)
            r["engine_vs_lowered"], r["engine_vs_eager"] = calc_diff(eng, got), calc_diff(eng, ref)
            if exact is not None:
                r["engine_vs_fp32"] = calc_diff(eng, exact)
        rows.append(r)

    def logits(out):
        return out[0] if isinstance(out, (tuple, list)) else out

    with torch.no_grad():
        sp = torch.zeros(B, dtype=torch.int64, device=tgt.device)
        ref = model(prompt, sp, cache)
        exact = twin(prompt, sp, twin_cache) if twin is not None else None
        got = logits(progs["prefill"](prompt, sp, *caches))
        eng = engine.prefill(prompt, sp, session) if engine is not None else None
        row("prefill", a.prompt, got, ref, exact, bool((got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95),
            eng)
        tok = ref[:, -1].argmax(-1, keepdim=True)
        for step in range(a.steps):
            sp = torch.full((B,), a.prompt + step, dtype=torch.int64, device=tgt.device)
            ref = model(tok, sp, cache)
            exact = twin(tok, sp, twin_cache) if twin is not None else None
            got = logits(progs["decode"](tok, sp, *caches))
            eng = engine.decode(tok, sp, session) if engine is not None else None
            row(f"decode {step}", 1, got, ref, exact, bool(torch.equal(got.argmax(-1), ref.argmax(-1))), eng)
            tok = ref[:, -1].argmax(-1, keepdim=True)
    res["rows"] = rows
    res["bound"], res["floor_margin"] = bound, margin
    res["ok"] = all(r["ok"] for r in rows)
    for entry in ("prefill", "decode"):
        print(f"{entry} kernels:")
        for op, impl in sorted(res[f"kernels_{entry}"].items()):
            print(f"  {op:28s} {impl}")
    print(f"lowering both entry points ({layout} KV layout): {res['lower_seconds']} s")
    eng_head = f" {'eng-low':>9s} {'eng-eager':>9s} {'eng-fp32':>9s}" if engine is not None else ""
    print(f"{'call':10s} {'tokens':>6s} {'calc_diff':>10s} {'floor':>9s} {'vs fp32':>9s} argmax ok{eng_head}")
    for r in rows:
        fl = f"{r['floor']:9.2e} {r['vs_fp32']:9.2e}" if "floor" in r else f"{'-':>9s} {'-':>9s}"
        en = "".join(f" {r[k]:9.2e}" if k in r else f" {'-':>9s}"
                     for k in ("engine_vs_lowered", "engine_vs_eager", "engine_vs_fp32")) if engine is not None else ""
        print(f"{r['call']:10s} {r['tokens']:6d} {r['calc_diff']:10.2e} {fl} {str(r['argmax_equal']):6s} "
              f"{str(r['ok']):5s}{en}")
    print(("OK" if res["ok"] else "FAIL") + f": logits calc_diff < {bound:.0e} ({a.precision}), or (bf16 / fp8) the "
          f"engine within {margin}x the bf16 reference's distance to its float32 twin (floor)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

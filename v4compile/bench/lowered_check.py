"""GPU check of a registry target's lowering without AOTInductor: capture -> pipeline -> lower (Triton kernels
from the registry, fused ops composed from them), then run the lowered programs eagerly next to the reference.

    python -m v4compile.bench.lowered_check --preset tiny --target h200 --precision bf16 [--json OUT]

Prints which implementation every v4 op got and the logits calc_diff of prefill and of decode steps.
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
    ap.add_argument("--json")
    a = ap.parse_args(argv)

    from v4compile.graph.capture import capture, example_inputs
    from v4compile.graph.passes import run_pipeline
    from v4compile.model.config import ModelConfig
    from v4compile.model.reference import ReferenceModel
    from v4compile.targets import get_target
    from v4compile.targets.lower import lower
    from v4compile.validate import TOLERANCES, calc_diff

    tgt = get_target(a.target)
    model = ReferenceModel(ModelConfig.preset(a.preset), dtype=tgt.act_dtype(a.precision), device=tgt.device).eval()
    res: dict = {"preset": a.preset, "target": a.target, "precision": a.precision, "torch": torch.__version__}
    progs, t0 = {}, time.perf_counter()
    for entry in ("prefill", "decode"):
        g = run_pipeline(capture(model, entry, max_len=a.max_len), precision=a.precision)
        ex = example_inputs(model, entry, 2, 37, a.max_len)
        lo = lower(g, tgt, ex, 4)
        progs[entry] = lo.program.module()
        res[f"kernels_{entry}"] = lo.kernels
    res["lower_seconds"] = round(time.perf_counter() - t0, 1)
    gen = torch.Generator().manual_seed(0)
    B = 2
    prompt = torch.randint(0, model.cfg.vocab_size, (B, a.prompt), generator=gen).to(tgt.device)
    cache = model.new_cache(B, a.max_len)
    caches = list(model.new_cache(B, a.max_len).named_tensors().values())  # the engine's own, fresh
    with torch.no_grad():
        sp = torch.zeros(B, dtype=torch.int64, device=tgt.device)
        ref = model(prompt, sp, cache)
        got = progs["prefill"](prompt, sp, *caches)
        got = got[0] if isinstance(got, (tuple, list)) else got
        rows = [("prefill", a.prompt, calc_diff(got, ref), bool((got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95))]
        tok = ref[:, -1].argmax(-1, keepdim=True)
        for step in range(a.steps):
            sp = torch.full((B,), a.prompt + step, dtype=torch.int64, device=tgt.device)
            ref = model(tok, sp, cache)
            got = progs["decode"](tok, sp, *caches)
            got = got[0] if isinstance(got, (tuple, list)) else got
            rows.append((f"decode {step}", 1, calc_diff(got, ref), bool(torch.equal(got.argmax(-1), ref.argmax(-1)))))
            tok = ref[:, -1].argmax(-1, keepdim=True)
    bound = TOLERANCES["model_logits"][a.precision]
    res["rows"] = [dict(zip(("call", "tokens", "calc_diff", "argmax_equal"), r)) for r in rows]
    res["bound"] = bound
    res["ok"] = all(r[2] < bound for r in rows)
    for entry in ("prefill", "decode"):
        print(f"{entry} kernels:")
        for op, impl in sorted(res[f"kernels_{entry}"].items()):
            print(f"  {op:28s} {impl}")
    print(f"lowering both entry points: {res['lower_seconds']} s")
    print(f"{'call':10s} {'tokens':>6s} {'calc_diff':>10s} argmax")
    for r in rows:
        print(f"{r[0]:10s} {r[1]:6d} {r[2]:10.2e} {r[3]}")
    print(("OK" if res["ok"] else "FAIL") + f": logits calc_diff bound {bound:.0e} ({a.precision})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""How far a model's bf16 reference is from its own float32 twin on the build-time parity prompts: the precision
floor that the build's parity check falls back to when an engine misses the fixed logits bound (api.check_parity).

    python -m v4compile.bench.precision_floor --preset tiny [--max-len 256] [--device cpu] [--local] [--json OUT]

Prints, per parity prompt, logits calc_diff(bf16 reference, float32 twin) next to the fixed bound; with --local
also the error each bf16 layer (and the head) adds by itself on the twin's streams (ReferenceModel.teacher_forced):
the calibration of validate's model_hidden_local bound.
"""

from __future__ import annotations

import argparse
import json

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--checkpoint", help="checkpoint directory instead of a preset")
    ap.add_argument("--max-len", type=int, help="the engine's max_len (default: the config's max_seq_len)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--local", action="store_true", help="also the per-layer teacher-forced error")
    ap.add_argument("--json")
    a = ap.parse_args(argv)

    from v4compile.api import fp32_twin, parity_prompts, model_from_source
    from v4compile.validate import TOLERANCES, calc_diff

    model = model_from_source(a.checkpoint or a.preset, torch.bfloat16, a.device)
    twin = fp32_twin(model)
    max_len = a.max_len or model.cfg.max_seq_len
    rows = []
    with torch.no_grad():
        for p in parity_prompts(model.cfg, max_len, 4):
            tok = torch.tensor([p])
            ref = model(tok, 0, model.new_cache(1, max_len))
            tr: dict | None = {} if a.local else None
            exact = twin(tok, 0, twin.new_cache(1, max_len), trace=tr)
            rows.append({"tokens": len(p), "bf16_vs_fp32": calc_diff(ref, exact)})
            if a.local:
                outs, head = model.teacher_forced(tok, tr["hidden"])
                rows[-1]["local"] = [calc_diff(outs[i].float(), tr["hidden"][i].float()) for i in sorted(outs)]
                rows[-1]["head_local"] = calc_diff(head, exact)
    bound = TOLERANCES["model_logits"]["bf16"]
    print(f"{'prompt':>7s} {'bf16 vs fp32 twin':>18s}   (fixed bf16/fp8 bound {bound:.0e})")
    for r in rows:
        local = ("   local per layer " + " ".join(f"{v:.1e}" for v in r["local"]) + f", head {r['head_local']:.1e}"
                 if "local" in r else "")
        print(f"{r['tokens']:7d} {r['bf16_vs_fp32']:18.2e}{local}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"source": a.checkpoint or a.preset, "device": a.device, "max_len": max_len, "bound": bound,
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

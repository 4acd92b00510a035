"""Final measurements of a training run: accuracy of the trained weights and of each checkpoint format,
eager, fp32 and bf16 activations, at 2K and 8K; indexer needle-hit rates. Writes `metrics.json`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from v4compile.demo_model.evaluate import indexer_hit_rate, retrieval_accuracy
from v4compile.demo_model.export import write_demo_checkpoint
from v4compile.model.checkpoint import load_checkpoint
from v4compile.model.reference import ReferenceModel

EVAL_SEED = 7  # distinct from the training stream and the progress evals (seed 1234)
FORMATS = {"fp8_fp4": ("fp8", "fp4"), "bf16": ("bf16", "bf16"), "fp8_fp8": ("fp8", "fp8")}


def final_report(model: ReferenceModel, out: Path, n: int, deadline: float, device: torch.device,
                 lengths: tuple[int, ...] = (2048, 8192), log=print, metrics_dir: Path | None = None) -> dict:
    """Evaluate in priority order until `deadline` (time.time()); each result is logged and kept."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    res: dict = {"n": n, "seed": EVAL_SEED, "acc": {}, "indexer_hits": {}}
    model.eval()

    def run(name: str, m, L: int) -> None:
        if time.time() > deadline:
            log(f"skip {name}@{L}: out of time")
            return
        t = time.time()
        acc = retrieval_accuracy(m, n, L, EVAL_SEED, batch=16)
        res["acc"][f"{name}@{L}"] = acc
        log(f"FINAL {name}@{L}: {acc:.4f} ({time.time() - t:.1f}s)")

    for L in lengths:
        run("trained_fp32", model, L)
    for L in lengths:
        if time.time() < deadline:
            res["indexer_hits"][str(L)] = indexer_hit_rate(model, n, L, EVAL_SEED, batch=16)
            log(f"FINAL indexer hits @{L}: {res['indexer_hits'][str(L)]}")
    for fmt, (wd, ed) in FORMATS.items():
        path = write_demo_checkpoint(state, model.cfg, out / f"ckpt_{fmt}", wd, ed)
        for act in (torch.bfloat16, torch.float32):
            m = load_checkpoint(path, dtype=act, device=device).eval()
            for L in lengths:
                run(f"{fmt}_{str(act).removeprefix('torch.')}", m, L)
            del m
    (metrics_dir or out).joinpath("metrics.json").write_text(json.dumps(res, indent=1))
    return res

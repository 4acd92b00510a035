"""GPU check and timing of an engine's decode step: CUDA-graph replay vs the same program launched uncaptured.

For each batch size: a fresh session, every slot prefilled with the same seeded `context`-token prompt, then
`steps` greedy decode steps twice (graph, then uncaptured on an identical fresh session); prints the logits
calc_diff between the two modes (the same program: expect 0 or summation-order noise) and the median step
latency of each (wall clock around a synchronised step, as a serving loop sees it).

    python -m v4compile.bench.engine_decode ENGINE --batch 1,4 --context 2048 --steps 16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from v4compile.runtime.engine import Engine, load_engine
from v4compile.validate import calc_diff


def _run(engine: Engine, batch: int, context: int, steps: int, graphs: bool) -> tuple[list[torch.Tensor], list[float], float]:
    engine.use_cuda_graphs(graphs)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, engine.vocab_size, (1, context), generator=g)
    session = engine.new_session(batch)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for b in range(batch):
        logits = engine.prefill(prompt, 0, session, slots=[b])
    torch.cuda.synchronize()
    prefill_s = (time.perf_counter() - t0) / batch
    tok = logits[0, -1].argmax().reshape(1, 1).expand(batch, 1).cpu()
    outs, times = [], []
    for step in range(steps):
        pos = torch.full((batch,), context + step, dtype=torch.int64)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = engine.decode(tok, pos, session)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        outs.append(out.float().cpu())
        tok = out[:, 0].argmax(-1, keepdim=True).cpu()
    return outs, times, prefill_s


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("engine")
    ap.add_argument("--batch", default="1,4")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    if a.steps < 3:
        ap.error("--steps: at least 3 (the first two steps, capture included, are left out of the medians)")
    engine = load_engine(a.engine)
    if engine.device.type != "cuda":
        raise SystemExit("engine_decode: needs an engine for a CUDA target on a GPU")
    rows = []
    for batch in [int(x) for x in a.batch.split(",")]:
        batch = min(batch, engine.max_batch)
        g_out, g_t, pre = _run(engine, batch, a.context, a.steps, graphs=True)
        mode = engine.decode_mode
        u_out, u_t, _ = _run(engine, batch, a.context, a.steps, graphs=False)
        row = {"batch": batch, "context": a.context, "steps": a.steps, "graph_mode": mode,
               "graph_step_us": statistics.median(g_t[2:]) * 1e6, "first_graph_step_ms": g_t[0] * 1e3,
               "uncaptured_step_us": statistics.median(u_t[2:]) * 1e6,
               "calc_diff_graph_vs_uncaptured": max(calc_diff(x, y) for x, y in zip(g_out, u_out)),
               "prefill_ms_per_sequence": pre * 1e3}
        rows.append(row)
        print(f"batch {batch:4d} ctx {a.context}: graph {row['graph_step_us']:9.1f} us/step  uncaptured "
              f"{row['uncaptured_step_us']:9.1f} us/step  (x{row['uncaptured_step_us'] / row['graph_step_us']:.2f})  "
              f"calc_diff {row['calc_diff_graph_vs_uncaptured']:.2e}  first capture {row['first_graph_step_ms']:.0f} ms"
              f"  [{mode}]")
    result = {"engine": a.engine, "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "manifest_target": engine.manifest["target"], "precision": engine.manifest.get("precision"),
              "rows": rows}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()

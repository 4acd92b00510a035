"""Where a cpu engine build of the demo model spends its time: capture, lowering, the lowered program's node
count, AOTInductor in one process, and every C++ compile AOTInductor runs (name and seconds).

    python -m v4compile.bench.build_time [--entry prefill] [--json out.json]

Use an empty TORCHINDUCTOR_CACHE_DIR for first-run numbers (Inductor caches its ISA probes and kernels).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entry", default="prefill", choices=("prefill", "decode"))
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--json")
    a = ap.parse_args(argv)

    from torch._inductor import cpp_builder

    from v4compile.api import BuildStages, model_from_source
    from v4compile.build_worker import EntryJob, lower_entry
    from v4compile.demo import DEMO_CHECKPOINT, ENGINE_BATCH
    from v4compile.targets.aoti import compile_lowered

    builds: list[dict[str, Any]] = []
    lock = threading.Lock()
    original = cpp_builder.CppBuilder.build

    def timed(self, *args, **kwargs):  # wraps the real build; compile_lowered's own patch wraps this one
        t0 = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            with lock:
                builds.append({"name": Path(str(getattr(self, "_name", "?"))).name,
                               "seconds": round(time.perf_counter() - t0, 2)})

    stages = BuildStages(show=False)
    model = model_from_source(str(DEMO_CHECKPOINT), torch.bfloat16 if a.precision == "bf16" else torch.float32, "cpu")
    lowered = lower_entry(model, EntryJob("cpu", a.precision, 8256, ENGINE_BATCH, False), a.entry, stages)
    nodes = Counter(str(n.target) for n in lowered.program.graph.nodes if n.op == "call_function")
    cpp_builder.CppBuilder.build = timed
    try:
        t0 = time.perf_counter()
        compile_lowered(lowered)
        aoti_s = round(time.perf_counter() - t0, 1)
    finally:
        cpp_builder.CppBuilder.build = original
    result = {"torch": torch.__version__, "entry": a.entry, "stages": stages.times, "aoti_s": aoti_s,
              "call_function_nodes": sum(nodes.values()), "top_ops": nodes.most_common(12), "cpp_builds": builds}
    for k, v in stages.times.items():
        print(f"{k:32s} {v:7.1f} s")
    print(f"{'AOTInductor compile':32s} {aoti_s:7.1f} s   ({result['call_function_nodes']} call_function nodes)")
    for b in builds:
        print(f"  g++ {b['name'][-40:]:40s} {b['seconds']:6.1f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

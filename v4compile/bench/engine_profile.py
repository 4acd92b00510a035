"""Where an engine's decode step spends its time: the kernels of a few decode steps under torch.profiler.

`bench model --profile` runs it once, for the first (batch, context) of the plan, after the timed rows, with the
decode uncaptured (each kernel a launch of its own, so the profile attributes device time by kernel name; a
CUDA-graph replay runs the same kernels). Reports kernels per step, device-busy time per step (the sum of kernel
durations, to set against the timed step: the difference is launch gaps and host work) and the kernels that take
most of it. On the CPU the "kernels" are the profiled operators (self CPU time): structure only.
"""

from __future__ import annotations

from typing import Any

import torch

from v4compile.bench.model_measure import Plan, _decode_inputs, _sync, fill_random_

TOP = 15


def profile_decode(engine: Any, batch: int, context: int, plan: Plan, steps: int = 3) -> dict[str, Any]:
    """Profile `steps` uncaptured decode steps at (batch, context) after one warm-up step; see module doc."""
    from torch.profiler import ProfilerActivity, profile

    dev = engine.device
    cuda = dev.type == "cuda"
    mode = engine.decode_mode
    engine.use_cuda_graphs(False)
    try:
        session = engine.new_session(batch)
        fill_random_(session.caches, plan.seed)
        tokens, pos = _decode_inputs(engine.vocab_size, batch, context, plan)
        engine.decode(tokens[0], pos[0], session)  # warm-up (first-call costs stay out of the profile)
        _sync(dev)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            for i in range(1, steps + 1):
                engine.decode(tokens[i % len(tokens)], pos[i % len(pos)], session)
            _sync(dev)
    finally:
        engine.use_cuda_graphs(mode == "cuda-graph")
        engine.decode_mode = mode
    rows = []
    for e in prof.key_averages():
        if cuda:
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = e.self_device_time_total
        else:
            us = e.self_cpu_time_total
        if e.count:
            rows.append({"name": e.key, "count_per_step": e.count / steps, "us_per_step": us / steps})
    rows.sort(key=lambda r: -r["us_per_step"])
    busy = sum(r["us_per_step"] for r in rows)
    return {"batch": batch, "context": context, "steps": steps, "what": "CUDA kernels" if cuda else "CPU operators",
            "kernels_per_step": sum(r["count_per_step"] for r in rows), "busy_us_per_step": busy,
            "distinct": len(rows), "top": rows[:TOP]}

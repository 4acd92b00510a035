"""AOTInductor emit: compile each lowered entry point and package them as ONE model.pt2 with two models.

Constants (weights) are embedded in each model's shared library: prefill and decode each carry a copy
(`package_constants_in_so=False` + binding one user-managed set at load is the planned fix; not done yet,
and the manifest says `"weights": "embedded-per-entry-point"`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from v4compile.errors import ExportError
from v4compile.targets.lower import Lowered

log = logging.getLogger(__name__)

WEIGHTS_MODE = "embedded-per-entry-point"

INDUCTOR_OPTIONS = {"emulate_precision_casts": True}
"""Round fused intermediates to their dtype as eager does: bf16 values feed FP8 / FP4 fake-quantisation, where
keeping extra precision flips rounding decisions (measured on tiny bf16 without it: logits calc_diff 1.1e-2)."""


def _compile(lowered: Lowered, options: dict[str, Any]) -> list:
    ep = lowered.program
    try:
        gm = ep.module(check_guards=False)
    except TypeError:  # torch < 2.13
        gm = ep.module()
    args, kwargs = ep.example_inputs
    t0 = time.perf_counter()
    try:
        files = torch._inductor.aot_compile(gm, args, kwargs, options={**INDUCTOR_OPTIONS, **options,
                                                                        "aot_inductor.package": True})
    except Exception as e:  # Inductor raises many types; one typed error names the entry point
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"AOTInductor compile of the {lowered.entry} entry point failed: "
                          f"{type(e).__name__}: {first}") from e
    log.info("AOTInductor compiled %s in %.1fs", lowered.entry, time.perf_counter() - t0)
    return files


def package(entries: dict[str, Lowered], path: Path, options: dict[str, Any] | None = None,
            seconds: dict[str, float] | None = None) -> Path:
    """Compile every entry point and write one .pt2 holding them under their names ('prefill', 'decode',
    'trace'); names mapped to the same Lowered object share one compile (the archive still holds one model per
    name). seconds: filled with each compiled entry's compile time."""
    from torch._inductor.package import package_aoti

    compiled: dict[int, list] = {}  # one compile per distinct program (decode may reuse prefill's)
    files = {}
    for name, lo in entries.items():
        if id(lo) not in compiled:
            t0 = time.perf_counter()
            compiled[id(lo)] = _compile(lo, dict(options or {}))
            if seconds is not None:
                seconds[name] = round(time.perf_counter() - t0, 2)
        files[name] = compiled[id(lo)]
    package_aoti(str(path), files)
    return path

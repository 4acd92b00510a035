"""AOTInductor emit: compile each lowered entry point and package them as ONE model.pt2 with one model each.

Constants (weights) are not inside the models' shared libraries (`aot_inductor.package_constants_in_so=False`):
compile_lowered returns them next to the files, and the build writes the constants of every model once into
the engine's weights.safetensors (runtime/weights.py), which the runtimes bind to each model at load time.

Which process compiles what is api.build's business: several entry points are built in parallel worker
processes (v4compile/build_worker.py), each calling compile_lowered; package_files packs their files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from v4compile.errors import ExportError
from v4compile.targets.lower import Lowered

log = logging.getLogger(__name__)

WEIGHTS_MODE = "external"  # manifest build.weights: one weights file bound to every model at load time
EXTERNAL_WEIGHTS = {"aot_inductor.package_constants_in_so": False,
                    "aot_inductor.package_constants_on_disk_format": "pickle_weights"}  # -> a Weights object

INDUCTOR_OPTIONS = {"emulate_precision_casts": True}
"""Round fused intermediates to their dtype as eager does: bf16 values feed FP8 / FP4 fake-quantisation, where
keeping extra precision flips rounding decisions (measured on tiny bf16 without it: logits calc_diff 1.1e-2)."""
if hasattr(torch._inductor.config.triton, "coalesce_tiling_analysis"):
    INDUCTOR_OPTIONS["triton.coalesce_tiling_analysis"] = False
    # GPU codegen only. torch 2.11's coalescing analysis (tiling_utils.get_pw_red_splits) asserts on a fused node
    # of the production-layout tiny prefill: the bare "InductorError: AssertionError:" of session 6, traceback read
    # in session 7 (docs/perf/engines.md). The analysis only chooses tile shapes.


@contextlib.contextmanager
def _wrapper_compiled_alongside_kernels() -> Iterator[None]:
    """AOTInductor compiles the model's wrapper .cpp and its kernel .cpp one after the other (torch 2.11-2.13
    codecache: `wrapper_builder.build(); kernel_builder.build()`), then links. Here the wrapper's compile-only
    build runs in a thread (g++ is a subprocess: the GIL is free) while the kernel file compiles, and every
    later build waits for it. Measured on the 2-core CI machine, demo model: wrapper 9.6 s, kernels 13.1 s.
    Any build that does not look like that sequence (other torch versions) runs as before."""
    from torch._inductor import cpp_builder

    original = cpp_builder.CppBuilder.build
    wrapper: dict[str, Any] = {}  # the wrapper compile in flight: {"thread": Thread, "error": exception or None}

    def join() -> None:
        if wrapper:
            wrapper.pop("thread").join()
            if (err := wrapper.pop("error", None)) is not None:
                raise err

    def compile_wrapper(self, args, kwargs) -> None:
        try:
            original(self, *args, **kwargs)
        except BaseException as e:  # re-raised in the caller's thread by join()
            wrapper["error"] = e

    def build(self, *args, **kwargs):
        name = str(getattr(self, "_name", ""))
        compile_only = getattr(self, "_compile_only", False) is True
        if compile_only and name.endswith(".wrapper") and not wrapper:
            wrapper["thread"] = threading.Thread(target=compile_wrapper, args=(self, args, kwargs), daemon=True)
            wrapper["thread"].start()
            return None
        if not (compile_only and name.endswith(".kernel")):
            join()
        return original(self, *args, **kwargs)

    cpp_builder.CppBuilder.build = build
    try:
        yield
        join()
    finally:
        cpp_builder.CppBuilder.build = original
        if "thread" in wrapper:
            wrapper["thread"].join()


def compile_lowered(lowered: Lowered, options: dict[str, Any] | None = None
                    ) -> tuple[list[str], dict[str, torch.Tensor]]:
    """AOTInductor-compile one lowered entry point; returns (the files package_aoti packs, the model's constants
    {fqn: tensor} that the runtime binds), ExportError naming the entry point on failure."""
    options = dict(options or {})
    ep = lowered.program
    try:
        gm = ep.module(check_guards=False)
    except TypeError:  # torch < 2.13
        gm = ep.module()
    args, kwargs = ep.example_inputs
    t0 = time.perf_counter()
    try:
        with _wrapper_compiled_alongside_kernels():
            out = torch._inductor.aot_compile(gm, args, kwargs, options={**INDUCTOR_OPTIONS, **EXTERNAL_WEIGHTS,
                                                                          **options, "aot_inductor.package": True})
    except Exception as e:  # Inductor raises many types; one typed error names the entry point
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"AOTInductor compile of the {lowered.entry} entry point failed: "
                          f"{type(e).__name__}: {first}") from e
    log.info("AOTInductor compiled %s in %.1fs", lowered.entry, time.perf_counter() - t0)
    files = [str(f) for f in out if isinstance(f, (str, os.PathLike))]
    weights = [f for f in out if not isinstance(f, (str, os.PathLike))]
    if len(weights) > 1 or any(not hasattr(w, "items") for w in weights):
        raise ExportError(f"AOTInductor returned {[type(w).__name__ for w in weights]} next to the {lowered.entry} "
                          "files; expected at most one Weights mapping")
    return files, {fqn: value[0] for w in weights for fqn, value in w.items()}


def package_files(files: dict[str, list], path: Path) -> Path:
    """Write one .pt2 holding a model per name ('prefill', 'decode', 'trace') from compile_lowered's file lists
    (names given the same list share its files)."""
    from torch._inductor.package import package_aoti

    package_aoti(str(path), files)
    return path

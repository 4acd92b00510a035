"""One engine entry point from model to AOTInductor files (capture -> passes -> lowering -> compile), and the
parallel build that runs each entry point in its own Python process.

Inductor's code generation is single-threaded Python: an h200 build compiles prefill and decode in ~3.5 min
each, a cpu build with `--trace` compiles two programs. Each worker process rebuilds its entry point from the
same source (preset name, checkpoint directory, or the parent's weights saved with torch.save) and returns the
files of its compile plus what each op got; the parent packages them. The program itself is not shipped to the
worker: a `torch.export.save` / `load` round trip of our lowered programs is not faithful on torch 2.13 (the
loaded graph fails in eager with "Can't detach views in-place" and its AOTInductor compile reads wrong inputs;
measured on the tiny cpu prefill program).

    python -m v4compile.build_worker WORKDIR     # one job (job.json in WORKDIR); used by build_entries_parallel

V4COMPILE_PARALLEL_COMPILE=0 builds the entry points one after the other in the calling process.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from v4compile.errors import ExportError
from v4compile.runtime.weights import WEIGHTS_FILE, read_weights, write_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EntryJob:
    """What every entry point of one build shares."""

    target: str
    precision: str
    max_len: int
    max_batch: int
    allow_lossy_repack: bool
    kv_layout: str = "reference"  # the engine's cache layout (model/cache.py)


PARALLEL_MAX_BYTES = 4 << 30
"""Above this many bytes of weights a build compiles its entry points one after the other in one process: each
worker holds its own copy of the model and of the passes' new constants (the bench preset: 27 GB of weights,
39 GB of FP8 experts), while in one process the entry points share them (quantize_moe_experts' memo)."""


def parallel_wanted(n_programs: int, weight_bytes: int = 0) -> bool:
    if n_programs < 2 or os.environ.get("V4COMPILE_PARALLEL_COMPILE", "1") == "0":
        return False
    if weight_bytes > PARALLEL_MAX_BYTES:
        log.info("%.1f GB of weights: entry points compiled one after the other (parallel above %.0f GB would "
                 "hold a copy per process)", weight_bytes / 1e9, PARALLEL_MAX_BYTES / 1e9)
        return False
    return True


def lower_entry(model: Any, job: EntryJob, entry: str, stages: Any, memo: dict | None = None) -> Any:
    """capture -> PIPELINE -> lowering of one entry point of `model`; `stages(name)` times each step. `memo`
    (one dict per build) lets the entry points of one process share the FP8 experts quantize_moe_experts makes."""
    from v4compile.graph.capture import capture, example_inputs, example_len
    from v4compile.graph.passes import run_pipeline
    from v4compile.targets import get_target
    from v4compile.targets.lower import lower

    tgt = get_target(job.target)
    with stages(f"capture {entry}"):
        g = capture(model, entry, max_len=job.max_len, kv_layout=job.kv_layout)
    with stages(f"passes {entry}"):
        g = run_pipeline(g, precision=job.precision,
                         pass_options={"quantize_moe_experts": {"allow_lossy": job.allow_lossy_repack, "memo": memo}})
    with stages(f"lower {entry} ({tgt.name})"):
        ex = example_inputs(model, entry, 2, example_len(model.cfg, job.max_len), job.max_len, job.kv_layout)
        return lower(g, tgt, ex, max(2, job.max_batch))


def _source_spec(source: Any, model: Any, work: Path) -> dict[str, str]:
    """How a worker gets the same model: the preset name or checkpoint directory it came from, else the
    parent's weights and config saved with torch.save (a ReferenceModel or ModelConfig from a Python caller)."""
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        return {"checkpoint": str(Path(source).resolve())}
    elif isinstance(source, str):
        return {"preset": source}
    path = work / "model.pt"
    torch.save({"config": model.cfg.to_dict(), "quantized": model.quantized, "state_dict": model.state_dict()}, path)
    return {"state_dict": str(path)}


def _die_with_parent() -> None:
    """In the worker before exec (Linux): SIGKILL it when the building process dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


def build_entries_parallel(source: Any, model: Any, job: EntryJob,
                           entries: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Build every entry point in its own worker process; {entry: {"files", "weights", "kernels", "seconds"}} (the
    files lie in Inductor's cache directory, as for an in-process compile; the weights {fqn: tensor} are read back
    to the CPU from each worker's weights file). ExportError naming the entry point and the
    worker's last error line when a worker fails (the others are stopped). Job files and logs go to a temporary
    directory removed at the end."""
    with tempfile.TemporaryDirectory(prefix="v4compile-build-") as scratch:
        return _run_workers(source, model, job, entries, Path(scratch))


def _run_workers(source: Any, model: Any, job: EntryJob, entries: tuple[str, ...],
                 work_root: Path) -> dict[str, dict[str, Any]]:
    spec = _source_spec(source, model, work_root)
    procs = []
    try:
        for entry in entries:
            work = work_root / entry
            work.mkdir()
            (work / "job.json").write_text(json.dumps({"source": spec, "entry": entry, **asdict(job)}))
            with open(work / "worker.log", "w") as log_f:
                p = subprocess.Popen([sys.executable, "-m", "v4compile.build_worker", str(work)],
                                     stdout=log_f, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
            procs.append((entry, work, p))
        results = {}
        for entry, work, p in procs:
            rc = p.wait()
            done = work / "result.json"
            if rc != 0 or not done.exists():
                text = (work / "worker.log").read_text(errors="replace")
                lines = text.strip().splitlines()
                log.debug("%s worker log (last 40 lines):\n%s", entry, "\n".join(lines[-40:]))
                last = next((line.strip() for line in reversed(lines) if line.strip()), f"exit code {rc}")
                kept = _keep_log(entry, text)
                raise ExportError(f"building the {entry} entry point failed (worker exit {rc}): {last[:400]} "
                                  f"(the worker's full log, traceback included: {kept})")
            results[entry] = json.loads(done.read_text())
            results[entry]["weights"] = read_weights(work, results[entry]["weights"], torch.device("cpu"))[entry]
        return results
    finally:
        for _, _, p in procs:  # on any failure or Ctrl-C: no worker outlives the build
            if p.poll() is None:
                p.kill()
                p.wait()


def _keep_log(entry: str, text: str) -> str:
    """Save a failed worker's log outside the scratch directory (removed with the build) and return its path: an
    error's last line (e.g. Inductor's bare "AssertionError:") rarely says where it came from."""
    fd, path = tempfile.mkstemp(prefix=f"v4compile-{entry}-worker-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def _work(work: Path) -> None:
    """One job written by build_entries_parallel: job.json -> result.json (files, kernels, seconds)."""
    from v4compile.api import BuildStages, model_from_source
    from v4compile.targets import get_target
    from v4compile.targets.aoti import compile_lowered

    job = json.loads((work / "job.json").read_text())
    entry, src = job.pop("entry"), job.pop("source")
    ej = EntryJob(**job)
    tgt = get_target(ej.target)
    stages = BuildStages(show=False)
    with stages(f"load model {entry}"):
        if "state_dict" in src:
            from v4compile.model.checkpoint import model_from_state_dict
            from v4compile.model.config import ModelConfig

            saved = torch.load(src["state_dict"], weights_only=True)
            model = model_from_state_dict(ModelConfig.from_dict(saved["config"]), saved["state_dict"],
                                          dtype=tgt.act_dtype(ej.precision), device=tgt.device,
                                          quantized=saved["quantized"])
        else:
            model = model_from_source(src.get("checkpoint") or src["preset"], tgt.act_dtype(ej.precision), tgt.device)
    lowered = lower_entry(model, ej, entry, stages)
    t0 = time.perf_counter()
    files, weights = compile_lowered(lowered)
    stages.times[f"AOTInductor compile {entry}"] = round(time.perf_counter() - t0, 2)
    section = write_weights({entry: weights}, work / WEIGHTS_FILE)
    (work / "result.json").write_text(json.dumps({"files": files, "weights": section, "kernels": lowered.kernels,
                                                  "seconds": stages.times}))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    try:
        _work(Path(sys.argv[1]))
    except Exception as e:  # the parent reports the last line of this log
        import traceback

        traceback.print_exc()
        print(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}", file=sys.stderr)
        raise SystemExit(1)

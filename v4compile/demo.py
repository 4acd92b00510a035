"""`v4compile demo`: the embedded main job.

The shipped demo model (v4compile/assets/demo_model: a 4-layer V4 with window / CSA / HCA / CSA attention,
trained by `v4compile train-demo` on long-context key-value retrieval, official checkpoint format) is built into
an engine for the machine present, validated against the eager reference, and asked retrieval queries whose
needle sits thousands of tokens back; it prints the parity table and eager-vs-engine task accuracy.

The engine is cached under ~/.cache/v4compile/demo (or $V4COMPILE_CACHE) keyed by the checkpoint's bytes, the
target, the precision and the versions of v4compile and torch, so a second run only loads it (load_engine
checks its checksums as for any engine).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

import v4compile
from v4compile.errors import EngineError, InputError

DEMO_CHECKPOINT = Path(__file__).parent / "assets" / "demo_model"
DEFAULT_CONTEXTS = (2048, 8192)
ENGINE_BATCH = 4
VALIDATE_LEN = 1024


def default_target() -> tuple[str, str]:
    """(target, precision) for the machine present: h100 / h200 fp8 on an sm_90 GPU, else cpu bf16."""
    if torch.cuda.is_available() and torch.cuda.get_device_capability(0) == (9, 0):
        name = torch.cuda.get_device_name(0).lower()
        return ("h100" if "h100" in name else "h200"), "fp8"
    return "cpu", "bf16"


def _cache_root() -> Path:
    return Path(os.environ.get("V4COMPILE_CACHE", Path.home() / ".cache" / "v4compile")) / "demo"


def _engine_key(checkpoint: Path, target: str, precision: str, max_len: int) -> str:
    h = hashlib.sha256()
    for f in sorted(checkpoint.iterdir()):
        if f.suffix in (".json", ".safetensors") and f.name != "training.json":
            h.update(f.name.encode())
            h.update(f.read_bytes())
    from v4compile.runtime.manifest import FORMAT_VERSION  # a new engine format gets a new directory
    from v4compile.targets import get_target  # and a new default KV layout a new one too

    layout = get_target(target).kv_layout(precision)
    h.update(f"{target}|{precision}|{layout}|{max_len}|{v4compile.__version__}|{torch.__version__}|{FORMAT_VERSION}"
             .encode())
    return h.hexdigest()[:16]


def _engine_dir(target: str, precision: str, max_len: int) -> Path:
    return _cache_root() / f"{target}-{precision}-{_engine_key(DEMO_CHECKPOINT, target, precision, max_len)}"


def _eager_answers(precision: str, contexts: tuple[int, ...], n_queries: int) -> dict[int, dict[str, Any]]:
    """The eager model's retrieval answers on the cpu, one thread: run in a second process while the first
    builds the engine (AOTInductor's code generation is single-threaded, so the second core is otherwise idle)."""
    from v4compile.demo_model.evaluate import example_queries
    from v4compile.model.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    act = torch.float32 if precision == "fp32" else torch.bfloat16
    model = load_checkpoint(DEMO_CHECKPOINT, dtype=act).eval()
    out = {}
    for ctx in contexts:
        t0 = time.perf_counter()
        out[ctx] = {"rows": example_queries(model, n_queries, ctx, seed=ctx), "seconds": time.perf_counter() - t0}
    return out


def demo_engine(target: str, precision: str, max_len: int, *, rebuild: bool = False,
                console: Console | None = None, out: Path | None = None) -> tuple[Path, bool]:
    """The cached engine of the shipped model for (target, precision); builds it when missing or unloadable.
    `out`: its cache directory when the caller already has it (`_engine_dir` hashes the checkpoint's bytes).
    Returns (engine dir, whether it was built now)."""
    from v4compile.api import build, load_engine

    out = out or _engine_dir(target, precision, max_len)
    if out.exists() and not rebuild:
        try:
            load_engine(out)
            return out, False
        except EngineError as e:  # stale or damaged cache entry: say so and rebuild it
            if console:
                console.print(f"[yellow]cached engine not usable ({e}); rebuilding[/yellow]")
    out.parent.mkdir(parents=True, exist_ok=True)
    # check=False: the demo validates the engine right after (the full ParityReport instead of the summary)
    build(str(DEMO_CHECKPOINT), target, precision, out, max_batch=ENGINE_BATCH, max_len=max_len, check=False,
          progress=console is not None and not console.quiet, overwrite=True)
    return out, True


def run_demo(target: str | None = None, precision: str | None = None, contexts: tuple[int, ...] = DEFAULT_CONTEXTS,
             n_queries: int = 2, steps: int = 4, rebuild: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Build (or load) the demo engine, validate it, ask retrieval queries; returns the numbers as a dict."""
    from v4compile.api import load_engine
    from v4compile.demo_model.evaluate import example_queries, format_examples
    from v4compile.model.checkpoint import load_checkpoint
    from v4compile.parity_run import default_prompts
    from v4compile.validate import validate

    console = Console(quiet=quiet, stderr=False)
    auto_target, auto_precision = default_target()
    target, precision = target or auto_target, precision or (auto_precision if target in (None, auto_target) else None)
    precision = precision or ("bf16" if target == "cpu" else "fp8")
    if n_queries < 1 or not contexts:
        raise InputError(f"demo: n_queries {n_queries} and contexts {contexts}: need >= 1 query and one context")
    max_len = max(contexts) + 64
    t0 = time.perf_counter()
    result: dict[str, Any] = {"target": target, "precision": precision, "checkpoint": str(DEMO_CHECKPOINT)}

    console.print(f"[bold]v4compile demo[/bold]: shipped retrieval model ({DEMO_CHECKPOINT.name}), target "
                  f"{target}, precision {precision}")
    eager_job = None
    cached = _engine_dir(target, precision, max_len)
    if target == "cpu" and (rebuild or not cached.exists()):
        import concurrent.futures
        import multiprocessing

        pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        eager_job = pool.submit(_eager_answers, precision, tuple(contexts), n_queries)
        pool.shutdown(wait=False)
    path, built = demo_engine(target, precision, max_len, rebuild=rebuild, console=console, out=cached)
    result["engine"], result["built"] = str(path), built
    result["build_or_load_s"] = round(time.perf_counter() - t0, 1)
    console.print(("built" if built else "loaded cached") + f" engine {path} ({result['build_or_load_s']} s)")
    engine = load_engine(path)
    act = torch.float32 if precision == "fp32" else torch.bfloat16
    model = load_checkpoint(DEMO_CHECKPOINT, dtype=act, device=engine.device).eval()

    t1 = time.perf_counter()
    # seeded prompts of 1020 / 511 / 7 / 1 tokens (validate's default set for a 1024-token budget): the long
    # contexts are exercised by the retrieval queries below
    report = validate(engine, model, default_prompts(model.cfg, VALIDATE_LEN, steps), steps=steps)
    result["parity"] = report.to_dict()
    result["parity_ok"] = report.ok
    result["validate_s"] = round(time.perf_counter() - t1, 1)
    console.print(report.table())

    acc = Table(title="retrieval: key -> value, needle thousands of tokens back (eager vs engine)")
    for col in ("context", "queries", "eager acc", "engine acc", "answers equal", "seconds"):
        acc.add_column(col, justify="right")
    result["retrieval"] = {}
    # eager answers: computed while the engine was built (cpu, first run), else here
    eager = eager_job.result() if eager_job is not None else None
    for ctx in contexts:
        t2 = time.perf_counter()
        if eager is None:
            eager_rows = example_queries(model, n_queries, ctx, seed=ctx)
            eager_s = time.perf_counter() - t2
        else:
            eager_rows, eager_s = eager[ctx]["rows"], eager[ctx]["seconds"]
        t3 = time.perf_counter()
        engine_rows = example_queries(engine, n_queries, ctx, seed=ctx)
        same = sum(a["answer"] == b["answer"] for a, b in zip(eager_rows, engine_rows))
        r = {"queries": n_queries, "eager_accuracy": sum(x["correct"] for x in eager_rows) / n_queries,
             "engine_accuracy": sum(x["correct"] for x in engine_rows) / n_queries, "answers_equal": same,
             "examples": engine_rows, "eager_seconds": round(eager_s, 1),
             "eager_during_build": eager is not None, "engine_seconds": round(time.perf_counter() - t3, 1),
             "seconds": round(eager_s + time.perf_counter() - t3, 1)}
        result["retrieval"][ctx] = r
        acc.add_row(str(ctx), str(n_queries), f"{r['eager_accuracy']:.0%}", f"{r['engine_accuracy']:.0%}",
                    f"{same}/{n_queries}", f"{r['seconds']:.0f}")
        console.print(f"[bold]{ctx}-token context[/bold], engine answers:\n" + format_examples(engine_rows))
    console.print(acc)
    result["decode_mode"] = engine.decode_mode if engine.device.type == "cuda" else "cpu"
    result["total_s"] = round(time.perf_counter() - t0, 1)
    # the bar: engine task accuracy within 1 point of eager (with a handful of queries: the same answers)
    result["ok"] = bool(report.ok and all(abs(r["engine_accuracy"] - r["eager_accuracy"]) <= 0.01
                                          for r in result["retrieval"].values()))
    console.print(("[green]OK[/green]" if result["ok"] else "[red]FAILED[/red]") +
                  f": parity {'within' if report.ok else 'OUTSIDE'} the tolerance table, total {result['total_s']} s")
    return result

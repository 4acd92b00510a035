"""Public API: `build(source, target, precision, out_dir) -> Path` and `load_engine(path) -> Engine`.

build = capture (graph/capture) -> PIPELINE (graph/passes) -> lowering (targets/lower) -> AOTInductor package
(targets/aoti) -> parity check against eager -> manifest; everything is written into a temporary directory
next to out_dir and renamed into place, so an exception or Ctrl-C leaves neither an engine nor a temp dir.
This is the only module that wires compiler, targets and runtime together (DESIGN.md section 3).
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from pathlib import Path
from typing import Any, Iterator

import torch

import v4compile
from v4compile.errors import ConfigError, ParityError
from v4compile.model.config import ModelConfig
from v4compile.model.reference import ReferenceModel
from v4compile.runtime import manifest as mf
from v4compile.runtime.engine import Engine, load_engine
from v4compile.validate import TOLERANCES

__all__ = ["build", "load_engine", "Engine", "eager_generate", "check_parity"]

MODEL_LOGITS_CALC_DIFF = TOLERANCES["model_logits"]  # the one tolerance table (DESIGN.md section 8)
"""Build-time check: engine vs eager logits calc_diff bound by precision. fp32: only summation order differs
(tiny: 4e-15). bf16: accumulation order moves FP8/FP4 fake-quant roundings; on tiny the eager model's own
one-token decode vs prefill of the same tokens differs by 8.4e-3, the cpu engine vs eager by 1.7e-3."""


def model_from_source(source: Any, act_dtype: torch.dtype, device: str = "cpu") -> ReferenceModel:
    """Preset name, ModelConfig, checkpoint directory or ReferenceModel -> an eval-mode ReferenceModel on the
    target's device (a given model is moved there)."""
    if isinstance(source, ReferenceModel):
        if source.act_dtype != act_dtype:
            raise ConfigError(f"model activation dtype {source.act_dtype} does not match the precision's {act_dtype}")
        return source.to(device).eval()
    elif isinstance(source, ModelConfig):
        return ReferenceModel(source, dtype=act_dtype, device=device).eval()
    elif isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        from v4compile.model.checkpoint import load_checkpoint

        return load_checkpoint(source, dtype=act_dtype, device=device).eval()
    elif isinstance(source, str):
        return ReferenceModel(ModelConfig.preset(source), dtype=act_dtype, device=device).eval()
    else:
        raise ConfigError(f"build source {source!r}: expected a preset name, a ModelConfig, a checkpoint "
                          "directory or a ReferenceModel")


class BuildStages:
    """Names each build stage and times it; prints one line per stage with rich when `show`."""

    def __init__(self, show: bool) -> None:
        self.show, self.times = show, {}
        if show:
            from rich.console import Console

            self.console = Console(stderr=True)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        if self.show:
            with self.console.status(f"{name} ..."):
                yield
        else:
            yield
        self.times[name] = round(time.perf_counter() - t0, 2)
        if self.show:
            self.console.print(f"[green]done[/green] {name} ({self.times[name]:.1f}s)")


def build(source: Any, target: str = "cpu", precision: str = "fp32", out_dir: str | Path = "engine", *,
          check: bool = True, max_batch: int | None = None, max_len: int | None = None,
          progress: bool = True, overwrite: bool = False, trace: bool = False,
          allow_lossy_repack: bool = False, via: str = "onnx", kv_layout: str | None = None) -> Path:
    """Compile `source` for `target` into an engine directory `out_dir` (see module doc); returns its path.

    check: run the build-time parity check (engine vs eager) and record it in the manifest; a failure raises
    ParityError and leaves no engine. max_batch / max_len default to the config's max_batch_size / max_seq_len.
    trace: also compile the "trace" program (prefill returning per-layer hidden states, indexer picks and
    expert ids, through the same passes and lowering) that `validate` uses for its per-layer metrics.
    allow_lossy_repack: let quantize_moe_experts (fp8) accept a lossy MXFP4 -> FP8 repack (reported).
    target "tensorrt": ONNX with plugin nodes (+ a TensorRT plan where TensorRT is installed) or, with
    via="torch_tensorrt", Torch-TensorRT; see targets/tensorrt.py (max_batch / max_len / check as above).
    kv_layout: the engine's cache layout, "production" (V4-SPEC 6.2 encodings: 3 514 B / token at Flash) or
    "reference" (act-dtype rows); default: the target's default_kv_layout for bf16 / fp8 (production on
    cpu, h100 and h200), else reference (Target.kv_layout; a production
    request that cannot be honoured is a ConfigError / TargetError).
    """
    if target == "tensorrt":
        from v4compile.targets.tensorrt import TENSORRT, build_tensorrt

        TENSORRT.kv_layout(precision, kv_layout)  # reference only: its plugins read act-dtype caches
        model = model_from_source(source, TENSORRT.act_dtype(precision), "cpu")  # exported on the CPU
        return build_tensorrt(model, out_dir, via=via, precision=precision, max_batch=max_batch, max_len=max_len,
                              check=check, overwrite=overwrite)
    from v4compile.build_worker import EntryJob, build_entries_parallel, lower_entry, parallel_wanted
    from v4compile.graph.capture import trace_outputs
    from v4compile.runtime.weights import WEIGHTS_FILE, write_weights
    from v4compile.targets import check_machine, get_target
    from v4compile.targets.aoti import WEIGHTS_MODE, compile_lowered, package_files

    tgt = get_target(target)
    act = tgt.act_dtype(precision)
    layout = tgt.kv_layout(precision, kv_layout)
    check_machine(tgt)
    out = mf.check_out_dir(out_dir, overwrite)
    stages = BuildStages(progress)
    with stages("load model"):
        model = model_from_source(source, act, tgt.device)
    cfg = model.cfg
    max_batch, max_len = tgt.engine_limits(cfg, max_batch, max_len)
    with mf.atomic_engine_dir(out) as tmp:  # an exception or Ctrl-C leaves neither an engine nor a temp dir
        entries = (("prefill", "decode") if tgt.separate_decode else ("prefill",)) + (("trace",) if trace else ())
        job = EntryJob(tgt.name, precision, max_len, max_batch, allow_lossy_repack, layout)
        kernels: dict[str, str] = {}
        weight_bytes = sum(t.nbytes for t in model.state_dict().values())
        if parallel_wanted(len(entries), weight_bytes):  # each program in its own process: capture .. compile
            with stages(f"capture, passes, lower, AOTInductor compile ({len(entries)} programs in parallel)"):
                built = build_entries_parallel(source, model, job, entries)
            files = {entry: b["files"] for entry, b in built.items()}
            weights = {entry: b["weights"] for entry, b in built.items()}
            for entry, b in built.items():
                kernels.update(b["kernels"])
                stages.times.update({f"(within it) {name}": t for name, t in b["seconds"].items()})
        else:
            files, weights, memo = {}, {}, {}  # memo: the entry points share the FP8 experts
            for entry in entries:
                lo = lower_entry(model, job, entry, stages, memo)
                kernels.update(lo.kernels)
                with stages(f"AOTInductor compile {entry}"):
                    files[entry], weights[entry] = compile_lowered(lo)
                del lo
            del memo  # its FP8 experts live on in `weights` only until they are written
        if not tgt.separate_decode:
            files["decode"], weights["decode"] = files["prefill"], weights["prefill"]  # T = 1 through prefill
        with stages("package"):
            package_files(files, tmp / mf.PACKAGE)
        with stages("weights"):
            weights_section = write_weights(weights, tmp / WEIGHTS_FILE)
            del weights
            if tgt.device != "cpu":  # free the programs' constants (39 GB of FP8 experts for bench) on the GPU
                gc.collect()         # before the parity check loads the engine's own (~1 s on the CPU: skipped)
        manifest = {
            "format_version": mf.FORMAT_VERSION, "v4compile": v4compile.__version__, "torch": torch.__version__,
            "triton": _triton_version(), "target": tgt.name, "arch": tgt.arch, "precision": precision,
            "tested_target": tgt.tested, "config": cfg.to_dict(),
            "build": {"max_batch": max_batch, "max_len": max_len, "check": check, "weights": WEIGHTS_MODE,
                      "trace": trace, "source": _source_record(source), "stage_seconds": stages.times},
            "kernels": dict(sorted(kernels.items())),
            "entry_points": {
                "prefill": {"model": "prefill", "batch": [1, max_batch], "tokens": [1, max_len]},
                "decode": {"model": "decode", "batch": [1, max_batch], "tokens": [1, 1],
                           "program": "decode" if tgt.separate_decode else "prefill"},
                **({"trace": {"model": "trace", "batch": [1, max_batch], "tokens": [1, max_len],
                              "outputs": trace_outputs(cfg)}} if trace else {}),
            },
            "cache": {"max_batch": max_batch, "max_len": max_len, "kv_layout": layout,
                      "tensors": mf.cache_layout(cfg, max_len, act, layout)},
            "weights": weights_section,
            "parity": None,
        }
        with stages("checksums"):
            manifest = mf.write_manifest(tmp, manifest)
        if check:
            with stages("parity check vs eager"):
                manifest["parity"] = check_parity(model, load_engine(tmp), precision)
            mf.write_manifest(tmp, manifest, rehash=False)
    return out


def _source_record(source: Any) -> dict[str, str] | None:
    """What the engine was built from, for `validate` without --preset / --checkpoint (None: a Python object)."""
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        return {"checkpoint": str(Path(source).resolve())}
    elif isinstance(source, str):
        return {"preset": source}
    else:
        return None


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


@torch.no_grad()
def eager_generate(model: ReferenceModel, prompt: list[int], max_new_tokens: int,
                   stop_tokens: tuple[int, ...] = ()) -> list[int]:
    """Greedy continuation of ONE prompt with the eager reference (the semantics engines are checked against)."""
    cache = model.new_cache(1, len(prompt) + max(max_new_tokens, 1))
    logits = model(torch.tensor([prompt]), 0, cache)[0, -1]
    out: list[int] = []
    for step in range(max_new_tokens):
        t = int(logits.argmax())
        out.append(t)
        if t in stop_tokens or step == max_new_tokens - 1:
            break
        logits = model(torch.tensor([[t]]), len(prompt) + step, cache)[0, -1]
    return out


PARITY_PROMPT_CAP = 4096
"""Longest prompt of the build's parity check: half the engine's max_len up to this (a 1M-position engine is not
checked on a 512K-token eager prefill). 4096 tokens already give a V4-Flash CSA layer 1024 compressed entries,
twice its top-k, and an HCA layer 32."""


def parity_prompts(cfg: ModelConfig, max_len: int, n_new: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1234)
    lens = sorted({max(1, min(n, max_len - n_new)) for n in (min(max_len // 2, PARITY_PROMPT_CAP), 7, 1)},
                  reverse=True)
    return [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in lens]


def fp32_twin(model: ReferenceModel) -> ReferenceModel:
    """The same weights with float32 activations (bf16 parameters widened exactly): the arithmetic the bf16
    reference approximates."""
    from v4compile.model.checkpoint import model_from_state_dict

    sd = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in model.state_dict().items()}
    device = next(model.parameters()).device
    return model_from_state_dict(model.cfg, sd, dtype=torch.float32, device=device, quantized=model.quantized)


@torch.no_grad()
def fp32_logits(model: ReferenceModel, prompts: list[list[int]], max_len: int) -> Iterator[torch.Tensor]:
    """The float32 twin's prefill logits of each prompt (batch 1, fresh caches): what a precision floor is measured
    against. The twin lives while the iterator does."""
    twin = fp32_twin(model)
    for p in prompts:
        yield twin(torch.tensor([p]), 0, twin.new_cache(1, max_len))


@torch.no_grad()
def check_parity(model: ReferenceModel, engine: Engine, precision: str, n_new: int = 4) -> dict[str, Any]:
    """Engine vs eager on seeded prompts: prefill logits (calc_diff, max abs / rel error) and greedy tokens over
    n_new decode steps; raises ParityError beyond MODEL_LOGITS_CALC_DIFF. Returns the manifest summary. Also the
    engine against itself (slot_consistency, bound SLOT_CONSISTENCY): the middle prompt in slot 1 of a 2-slot
    session vs a 1-slot session, which no precision noise moves.

    bf16 / fp8: a model whose logits move more than the bound under bf16 rounding alone is judged against that
    precision floor instead: per prompt, the engine's distance to the float32 twin must stay within
    TOLERANCES["model_logits_floor_margin"] times the bf16 reference's own distance to it (never below the bound).
    `python -m v4compile.bench.precision_floor` prints the floor: seeded random tiny 2.3e-2 on its 128-token
    prompt (above the bound), the trained demo model 1.2e-3 at 4 224 tokens (the bound alone decides).

    Such a model's logits error compounds through its discrete choices (top-k picks, routing, FP8 activation
    codes), so two valid bf16 implementations can land several floors apart. When the floor rule fails too, the
    floor is above the bound and the engine has a trace program (`--trace`), each layer and the head are judged on
    their own: the reference layer on the engine's input streams vs the engine's layer, within
    TOLERANCES["model_hidden_local"] (what a wrong kernel cannot pass)."""
    from v4compile.validate import calc_diff, logits_within, nonfinite_mismatch

    cfg = model.cfg
    prompts = parity_prompts(cfg, engine.max_len, n_new)
    diffs, abs_err, rel_err, nonfinite, logits = [], 0.0, 0.0, 0, []
    for p in prompts:
        tok = torch.tensor([p])
        ref = model(tok, 0, model.new_cache(1, engine.max_len))
        got = engine.prefill(tok, 0, engine.new_session(1)).to(ref.device)
        diffs.append(calc_diff(got, ref))
        nonfinite += nonfinite_mismatch(got, ref)
        err = (got.double() - ref.double()).abs()
        abs_err = max(abs_err, float(err.max()))
        rel_err = max(rel_err, float((err / ref.double().abs().clamp_min(1e-6)).max()))
        logits.append((ref, got))
        del err
    batch = prompts[:engine.max_batch]
    want = [eager_generate(model, p, n_new) for p in batch]
    got_tokens = engine.generate(batch, n_new, stop_tokens=())
    agree = sum(a == b for w, g in zip(want, got_tokens) for a, b in zip(w, g))
    bound = MODEL_LOGITS_CALC_DIFF[precision]
    slot_diff = slot_consistency(engine, prompts[len(prompts) // 2], n_new)
    summary = {"prompts": [len(p) for p in prompts], "logits_calc_diff": max(diffs), "max_abs_err": abs_err,
               "max_rel_err": rel_err, "nonfinite_mismatch": nonfinite, "greedy_steps": n_new,
               "greedy_token_agreement": f"{agree}/{sum(len(w) for w in want)}", "tolerance": bound,
               "slot_consistency_calc_diff": slot_diff}
    within = max(diffs) < bound
    if not within and model.act_dtype != torch.float32 and nonfinite == 0:
        floors, to_fp32 = [], []
        for (ref, got), exact in zip(logits, fp32_logits(model, prompts, engine.max_len)):
            floors.append(calc_diff(ref, exact))
            to_fp32.append(calc_diff(got, exact))
        within = all(logits_within(d, precision, f, e) for d, f, e in zip(diffs, floors, to_fp32))
        summary.update(precision_floor=floors, engine_vs_fp32=to_fp32,
                       floor_margin=TOLERANCES["model_logits_floor_margin"][precision],
                       judged_by="precision floor" if within else "bound")
        if not within and max(floors) >= bound and "trace" in engine.manifest["entry_points"]:
            local, head = _local_errors(model, engine, prompts)
            limit = TOLERANCES["model_hidden_local"][precision]
            within = max(local.values()) < limit and head < limit
            summary.update(local_calc_diff={str(i): v for i, v in sorted(local.items())}, head_local_calc_diff=head,
                           local_tolerance=limit, judged_by="local per layer" if within else "bound")
    del logits
    if slot_diff is not None and slot_diff > SLOT_CONSISTENCY:
        raise ParityError(f"the engine disagrees with itself: a prompt prefilled and decoded in slot 1 of a 2-slot "
                          f"session gives logits calc_diff {slot_diff:.3e} from the same prompt in a 1-slot session "
                          f"(bound {SLOT_CONSISTENCY:.0e}): a cache write of a slot view is lost or misplaced (or, "
                          f"for a small value, the program is not deterministic)")
    summary["ok"] = bool(within and nonfinite == 0)
    if not summary["ok"]:
        floor = (f"; vs the float32 twin: engine {max(summary['engine_vs_fp32']):.3e}, bf16 reference "
                 f"{max(summary['precision_floor']):.3e} (margin {summary['floor_margin']}x)"
                 if "precision_floor" in summary else "")
        if "local_calc_diff" in summary:
            lim = summary["local_tolerance"]
            over = ", ".join(f"{i} {v:.3e}" for i, v in summary["local_calc_diff"].items() if v >= lim) or "none"
            floor += (f"; teacher-forced per layer (bound {lim:.0e}): layers over it {over}; head "
                      f"{summary['head_local_calc_diff']:.3e}")
        elif "precision_floor" in summary and max(summary["precision_floor"]) >= bound:
            floor += ("; this model's logits move more than the bound under bf16 rounding alone: build with --trace "
                      "to have each layer judged on its own inputs")
        raise ParityError(f"engine vs eager logits: calc_diff {max(diffs):.3e} (bound {bound:.0e}), "
                          f"max abs err {abs_err:.3e}, {nonfinite} inf/NaN mismatches{floor}")
    return summary


SLOT_CONSISTENCY = 1e-6
"""Bound of check_parity's slot rule: the same program at the same batch-1 shapes on the same tokens, so only a
lost or misplaced cache write of a slot view moves it (measured: CUDA-graph and uncaptured decode agree exactly)."""


@torch.no_grad()
def slot_consistency(engine: Engine, prompt: list[int], n_new: int) -> float | None:
    """calc_diff between a prompt prefilled and greedily decoded (n_new steps) in slot 1 of a 2-slot session and the
    same in a 1-slot session: the engine against itself, free of precision noise. What it guards: slot views reach
    the model at an offset (Session.rows), where a CUDA AOTInductor model clones a misaligned input and drops its
    writes (runtime/engine.py INPUT_ALIGN). None when the engine serves one sequence."""
    from v4compile.validate import calc_diff

    if engine.max_batch < 2:
        return None
    tok, alone, pair = torch.tensor([prompt]), engine.new_session(1), engine.new_session(2)
    a = [engine.prefill(tok, 0, alone)[0, -1]]
    b = [engine.prefill(tok, 0, pair, slots=[1])[0, -1]]
    for s in range(min(n_new, engine.max_len - len(prompt))):
        t, pos = torch.tensor([int(a[-1].argmax())]), torch.tensor([len(prompt) + s])
        a.append(engine.decode(t, pos, alone)[0, -1])
        b.append(engine.decode(t, pos, pair, slots=[1])[0, -1])
    return calc_diff(torch.stack(b).float().cpu(), torch.stack(a).float().cpu())


def _local_errors(model: ReferenceModel, engine: Engine, prompts: list[list[int]]) -> tuple[dict[int, float], float]:
    """Worst teacher-forced error per layer and of the head over the prompts (ReferenceModel.teacher_forced on the
    engine's trace program's streams; validate's hidden.local_calc_diff)."""
    from v4compile.validate import calc_diff

    local: dict[int, float] = {}
    head = 0.0
    for p in prompts:
        tok = torch.tensor([p])
        traced = engine.trace(tok)
        outs, logits = model.teacher_forced(tok, traced["hidden"])
        for i, out in outs.items():
            local[i] = max(local.get(i, 0.0), calc_diff(traced["hidden"][i].to(out.device), out))
        head = max(head, calc_diff(traced["logits"].to(logits.device), logits))
    return local, head

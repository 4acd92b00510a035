"""The `v4compile` command line (click). Errors are one line; `--debug` shows the traceback.

Exit codes (DESIGN.md section 4): 0 ok, 1 parity failure, 2 usage/config/input error, 3 unsupported op or target.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import click

from v4compile.errors import V4Error


class _Group(click.Group):
    """Turns V4Error into a one-line message and its exit code; everything else stays a traceback with --debug.
    Click's own usage errors (unknown option, bad int, missing argument) are one line too, exit 2."""

    def invoke(self, ctx: click.Context):  # noqa: D401 - click API
        try:
            return super().invoke(ctx)
        except V4Error as e:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as e:
            hint = f" (see: {e.ctx.command_path} --help)" if getattr(e, "ctx", None) is not None else ""
            click.echo(f"error: {e.format_message()}{hint}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="v4compile")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Compile DeepSeek-V4-class models into validated engines.

    Exit codes: 0 ok, 1 parity failure, 2 usage / config / input error, 3 unsupported op or target.

    \b
    Examples:
      v4compile inspect --preset flash
      v4compile build --preset tiny --target cpu --precision fp32 --trace -o tiny.engine
      v4compile validate tiny.engine --preset tiny
      v4compile run tiny.engine --prompt-ids 1,2,3 --max-new-tokens 8
      v4compile demo
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _load_config(preset: str | None, checkpoint: str | None):
    from v4compile.errors import ConfigError
    from v4compile.model.config import ModelConfig

    if (preset is None) == (checkpoint is None):
        raise ConfigError("give exactly one of --preset NAME or --checkpoint DIR")
    return ModelConfig.preset(preset) if preset else ModelConfig.from_pretrained(checkpoint)


@main.command()
@click.option("--preset", help="Model preset: tiny, tiny-128, bench, flash, pro.")
@click.option("--checkpoint", type=click.Path(), help="Checkpoint directory with config.json.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--graph", "show_graph", is_flag=True,
              help="Also capture the graph (meta device) and list it with op counts before/after the pipeline.")
@click.option("--after", "after", metavar="PASS", help="List the graph after this pass (implies --graph).")
@click.option("--entry", type=click.Choice(["prefill", "decode"]), default="prefill", show_default=True,
              help="Entry point to capture for --graph.")
@click.option("--all-nodes", is_flag=True, help="List every node, not only v4 ops (text output; JSON has all).")
@click.option("--verify", is_flag=True, help="Run the graph verifier after every pass.")
@click.option("--dump-after", metavar="PASS", help="Write the full graph after this pass to --dump-dir.")
@click.option("--dump-dir", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Directory for --dump-after (file <entry>.after_<PASS>.txt).")
def inspect(preset: str | None, checkpoint: str | None, as_json: bool, show_graph: bool, after: str | None,
            entry: str, all_nodes: bool, verify: bool, dump_after: str | None, dump_dir: str) -> None:
    """Summarise a model: layer map, parameter counts per component, KV bytes per token; with --graph or
    --after, the captured graph and its op counts before and after the pass pipeline.

    \b
    Examples:
      v4compile inspect --preset tiny
      v4compile inspect --preset flash --json
      v4compile inspect --preset tiny --graph
      v4compile inspect --preset bench --after fuse_csa_attention --entry decode
    """
    from v4compile.inspect_model import model_summary, print_summary

    cfg = _load_config(preset, checkpoint)
    summary = model_summary(cfg)
    report = None
    if show_graph or after or dump_after:
        from v4compile.graph.inspect import graph_report
        from v4compile.graph.passes import check_pass_name

        check_pass_name(after)
        check_pass_name(dump_after)
        click.echo(f"capturing the {entry} graph on the meta device and running the pass pipeline "
                   f"({cfg.n_layers} layers, about 1-2 s each)...", err=True)
        report = graph_report(cfg, entry, after, verify=verify, dump_after=dump_after, dump_dir=dump_dir)
        if report["dumped"]:
            click.echo(f"graph after {dump_after} written to {report['dumped']}", err=True)
    if as_json:
        if report is not None:
            summary["graph"] = report
        click.echo(json.dumps(summary, indent=2))
    else:
        print_summary(summary)
        if report is not None:
            from v4compile.graph.inspect import print_graph_report

            print_graph_report(report, v4_only=not all_nodes)


@main.command()
@click.option("--target", help="cpu, h100 or h200 (default: the machine present).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp8"]),
              help="Engine precision (default: bf16 on cpu, fp8 on a GPU).")
@click.option("--contexts", default="2048,8192", show_default=True,
              help="Retrieval context lengths in tokens, comma-separated.")
@click.option("--queries", default=2, show_default=True, type=int, help="Retrieval queries per context length.")
@click.option("--steps", default=4, show_default=True, type=int, help="Greedy steps of the parity check.")
@click.option("--rebuild", is_flag=True, help="Rebuild the cached demo engine.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def demo(target: str | None, precision: str | None, contexts: str, queries: int, steps: int, rebuild: bool,
         as_json: bool) -> None:
    """The embedded main job: build (or load the cached) engine of the shipped demo model for the device
    present, validate it against eager, answer long-context retrieval queries; exit 1 when parity or the
    engine's accuracy (within 1 point of eager) fails.

    \b
    Examples:
      v4compile demo
      v4compile demo --contexts 2048 --queries 4 --json
    """
    from v4compile.demo import run_demo
    from v4compile.errors import InputError

    try:
        ctx = tuple(int(c) for c in contexts.replace(" ", "").split(",") if c)
    except ValueError:
        raise InputError(f"--contexts {contexts!r}: expected comma-separated integers, e.g. 2048,8192") from None
    result = run_demo(target=target, precision=precision, contexts=ctx, n_queries=queries, steps=steps,
                      rebuild=rebuild, quiet=as_json)
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    if not result["ok"]:
        sys.exit(1)


@main.group()
def bench() -> None:
    """Benchmarks (not tests): ratios measured in one run, JSON written. Needs a CUDA GPU (`model` runs on the CPU too).

    \b
    Examples:
      v4compile bench kernels --list
      v4compile bench kernels attention indexer --json out.json
      v4compile bench moe --json moe.json
      v4compile bench model --preset bench --json model.json
    """


@bench.command("kernels", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_kernels(args: tuple[str, ...]) -> None:
    """Each Triton kernel at V4-Flash shapes vs eager / SDPA and the same-run floor (options: `bench kernels
    -- --help` lists the harness's own).

    \b
    Examples:
      v4compile bench kernels --list
      v4compile bench kernels attention indexer --json kernels.json
    """
    from v4compile.bench.kernels import main as kernels_main

    sys.exit(kernels_main(list(args)))


@bench.command("moe", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_moe(args: tuple[str, ...]) -> None:
    """FP8 MoE kernels at V4-Flash shapes vs torch._scaled_grouped_mm / _grouped_mm and the floor.

    \b
    Example:
      v4compile bench moe --json moe.json
    """
    from v4compile.bench.moe import main as moe_main

    sys.exit(moe_main(list(args)))


@bench.command("model", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_model(args: tuple[str, ...]) -> None:
    """Engine decode / prefill vs eager (bf16) and torch.compile, the decode floor, peak memory and KV bytes per
    token, in one run (options: `bench model -- --help`).

    \b
    Examples:
      v4compile bench model --preset bench --contexts 4096,131072,1048576 --batch 1,8,64 --json model.json
      v4compile bench model --preset bench --no-engine --json eager.json
    """
    from v4compile.bench.model import main as model_main

    sys.exit(model_main(list(args)))


@main.command("build")
@click.option("--preset", help="Model preset (seeded weights): tiny, tiny-128, bench, flash, pro.")
@click.option("--checkpoint", type=click.Path(), help="Official checkpoint directory (config.json + safetensors).")
@click.option("--target", default="cpu", show_default=True,
              help="Target: cpu, h100, h200, tensorrt (ONNX with plugin nodes; a .plan where TensorRT is installed).")
@click.option("--via", type=click.Choice(["onnx", "torch_tensorrt"]), default="onnx", show_default=True,
              help="tensorrt target only: through ONNX (+ TensorRT's parser) or through Torch-TensorRT.")
@click.option("--allow-lossy-repack", is_flag=True,
              help="fp8: accept an MXFP4 -> FP8 expert repack that loses precision (reported) instead of refusing.")
@click.option("--precision", type=click.Choice(["bf16", "fp8", "fp32"]), default="fp32", show_default=True)
@click.option("-o", "--out", "out", required=True, type=click.Path(), help="Engine directory to write.")
@click.option("--no-check", is_flag=True, help="Skip the build-time parity check against eager.")
@click.option("--max-batch", type=int, help="Largest batch the engine serves (default: config max_batch_size).")
@click.option("--max-len", type=int, help="Cache capacity in positions (default: config max_seq_len).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (only once the new engine is complete).")
@click.option("--trace", is_flag=True,
              help="Also compile the trace program (per-layer hidden states, indexer picks, expert ids) that "
                   "`validate` uses for per-layer metrics (one more compile).")
@click.option("--kv-layout", type=click.Choice(["production", "reference"]),
              help="Cache layout: production (FP8 e4m3 + bf16 RoPE + UE8M0 KV rows, packed FP4 indexer keys: "
                   "V4-SPEC 6.2) or reference (activation-dtype rows). Default: production for bf16 / fp8 on "
                   "cpu, h100 and h200; reference for fp32 and tensorrt.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest's summary as JSON.")
def build_cmd(preset: str | None, checkpoint: str | None, target: str, via: str, allow_lossy_repack: bool,
              precision: str, out: str, no_check: bool, max_batch: int | None, max_len: int | None, overwrite: bool,
              trace: bool, kv_layout: str | None, as_json: bool) -> None:
    """Compile a model into an engine directory (manifest.json + model.pt2), checked against eager.

    \b
    Examples:
      v4compile build --preset tiny --target cpu --precision fp32 -o tiny.engine
      v4compile build --preset tiny --target cpu --max-len 64 --trace -o tiny.engine --json
      v4compile build --checkpoint ./DeepSeek-V4-Flash --target h200 --precision fp8 -o flash.engine
      v4compile build --preset tiny --target tensorrt --max-len 64 -o tiny.trt   # ONNX half without TensorRT
      v4compile build --preset tiny --target cpu --precision bf16 --kv-layout reference -o tiny-bf16.engine
    """
    from v4compile.api import build
    from v4compile.errors import ConfigError, InputError

    if (preset is None) == (checkpoint is None):
        raise ConfigError("give exactly one of --preset NAME or --checkpoint DIR")
    if checkpoint is not None and not Path(checkpoint).is_dir():
        raise InputError(f"--checkpoint {checkpoint}: not a directory")
    if via != "onnx" and target != "tensorrt":
        raise InputError(f"--via {via} applies to --target tensorrt only")
    path = build(preset or checkpoint, target, precision, out, check=not no_check, max_batch=max_batch,
                 max_len=max_len, progress=not as_json, overwrite=overwrite, trace=trace,
                 allow_lossy_repack=allow_lossy_repack, via=via, kv_layout=kv_layout)
    manifest = json.loads((path / "manifest.json").read_text())
    layout = manifest["cache"].get("kv_layout", "reference")
    if as_json:
        click.echo(json.dumps({"engine": str(path), "target": manifest["target"], "precision": precision,
                               "kv_layout": layout, "entry_points": sorted(manifest["entry_points"]),
                               "parity": manifest["parity"], "stage_seconds": manifest["build"]["stage_seconds"]},
                              indent=2))
    else:
        click.echo(f"engine written to {path} (KV layout {layout}); parity: {manifest['parity']}")


def _token_ids(text: str) -> list[int]:
    from v4compile.errors import InputError

    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise InputError(f"--prompt-ids {text!r}: expected comma-separated integers, e.g. 1,2,3") from None
    if not ids:
        raise InputError("--prompt-ids is empty")
    return ids


@main.command("run")
@click.argument("engine", type=click.Path())
@click.option("--prompt-ids", required=True, help="Prompt token ids, comma-separated (e.g. 1,2,3).")
@click.option("--max-new-tokens", default=16, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--no-stop", is_flag=True, help="Do not stop at the end-of-sequence token.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def run_cmd(engine: str, prompt_ids: str, max_new_tokens: int, temperature: float, top_p: float, seed: int,
            no_stop: bool, as_json: bool) -> None:
    """Generate from an engine directory; prints the new token ids.

    \b
    Example:
      v4compile run tiny.engine --prompt-ids 1,2,3 --max-new-tokens 8 --json
    """
    from v4compile.runtime.engine import load_engine

    ids = _token_ids(prompt_ids)
    eng = load_engine(engine)
    out = eng.generate([ids], max_new_tokens, temperature=temperature, top_p=top_p,
                       stop_tokens=() if no_stop else None, seed=seed)[0]
    if as_json:
        click.echo(json.dumps({"prompt_ids": ids, "new_token_ids": out, "target": eng.manifest["target"]}))
    else:
        click.echo(",".join(str(t) for t in out))


def read_prompts_file(path: str) -> list[list[int]]:
    """A JSON list of token-id lists, or one comma-separated list per line ('#' lines and blanks skipped)."""
    from v4compile.errors import InputError

    p = Path(path)
    if not p.is_file():
        raise InputError(f"--prompts {path}: no such file")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--prompts {path}: cannot read it ({type(e).__name__})") from None
    if text.lstrip().startswith("["):
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"--prompts {path}: invalid JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(prompts, list) or not all(isinstance(q, list) and all(type(t) is int for t in q)
                                                    for q in prompts):
            raise InputError(f"--prompts {path}: expected a JSON list of lists of integer token ids")
    else:
        prompts = []
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                prompts.append([int(t) for t in line.replace(" ", "").split(",") if t != ""])
            except ValueError:
                raise InputError(f"--prompts {path} line {n}: expected comma-separated integers, got "
                                 f"{line[:40]!r}") from None
    if not prompts or not all(prompts):
        raise InputError(f"--prompts {path}: no prompts, or an empty one")
    return prompts


@main.command("validate")
@click.argument("engine", type=click.Path())
@click.option("--checkpoint", type=click.Path(), help="Reference checkpoint directory (official format).")
@click.option("--preset", help="Reference preset (seeded weights): tiny, tiny-128, bench, flash, pro.")
@click.option("--prompts", "prompts_file", type=click.Path(), metavar="FILE",
              help="Prompts: a JSON list of token-id lists ([[0, 17, 42], [5, 6]]) or one comma-separated list "
                   "per line ('#' comments). Default: seeded prompts of several lengths.")
@click.option("--steps", default=8, show_default=True, type=int, help="Greedy decode steps per prompt (>= 1).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp8"]),
              help="Tolerance-table column (default: the engine's build precision).")
@click.option("--json", "as_json", is_flag=True, help="Print the ParityReport as JSON (stdout).")
@click.option("--plot", type=click.Path(dir_okay=False), metavar="PNG",
              help="Write a PNG of per-layer error (needs matplotlib and an engine built with --trace).")
def validate_cmd(engine: str, checkpoint: str | None, preset: str | None, prompts_file: str | None, steps: int,
                 precision: str | None, as_json: bool, plot: str | None) -> None:
    """Check an engine against the eager reference: logits (calc_diff, max abs / rel error, KL, top-1), greedy
    tokens over --steps decode steps, and per layer (engines built with --trace) hidden-state error, indexer
    top-k overlap and expert agreement; bounds from the tolerance table. Exit 1 when a bound is missed (the
    message names metric and layer), 0 when every metric is within bounds.

    The reference is --checkpoint DIR or --preset NAME; without either, the source the engine records.

    \b
    Examples:
      v4compile validate tiny.engine --preset tiny
      v4compile validate flash.engine --checkpoint ./DeepSeek-V4-Flash --steps 32 --json > parity.json
      v4compile validate tiny.engine --prompts prompts.txt --plot layers.png
    """
    from v4compile.errors import ConfigError, InputError, ParityError

    if preset is not None and checkpoint is not None:
        raise ConfigError("give at most one of --preset NAME or --checkpoint DIR")
    if checkpoint is not None and not Path(checkpoint).is_dir():
        raise InputError(f"--checkpoint {checkpoint}: not a directory")
    if steps < 1:
        raise InputError(f"--steps {steps}: expected >= 1")
    prompts = read_prompts_file(prompts_file) if prompts_file else None
    if preset is not None:
        from v4compile.model.config import ModelConfig

        ModelConfig.preset(preset)  # unknown names fail before the engine loads
    from v4compile.runtime.engine import load_engine

    eng = load_engine(engine)
    if plot is not None:
        if "trace" not in eng.manifest["entry_points"]:
            raise InputError(f"--plot needs per-layer data: engine {engine} has no trace program (build with --trace)")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise InputError("--plot needs matplotlib: pip install 'v4compile[plot]'") from None
    from v4compile.validate import validate

    report = validate(eng, checkpoint or preset, prompts, steps=steps, precision=precision, progress=not as_json)
    if as_json:
        click.echo(report.to_json())
    else:
        from rich.console import Console

        Console().print(report.table())
    if plot is not None:
        report.plot(plot)
        click.echo(f"per-layer plot written to {plot}", err=True)
    if not report.ok:
        raise ParityError(report.summary())
    if not as_json:
        click.echo("parity ok: every metric within its bound")


def _add_train_demo() -> None:
    from v4compile.demo_model.cli import train_demo

    main.add_command(train_demo)


_add_train_demo()


if __name__ == "__main__":  # pragma: no cover
    main()

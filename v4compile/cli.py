"""The `v4compile` command line (click). Errors are one line; `--debug` shows the traceback.

Exit codes (DESIGN.md section 4): 0 ok, 1 parity failure, 2 usage/config/input error, 3 unsupported op or target.
"""

from __future__ import annotations

import json
import sys
import traceback

import click

from v4compile.errors import V4Error


class _Group(click.Group):
    """Turns V4Error into a one-line message and its exit code; everything else stays a traceback with --debug."""

    def invoke(self, ctx: click.Context):  # noqa: D401 - click API
        try:
            return super().invoke(ctx)
        except V4Error as e:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="v4compile")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Compile DeepSeek-V4-class models into validated engines.

    \b
    Examples:
      v4compile inspect --preset flash
      v4compile inspect --checkpoint ./DeepSeek-V4-Flash --json
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
@click.option("--preset", default="tiny", show_default=True, help="Model preset to run.")
@click.option("--prompt-len", default=48, show_default=True, help="Prompt length in tokens.")
@click.option("--new-tokens", default=24, show_default=True, help="Tokens to generate greedily.")
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def demo(preset: str, prompt_len: int, new_tokens: int, seed: int, as_json: bool) -> None:
    """Run the embedded model end to end: prefill, greedy decode, and a decode-vs-prefill check.

    \b
    Example:
      v4compile demo
    """
    from v4compile.demo import run_demo

    result = run_demo(preset=preset, prompt_len=prompt_len, new_tokens=new_tokens, seed=seed, quiet=as_json)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    if not result["ok"]:
        sys.exit(1)


@main.group()
def bench() -> None:
    """Benchmarks (not tests): ratios measured in one run, JSON written. Needs a CUDA GPU.

    \b
    Examples:
      v4compile bench kernels --list
      v4compile bench kernels attention indexer --json out.json
      v4compile bench moe --json moe.json
    """


@bench.command("kernels", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_kernels(args: tuple[str, ...]) -> None:
    """Each Triton kernel at V4-Flash shapes vs eager / SDPA and the same-run floor (see --help of the harness)."""
    from v4compile.bench.kernels import main as kernels_main

    sys.exit(kernels_main(list(args)))


@bench.command("moe", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_moe(args: tuple[str, ...]) -> None:
    """FP8 MoE kernels at V4-Flash shapes vs torch._scaled_grouped_mm / _grouped_mm and the floor."""
    from v4compile.bench.moe import main as moe_main

    sys.exit(moe_main(list(args)))


if __name__ == "__main__":  # pragma: no cover
    main()


@main.command("build")
@click.option("--preset", help="Model preset (seeded weights): tiny, tiny-128, bench, flash, pro.")
@click.option("--checkpoint", type=click.Path(), help="Official checkpoint directory (config.json + safetensors).")
@click.option("--target", default="cpu", show_default=True, help="Target: cpu, h100, h200.")
@click.option("--precision", type=click.Choice(["bf16", "fp8", "fp32"]), default="fp32", show_default=True)
@click.option("-o", "--out", "out", required=True, type=click.Path(), help="Engine directory to write.")
@click.option("--no-check", is_flag=True, help="Skip the build-time parity check against eager.")
@click.option("--max-batch", type=int, help="Largest batch the engine serves (default: config max_batch_size).")
@click.option("--max-len", type=int, help="Cache capacity in positions (default: config max_seq_len).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (only once the new engine is complete).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest's summary as JSON.")
def build_cmd(preset: str | None, checkpoint: str | None, target: str, precision: str, out: str, no_check: bool,
              max_batch: int | None, max_len: int | None, overwrite: bool, as_json: bool) -> None:
    """Compile a model into an engine directory (manifest.json + model.pt2), checked against eager.

    \b
    Examples:
      v4compile build --preset tiny --target cpu --precision fp32 -o tiny.engine
      v4compile build --checkpoint ./DeepSeek-V4-Flash --target h200 --precision fp8 -o flash.engine
    """
    from v4compile.api import build
    from v4compile.errors import ConfigError

    if (preset is None) == (checkpoint is None):
        raise ConfigError("give exactly one of --preset NAME or --checkpoint DIR")
    path = build(preset or checkpoint, target, precision, out, check=not no_check, max_batch=max_batch,
                 max_len=max_len, progress=not as_json, overwrite=overwrite)
    manifest = json.loads((path / "manifest.json").read_text())
    if as_json:
        click.echo(json.dumps({"engine": str(path), "target": manifest["target"], "precision": precision,
                               "parity": manifest["parity"]}, indent=2))
    else:
        click.echo(f"engine written to {path}; parity: {manifest['parity']}")


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

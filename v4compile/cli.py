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
def inspect(preset: str | None, checkpoint: str | None, as_json: bool) -> None:
    """Summarise a model: layer map, parameter counts per component, KV bytes per token.

    \b
    Examples:
      v4compile inspect --preset tiny
      v4compile inspect --preset flash --json
    """
    from v4compile.inspect_model import model_summary, print_summary

    cfg = _load_config(preset, checkpoint)
    summary = model_summary(cfg)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        print_summary(summary)


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


if __name__ == "__main__":  # pragma: no cover
    main()

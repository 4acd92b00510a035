"""`v4compile train-demo`: the click front of `python -m v4compile.demo_model.train` (same options)."""

from __future__ import annotations

import click


@click.command("train-demo", context_settings=dict(ignore_unknown_options=True, help_option_names=[]))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def train_demo(args: tuple[str, ...]) -> None:
    """Train the retrieval demo model (Muon, CSA indexer aux loss) and write official checkpoints.

    Example: v4compile train-demo --out runs/demo --time-budget 215   (one H200: ~4 minutes).
    --help lists every option.
    """
    from v4compile.demo_model import train  # torch and the model load only when the command runs

    raise SystemExit(train.main(list(args)))

"""Graph passes; PIPELINE is the ordered list (STYLE.md item 1).

Each pass is `pass(g: Captured, cfg: ModelConfig) -> Captured`, rewriting `g.program`'s graph in place and
keeping numerics exact (fused ops compose the primitive ops' reference bodies). Passes that change numerics on
purpose (quantisation) live in v4compile.quant and say so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from v4compile.errors import InputError
from v4compile.graph.capture import Captured
from v4compile.graph.passes.fuse_csa_attention import fuse_csa_attention
from v4compile.graph.passes.fuse_hca_attention import fuse_hca_attention
from v4compile.graph.passes.fuse_mhc import fuse_mhc
from v4compile.graph.passes.fuse_norm_into_linear_quant import fuse_norm_into_linear_quant
from v4compile.graph.passes.remove_dead_code import remove_dead_code
from v4compile.model.config import ModelConfig

log = logging.getLogger(__name__)

Pass = Callable[[Captured, ModelConfig], Captured]

PIPELINE: list[Pass] = [
    fuse_mhc,  # hc_mix -> sinkhorn -> hc_collapse == hc_pre
    fuse_csa_attention,  # compressors + indexer + top-k + window attention + ring write == csa_attention
    fuse_hca_attention,  # compressor + attention over complete blocks + ring write == hca_attention
    fuse_norm_into_linear_quant,  # rms_norm feeding only FP8 linears == rms_norm_fp8_linear
    remove_dead_code,  # index math, casts and views the fusions left unused
]

PASS_NAMES = [p.__name__ for p in PIPELINE]


def check_pass_name(name: str | None) -> None:
    if name is not None and name not in PASS_NAMES:
        raise InputError(f"unknown pass {name!r}; the pipeline is {', '.join(PASS_NAMES)}")


def run_pipeline(g: Captured, *, verify: bool = False, stop_after: str | None = None,
                 dump_after: str | None = None, dump_dir: str | Path | None = None,
                 on_pass: Callable[[str, Captured], None] | None = None) -> Captured:
    """Run PIPELINE on `g` in order (in place). verify: run graph/spec.py's verifier after every pass;
    stop_after: the last pass to run; dump_after: write that pass's graph (text) to dump_dir or log it;
    on_pass(name, g) is called after each pass (tests use it for numeric checks)."""
    from v4compile.graph.spec import verify_graph

    check_pass_name(stop_after)
    check_pass_name(dump_after)
    if verify:
        verify_graph(g, after=None)
    for p in PIPELINE:
        name = p.__name__
        g = p(g, g.cfg)
        if verify:
            verify_graph(g, after=name)
        if name == dump_after:
            _dump(g, name, dump_dir)
        if on_pass is not None:
            on_pass(name, g)
        if name == stop_after:
            break
    return g


def dump_path(g: Captured, name: str, dump_dir: str | Path) -> Path:
    """Where run_pipeline(dump_after=name, dump_dir=...) writes the graph text."""
    return Path(dump_dir) / f"{g.entry}.after_{name}.txt"


def _dump(g: Captured, name: str, dump_dir: str | Path | None) -> None:
    text = g.graph_module.print_readable(print_output=False)
    if dump_dir is None:
        log.info("graph after %s:\n%s", name, text)
        return
    path = dump_path(g, name, dump_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    log.info("graph after %s written to %s", name, path)

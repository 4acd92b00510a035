"""Graph passes; PIPELINE is the ordered list (STYLE.md item 1).

Each pass is `pass(g: Captured, cfg: ModelConfig) -> Captured`, rewriting `g.program`'s graph in place and
keeping numerics exact (fused ops compose the primitive ops' reference bodies). Passes that change numerics on
purpose (quantisation) live in v4compile.quant and say so; they run after PIPELINE for the precisions that need
them (PRECISION_PASSES; `pipeline_for(precision)` is the full list for a build).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from v4compile.errors import InputError
from v4compile.graph.capture import Captured
from v4compile.graph.passes.fuse_csa_attention import fuse_csa_attention
from v4compile.graph.passes.fuse_hca_attention import fuse_hca_attention
from v4compile.graph.passes.fuse_mhc import fuse_mhc
from v4compile.graph.passes.fuse_norm_into_linear_quant import fuse_norm_into_linear_quant
from v4compile.graph.passes.remove_dead_code import remove_dead_code
from v4compile.model.config import ModelConfig
from v4compile.quant.passes import quantize_moe_experts

log = logging.getLogger(__name__)

Pass = Callable[[Captured, ModelConfig], Captured]

PIPELINE: list[Pass] = [
    fuse_mhc,  # hc_mix -> sinkhorn -> hc_collapse == hc_pre
    fuse_csa_attention,  # compressors + indexer + top-k + window attention + ring write == csa_attention
    fuse_hca_attention,  # compressor + attention over complete blocks + ring write == hca_attention
    fuse_norm_into_linear_quant,  # rms_norm feeding only FP8 linears == rms_norm_fp8_linear
    remove_dead_code,  # index math, casts and views the fusions left unused
]

PRECISION_PASSES: dict[str, list[Pass]] = {
    "fp32": [],
    "bf16": [],
    "fp8": [quantize_moe_experts],  # routed experts (MXFP4 / BF16) -> e4m3 + block scales, exact repack verified
}

PASS_NAMES = [p.__name__ for p in PIPELINE]
PASS_ORDER = PASS_NAMES + [p.__name__ for p in PRECISION_PASSES["fp8"]]
"""Every pass in the order any pipeline runs it (each precision's pipeline is a prefix-ordered subset)."""


def pipeline_for(precision: str) -> list[Pass]:
    """The passes a build at `precision` runs: PIPELINE, then that precision's quantisation passes."""
    if precision not in PRECISION_PASSES:
        raise InputError(f"precision {precision!r}; expected one of {', '.join(PRECISION_PASSES)}")
    return [*PIPELINE, *PRECISION_PASSES[precision]]


def check_pass_name(name: str | None, precision: str = "fp32") -> None:
    names = [p.__name__ for p in pipeline_for(precision)]
    if name is not None and name not in names:
        raise InputError(f"unknown pass {name!r}; the {precision} pipeline is {', '.join(names)}")


def run_pipeline(g: Captured, *, precision: str = "fp32", pass_options: dict[str, dict[str, Any]] | None = None,
                 verify: bool = False, stop_after: str | None = None,
                 dump_after: str | None = None, dump_dir: str | Path | None = None,
                 on_pass: Callable[[str, Captured], None] | None = None) -> Captured:
    """Run pipeline_for(precision) on `g` in order (in place). pass_options: keyword arguments per pass name
    (e.g. {"quantize_moe_experts": {"allow_lossy": True}}; options of a pass this precision does not run are
    ignored); verify: run graph/spec.py's verifier after every pass; stop_after: the last pass to run;
    dump_after: write that pass's graph (text) to dump_dir or log it; on_pass(name, g) is called after each
    pass (tests use it for numeric checks)."""
    from v4compile.graph.spec import verify_graph

    check_pass_name(stop_after, precision)
    check_pass_name(dump_after, precision)
    options = pass_options or {}
    unknown = sorted(set(options) - set(PASS_ORDER))
    if unknown:
        raise InputError(f"pass_options for unknown passes {unknown}; the passes are {', '.join(PASS_ORDER)}")
    if verify:
        verify_graph(g, after=None)
    for p in pipeline_for(precision):
        name = p.__name__
        g = p(g, g.cfg, **options.get(name, {}))
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

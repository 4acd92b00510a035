"""`v4compile inspect --graph`: a listing of the captured graph (op, inputs, shapes, dtypes) and op counts
before / after the pass pipeline.

The capture runs on the meta device (no weights are materialised), so every preset works; it costs about
one second per layer on the CI machine.
"""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import fx

from v4compile.graph.capture import capture
from v4compile.graph.passes import check_pass_name, dump_path, run_pipeline
from v4compile.graph.passes._common import op_counts, op_name
from v4compile.model.config import ModelConfig
from v4compile.model.reference import ReferenceModel

_HIDDEN = ("aten._assert_tensor_metadata",)  # export's cast checks: noise in a listing


def _fmt_val(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        dims = ", ".join(str(d) for d in v.shape)
        return f"{str(v.dtype).removeprefix('torch.')}[{dims}]"
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(_fmt_val(x) for x in v) + ")"
    return "" if v is None else str(v)


def _fmt_arg(a: Any) -> str:
    if isinstance(a, fx.Node):
        return a.name
    if isinstance(a, (tuple, list)):
        return "[" + ", ".join(_fmt_arg(x) for x in a) + "]"
    return repr(a)


def graph_listing(gm: fx.GraphModule, v4_only: bool = False) -> list[dict[str, Any]]:
    """One entry per call_function node: name, op, inputs, output dtype/shape (as text)."""
    rows = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target is operator.getitem:
            continue
        op = op_name(n.target)
        if op in _HIDDEN or (v4_only and not op.startswith("v4.")):
            continue
        rows.append({"name": n.name, "op": op, "inputs": [_fmt_arg(a) for a in n.args],
                     "output": _fmt_val(n.meta.get("val"))})
    return rows


def graph_report(cfg: ModelConfig, entry: str = "prefill", after: str | None = None, *, verify: bool = False,
                 dump_after: str | None = None, dump_dir: str | Path = ".",
                 max_len: int | None = None) -> dict[str, Any]:
    """Capture `entry` on meta, run the pipeline; listing after pass `after` (default: the whole pipeline).
    dump_after: also write that pass's full graph text into dump_dir (report['dumped'] says where)."""
    check_pass_name(after)
    check_pass_name(dump_after)
    max_len = max_len or min(cfg.max_seq_len, 4096)
    g = capture(ReferenceModel(cfg, device="meta"), entry, max_len=max_len)
    before = op_counts(g.graph_module)
    listing: list[dict[str, Any]] = []

    def snapshot(name: str, g) -> None:
        if name == after:
            listing.extend(graph_listing(g.graph_module))

    g = run_pipeline(g, verify=verify, dump_after=dump_after, dump_dir=dump_dir, on_pass=snapshot)
    final = op_counts(g.graph_module)
    if after is None:
        listing = graph_listing(g.graph_module)
    ops = sorted(set(before) | set(final), key=lambda o: (not o.startswith("v4."), o))
    return {
        "entry": entry, "max_len": max_len, "after": after or "pipeline",
        "counts": {op: {"before": before.get(op, 0), "after": final.get(op, 0)} for op in ops},
        "nodes": {"before": sum(before.values()), "after": sum(final.values())},
        "listing": listing,
        "dumped": str(dump_path(g, dump_after, dump_dir)) if dump_after else None,
    }


def print_graph_report(report: dict[str, Any], console: Console | None = None, v4_only: bool = True) -> None:
    console = console or Console()
    t = Table(title=f"{report['entry']} graph: op counts before / after the pipeline")
    t.add_column("op")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    for op, c in report["counts"].items():
        if op.startswith("v4.") or c["before"] != c["after"]:
            t.add_row(op, str(c["before"]), str(c["after"]))
    t.add_row("all nodes", str(report["nodes"]["before"]), str(report["nodes"]["after"]), style="bold")
    console.print(t)
    rows = [r for r in report["listing"] if r["op"].startswith("v4.")] if v4_only else report["listing"]
    what = "v4 nodes" if v4_only else "nodes"
    console.print(f"{report['entry']} graph after {report['after']}: {len(rows)} {what}")
    for r in rows:
        console.print(f"  {r['name']} = {r['op']}({', '.join(r['inputs'])}) -> {r['output']}", markup=False,
                      soft_wrap=True)

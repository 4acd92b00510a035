"""Model-level parity metrics and the ParityReport (DESIGN.md section 8); `validate` (v4compile/parity_run.py)
fills one. Public home: `v4compile.validate` (re-exports validate / ParityReport / Metric).

Every metric is compared to a bound of the ONE tolerance table (v4compile.validate.TOLERANCES) keyed by
precision; a metric without a bound is reported, never failed. Legend: N positions, V vocab, k picks.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from v4compile.errors import InputError
from v4compile.validate import MODEL_MINIMA, TOLERANCES

TOP_K_RULE = 5
"""Greedy divergence is forgiven when each side's token sits in the other side's top-5 (DESIGN.md section 8)."""


# ---------------------------------------------------------------------------------------------- metrics


def kl_per_position(ref: Tensor, eng: Tensor) -> Tensor:
    """KL(softmax(ref) || softmax(eng)) in float64 for each position: logits [..., V] -> [N]."""
    lp = torch.log_softmax(ref.detach().double().reshape(-1, ref.shape[-1]), -1)
    lq = torch.log_softmax(eng.detach().double().reshape(-1, eng.shape[-1]), -1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0)  # tiny negative values are rounding


def top1_agreement(ref: Tensor, eng: Tensor) -> tuple[int, int]:
    """(positions whose argmax agrees, positions) for logits [..., V]."""
    a, b = ref.reshape(-1, ref.shape[-1]).argmax(-1), eng.reshape(-1, eng.shape[-1]).argmax(-1)
    return int((a == b).sum()), int(a.numel())


def in_top_k(logits: Tensor, token: int, k: int = TOP_K_RULE) -> bool:
    """Whether `token` is among the k largest of logits [V] (ties at the k-th value count as in)."""
    kth = torch.topk(logits.double(), min(k, logits.numel())).values[-1]
    return bool(logits.double()[token] >= kth)


def set_overlap(a: Tensor, b: Tensor) -> Tensor:
    """Per-row overlap |A & B| / max(|A|, |B|) of index sets [..., k] (-1 = no pick) -> float64 [N]; NaN where
    both rows are empty (nothing to compare), 0 where only one is."""
    a2, b2 = a.reshape(-1, a.shape[-1]).long(), b.reshape(-1, b.shape[-1]).long()
    if a2.shape != b2.shape:
        raise ValueError(f"set_overlap: shapes {list(a.shape)} and {list(b.shape)} differ")
    va, vb = a2 >= 0, b2 >= 0
    hit = ((a2.unsqueeze(-1) == b2.unsqueeze(-2)) & va.unsqueeze(-1) & vb.unsqueeze(-2)).any(-1).sum(-1)
    size = torch.maximum(va.sum(-1), vb.sum(-1)).double()
    return torch.where(size > 0, hit.double() / size.clamp_min(1), torch.full_like(size, math.nan))


# ---------------------------------------------------------------------------------------------- report


@dataclass
class Metric:
    """One measured value against its bound; `layer` None for whole-model metrics."""

    name: str
    value: float
    layer: int | None = None
    table_key: str | None = None  # TOLERANCES key of the bound; None: reported only
    bound: float | None = None
    minimum: bool = False  # the bound is a lower bound (agreement shares)
    waived: bool = False  # reported against its bound but not gated (validate's noisy-model rule)

    @property
    def gates(self) -> bool:
        """Whether the metric can fail the report."""
        return self.bound is not None and not self.waived

    @property
    def ok(self) -> bool:
        if self.bound is None:
            return True
        if math.isnan(self.value):
            return False
        return self.value >= self.bound if self.minimum else self.value <= self.bound

    def describe(self) -> str:
        where = "model" if self.layer is None else f"layer {self.layer}"
        rel = ">=" if self.minimum else "<="
        bound = "" if self.bound is None else f" (bound {rel} {self.bound:.3g}, {self.table_key}" \
            f"{', waived' if self.waived else ''})"
        return f"{self.name} {where}: {_fmt(self.value)}{bound}"


def _fmt(v: float) -> str:
    if isinstance(v, float) and not math.isnan(v) and v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4):
        return f"{v:.3e}"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def bounded(name: str, value: float, key: str | None, precision: str, layer: int | None = None) -> Metric:
    """A Metric whose bound is TOLERANCES[key][precision] (key None: no bound)."""
    if key is None or TOLERANCES[key][precision] is None:  # no bound, or reported-only at this precision
        return Metric(name, float(value), layer)
    return Metric(name, float(value), layer, key, TOLERANCES[key][precision], key in MODEL_MINIMA)


@dataclass
class ParityReport:
    """Engine vs eager reference: metrics with bounds, per-layer detail, greedy runs (see `validate`)."""

    engine: str
    reference: str
    precision: str
    prompts: list[int]  # prompt lengths
    steps: int
    metrics: list[Metric] = field(default_factory=list)
    per_layer: dict[int, dict[str, Any]] = field(default_factory=dict)  # layer -> {"kind", metric: value}
    greedy: list[dict[str, Any]] = field(default_factory=list)  # one entry per prompt
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(m.ok for m in self.metrics if m.gates)

    @property
    def failures(self) -> list[str]:
        """One line per gated metric outside its bound, naming metric, layer, value and bound."""
        return [m.describe() for m in self.metrics if m.gates and not m.ok]

    def summary(self) -> str:
        """One line for a failed check: the earliest failing layer first (where the mismatch starts), then the
        whole-model failures, up to three named."""
        bad = [m for m in self.metrics if m.gates and not m.ok]
        if not bad:
            return "every metric within its bound"
        first = sorted((m for m in bad if m.layer is not None), key=lambda m: m.layer)[:1]
        named = first + [m for m in bad if m.layer is None][:3 - len(first)]
        more = f" (+{len(bad) - len(named)} more)" if len(bad) > len(named) else ""
        return f"{len(bad)} metric(s) outside their bounds: {'; '.join(m.describe() for m in named)}{more}"

    def metric(self, name: str, layer: int | None = None) -> Metric:
        for m in self.metrics:
            if m.name == name and m.layer == layer:
                return m
        raise KeyError(f"no metric {name!r} for layer {layer}")

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "engine": self.engine, "reference": self.reference, "precision": self.precision,
                "prompts": self.prompts, "steps": self.steps, "failures": self.failures,
                "metrics": [{**asdict(m), "ok": m.ok} for m in self.metrics],
                "per_layer": [{"layer": i, **d} for i, d in sorted(self.per_layer.items())],
                "greedy": self.greedy, "notes": self.notes}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(_finite(self.to_dict()), indent=indent)

    def table(self):
        """A rich Table: one row per metric (model-level first, then by layer) with bound and status."""
        from rich.table import Table

        t = Table(title=f"parity: {self.engine} vs {self.reference} ({self.precision}, prompts {self.prompts}, "
                        f"{self.steps} greedy steps)", caption="\n".join(self.notes) or None)
        for col, just in (("metric", "left"), ("layer", "right"), ("value", "right"), ("bound", "right"),
                          ("", "left")):
            t.add_column(col, justify=just)
        for m in sorted(self.metrics, key=lambda m: (m.layer is not None, m.layer or 0)):
            bound = "-" if m.bound is None else f"{'>=' if m.minimum else '<='} {m.bound:.3g}"
            status = "" if m.bound is None else ("[green]ok[/green]" if m.ok else
                                                 "[yellow]over (waived)[/yellow]" if m.waived else "[red]FAIL[/red]")
            layer = "" if m.layer is None else f"{m.layer} {self.per_layer.get(m.layer, {}).get('kind', '')}"
            t.add_row(m.name, layer, _fmt(m.value), bound, status)
        return t

    def plot(self, path: str | Path) -> Path:
        """PNG of per-layer error (hidden-state calc_diff, max rel err, local calc_diff; indexer / expert agreement)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise InputError("plotting needs matplotlib: pip install 'v4compile[plot]'") from None
        if not self.per_layer:
            raise InputError("no per-layer data to plot: the engine has no trace program (build with --trace)")
        layers = sorted(self.per_layer)
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
        for key, label in (("hidden_calc_diff", "hidden calc_diff"), ("hidden_max_rel_err", "hidden max rel err"),
                           ("hidden_local_calc_diff", "local calc_diff (teacher-forced)")):
            pts = [(i, self.per_layer[i][key]) for i in layers if key in self.per_layer[i]]
            ax1.plot([p[0] for p in pts], [max(p[1], 1e-18) for p in pts], marker="o", label=label)
        ax1.axhline(TOLERANCES["model_hidden"][self.precision], color="red", ls="--", label="calc_diff bound")
        ax1.set_yscale("log")
        ax1.set_xlabel("layer")
        ax1.set_title("hidden-state error per layer")
        ax1.legend(fontsize=8)
        for key, label, mark in (("indexer_overlap", "indexer top-k overlap (CSA)", "o"),
                                 ("expert_agreement", "expert agreement", "x")):
            pts = [(i, self.per_layer[i][key]) for i in layers if key in self.per_layer[i]]
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker=mark, ms=9, ls="", label=label)
        for ax in (ax1, ax2):
            ax.set_xticks(layers)
        ax2.set_ylim(-0.05, 1.05)
        ax2.set_xlabel("layer")
        ax2.set_title("discrete choices: agreement per layer")
        ax2.legend(fontsize=8)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def _finite(obj: Any) -> Any:
    """JSON has no NaN / inf: write them as strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj

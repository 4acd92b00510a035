"""`bench model` output: the rich tables (decode, prefill, KV bytes; skipped / failed entries with their reasons)
and the optional latency-vs-context plot (matplotlib, imported only here: the `plot` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

GB = 1e9


def _cell(r: dict[str, Any], key: str, fmt: str) -> str:
    if r["status"] == "ok":
        return format(r[key], fmt)
    return r["status"]


def _ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


def _peak(*rs: dict[str, Any]) -> str:
    peaks = [r["peak_allocated_bytes"] for r in rs if r.get("status") == "ok" and "peak_allocated_bytes" in r]
    return f"{max(peaks) / GB:.1f}" if peaks else ""


def _notes(payload: dict[str, Any]) -> list[str]:
    """'engine decode b64 ctx1048576: skipped (batch 64 > engine max_batch 4)' for every entry not measured."""
    out = []
    for d in payload["decode"]:
        for impl in ("engine", "eager", "compile"):
            r = d[impl]
            if r["status"] != "ok":
                out.append(f"{impl} decode b{d['batch']} ctx{d['context']}: {r['status']} "
                           f"({r.get('reason') or r.get('error')})")
    for p in payload["prefill"]:
        for impl in ("engine", "eager"):
            r = p[impl]
            if r["status"] != "ok":
                out.append(f"{impl} prefill {p['tokens']}: {r['status']} ({r.get('reason') or r.get('error')})")
    return out


def print_report(payload: dict[str, Any]) -> None:
    """Decode, prefill and KV tables, then the reasons of what was not measured, then the command."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=170)
    ceil = payload["ceilings"]
    t = Table(title=f"decode step ({payload['device']}, copy {ceil['copy_gbps']:.0f} GB/s; eager bf16; "
                    f"median of {payload['plan']['steps']} steps)")
    for h in ("batch", "context", "engine us", "engine tok/s", "eager us", "compile us", "compile s", "floor us",
              "engine/floor", "eager/engine", "compile/engine", "peak GB", "engine mode"):
        t.add_column(h, justify="right")
    for d in payload["decode"]:
        e, x, c = d["engine"], d["eager"], d["compile"]
        t.add_row(str(d["batch"]), str(d["context"]), _cell(e, "step_us", ".1f"), _cell(e, "tokens_per_s", ".1f"),
                  _cell(x, "step_us", ".1f"), _cell(c, "step_us", ".1f"), _cell(c, "compile_s", ".1f"),
                  f"{d['floor']['us']:.1f}", _ratio(e.get("x_floor")), _ratio(d.get("eager_over_engine")),
                  _ratio(d.get("compile_over_engine")), _peak(e, x, c), e.get("decode_mode", ""))
    p = Table(title="prefill (one sequence)")
    for h in ("tokens", "engine s", "engine tok/s", "eager s", "eager tok/s", "peak GB"):
        p.add_column(h, justify="right")
    for r in payload["prefill"]:
        e, x = r["engine"], r["eager"]
        p.add_row(str(r["tokens"]), _cell(e, "seconds", ".3f"), _cell(e, "tokens_per_s", ".0f"),
                  _cell(x, "seconds", ".3f"), _cell(x, "tokens_per_s", ".0f"), _peak(e, x))
    kv = payload["kv_bytes"]
    k = Table(title="KV cache bytes per token")
    k.add_column("what")
    k.add_column("B/token", justify="right")
    for name in ("engine_measured", "eager_measured"):
        if kv.get(name):
            m = kv[name]
            k.add_row(f"{name}, {m['layout']} layout (entries / all / growing part)",
                      f"{m['entries_per_token']:.1f} / {m['per_token']:.1f} / {m['growing_per_token']:.1f}")
    for name in ("measured_per_token", "production_per_token", "reference_per_token", "v32_per_token",
                 "v32_same_layers_per_token", "ratio_v32_over_measured_per_token", "ratio_v32_over_measured",
                 "ratio_v32_same_layers_over_measured", "ratio_measured_over_production"):
        if kv.get(name) is not None:
            k.add_row(name, f"{kv[name]:.2f}")
    for table in (t, p, k):
        console.print(table)
    prof = payload.get("engine", {}).get("profile")
    if prof and "top" in prof:
        f = Table(title=f"engine decode b{prof['batch']} ctx{prof['context']}, uncaptured, {prof['steps']} steps: "
                        f"{prof['kernels_per_step']:.0f} {prof['what']} per step ({prof['distinct']} distinct), "
                        f"{prof['busy_us_per_step']:.1f} us busy per step")
        for h in ("name", "per step", "us per step", "share"):
            f.add_column(h, justify="left" if h == "name" else "right")
        for r in prof["top"]:
            f.add_row(r["name"][:90], f"{r['count_per_step']:.1f}", f"{r['us_per_step']:.1f}",
                      f"{r['us_per_step'] / max(prof['busy_us_per_step'], 1e-9):.1%}")
        console.print(f)
    elif prof:
        console.print(f"engine profile: {prof.get('error')}")
    for line in _notes(payload):
        console.print(f"  {line}")
    if payload.get("command"):
        console.print(f"command: {payload['command']}")


def plot_latency(payload: dict[str, Any], path: str | Path) -> None:
    """Decode latency vs context (log-log), one panel per batch size: engine, eager, compile, floor."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        from v4compile.errors import InputError

        raise InputError(f"--plot needs matplotlib (pip install 'v4compile[plot]'): {e}") from None
    batches = sorted({d["batch"] for d in payload["decode"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        rows = [d for d in payload["decode"] if d["batch"] == b]
        for impl, style in (("engine", "o-"), ("eager", "s-"), ("compile", "^-")):
            pts = [(d["context"], d[impl]["step_us"]) for d in rows if d[impl]["status"] == "ok"]
            if pts:
                ax.plot(*zip(*pts), style, label=impl)
        ax.plot([d["context"] for d in rows], [d["floor"]["us"] for d in rows], "k--", label="floor")
        ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="decode step (us)", title=f"batch {b}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"{payload['device']}: decode step latency vs context")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""`v4compile inspect` for a model: configuration, layer map, parameter counts, KV bytes per token."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from v4compile.model.config import ModelConfig
from v4compile.model.kv_bytes import LAYOUTS, kv_bytes, v32_bytes_per_token
from v4compile.model.schema import checkpoint_schema, count_parameters


def model_summary(cfg: ModelConfig) -> dict[str, Any]:
    """Everything `inspect` prints, as plain JSON-able data."""
    kinds = [cfg.layer_kind(i) for i in range(cfg.n_layers)]
    kv = {layout: kv_bytes(cfg, layout) for layout in LAYOUTS}
    v32 = v32_bytes_per_token()
    return {
        "config": cfg.to_dict(),
        "layers": {
            "window": kinds.count("window"), "csa": kinds.count("csa"), "hca": kinds.count("hca"),
            "mtp": cfg.n_mtp_layers, "hash_routed": cfg.n_hash_layers, "map": kinds,
        },
        "tensors": len(checkpoint_schema(cfg)),
        "parameters": count_parameters(cfg),
        "kv_bytes_per_token": {
            layout: {
                "per_token": k.per_token,
                "window_bytes_per_sequence": k.window_per_sequence,
                "compressor_state_bytes_per_sequence": k.state_per_sequence,
                "at_1M_tokens_GB": k.at(1 << 20) / 1e9,
            }
            for layout, k in kv.items()
        },
        "v32_bytes_per_token": v32,
        "v32_over_production": v32 / kv["production"].per_token,
    }


def _fmt_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3f}{unit}"
    return str(n)


def print_summary(s: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    c, L = s["config"], s["layers"]
    console.print(f"[bold]V4 model[/bold]  dim {c['dim']}, {c['n_layers']} layers + {c['n_mtp_layers']} MTP, "
                  f"{c['n_heads']} heads x {c['head_dim']}, vocab {c['vocab_size']}, "
                  f"{c['n_routed_experts']} experts (top-{c['n_activated_experts']}), "
                  f"weights {c['weight_dtype']}, experts {c['expert_dtype']}")
    console.print(f"layers: {L['window']} window-only, {L['csa']} CSA (ratio 4, top-{c['index_topk']}), "
                  f"{L['hca']} HCA; hash-routed: first {L['hash_routed']}; {s['tensors']} checkpoint tensors")
    t = Table(title="parameters")
    t.add_column("component")
    t.add_column("count", justify="right")
    for k, v in s["parameters"].items():
        t.add_row(k, _fmt_count(v))
    console.print(t)
    t = Table(title="KV cache bytes per token (long-context asymptote)")
    for col in ("layout", "bytes/token", "window B/seq", "compressor state B/seq", "GB at 1M tokens"):
        t.add_column(col, justify="right")
    for layout, k in s["kv_bytes_per_token"].items():
        t.add_row(layout, f"{k['per_token']:,.0f}", f"{k['window_bytes_per_sequence']:,}",
                  f"{k['compressor_state_bytes_per_sequence']:,}", f"{k['at_1M_tokens_GB']:.2f}")
    t.add_row("V3.2 (FP8)", f"{s['v32_bytes_per_token']:,}", "", "", f"{s['v32_bytes_per_token'] * (1 << 20) / 1e9:.2f}")
    console.print(t)
    console.print(f"V3.2 / V4 production = {s['v32_over_production']:.2f}x")

"""`v4compile demo`: the embedded main job.

Until the engine path exists (build / validate, later issues), the demo runs the eager reference of the
embedded model end to end: random-initialised `tiny` weights, a prefill, greedy decoding through the KV
cache, and the cache's correctness check (every decode step's logits against a fresh full forward of the
same prefix, in float32). It prints what it did and the measured numbers.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from v4compile.model.config import ModelConfig
from v4compile.validate import max_rel_err


def run_demo(preset: str = "tiny", prompt_len: int = 48, new_tokens: int = 24, seed: int = 0,
             quiet: bool = False) -> dict[str, Any]:
    from v4compile.model.reference import ReferenceModel

    console = Console(quiet=quiet)
    cfg = ModelConfig.preset(preset)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(2, cfg.vocab_size, (1, prompt_len), generator=g)
    result: dict[str, Any] = {"preset": preset, "prompt_len": prompt_len, "new_tokens": new_tokens}

    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype).removeprefix("torch.")
        model = ReferenceModel(cfg, dtype=dtype, seed=seed).eval()
        cache = model.new_cache(1, prompt_len + new_tokens)
        tokens = prompt.clone()
        with torch.inference_mode():
            t0 = time.perf_counter()
            logits = model(tokens, 0, cache)
            t_prefill = time.perf_counter() - t0
            step_logits, t_decode = [], 0.0
            for i in range(new_tokens):
                nxt = logits[:, -1].argmax(-1, keepdim=True)
                tokens = torch.cat([tokens, nxt], 1)
                t0 = time.perf_counter()
                logits = model(nxt, prompt_len + i, cache)
                t_decode += time.perf_counter() - t0
                step_logits.append(logits[:, -1])
            full = model(tokens)  # one fresh prefill of the whole sequence, no cache reuse
        err = max(max_rel_err(s, full[:, prompt_len + i]) for i, s in enumerate(step_logits))
        result[name] = {
            "generated": tokens[0, prompt_len:].tolist(),
            "prefill_tokens_per_s": prompt_len / t_prefill,
            "decode_ms_per_token": 1000 * t_decode / new_tokens,
            "decode_vs_prefill_max_rel_err": err,
            "logits_std": float(full.float().std()),
        }

    ok = result["float32"]["decode_vs_prefill_max_rel_err"] < 1e-4
    result["ok"] = ok
    t = Table(title=f"v4compile demo: eager reference, preset {preset!r} (random weights), "
                    f"{prompt_len}-token prompt + {new_tokens} greedy tokens")
    for col in ("dtype", "prefill tok/s", "decode ms/token", "decode vs full-forward max rel err", "logits std"):
        t.add_column(col, justify="right")
    for name in ("bfloat16", "float32"):
        r = result[name]
        t.add_row(name, f"{r['prefill_tokens_per_s']:.0f}", f"{r['decode_ms_per_token']:.1f}",
                  f"{r['decode_vs_prefill_max_rel_err']:.2e}", f"{r['logits_std']:.3f}")
    console.print(f"generated (bf16): {result['bfloat16']['generated']}")
    console.print(t)
    console.print("float32 decode through the KV cache " + ("matches" if ok else "[red]DOES NOT match[/red]")
                  + " a fresh forward of the same prefix (bound 1e-4; bf16 differs by design, V4-SPEC 11.1)")
    return result

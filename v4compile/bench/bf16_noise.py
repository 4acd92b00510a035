"""The eager model's own bf16 noise at long context: the same tokens prefilled in one call vs in two chunks.

    python -m v4compile.bench.bf16_noise [--checkpoint DIR] [--max-len 8256]

Prints logits calc_diff, max rel err, KL(one call || two chunks) mean / max and top-1 agreement for validate's
default prompts (the longest two). These are the numbers behind the bf16 rows of v4compile/validate.py's table.
"""

from __future__ import annotations

import argparse
import time

import torch


def main(argv: list[str] | None = None) -> int:
    from v4compile.demo import DEMO_CHECKPOINT
    from v4compile.model.checkpoint import load_checkpoint
    from v4compile.parity import kl_per_position
    from v4compile.parity_run import default_prompts
    from v4compile.validate import calc_diff, max_rel_err

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(DEMO_CHECKPOINT))
    ap.add_argument("--max-len", type=int, default=8256)
    ap.add_argument("--steps", type=int, default=4)
    a = ap.parse_args(argv)
    m = load_checkpoint(a.checkpoint, dtype=torch.bfloat16).eval()
    for p in default_prompts(m.cfg, a.max_len, a.steps)[:2]:
        t0 = time.perf_counter()
        tok, n = torch.tensor([p]), len(p)
        with torch.no_grad():
            one = m(tok, 0, m.new_cache(1, a.max_len))
            cache, h = m.new_cache(1, a.max_len), n // 2 + 1
            two = torch.cat([m(tok[:, :h], 0, cache), m(tok[:, h:], h, cache)], 1)
        kl = kl_per_position(one, two)
        print(f"{n} tokens: calc_diff {calc_diff(one, two):.2e}, max rel err {max_rel_err(two, one):.2f}, "
              f"KL mean {float(kl.mean()):.3f} / max {float(kl.max()):.2f}, "
              f"top-1 {float((one.argmax(-1) == two.argmax(-1)).float().mean()):.2f} "
              f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

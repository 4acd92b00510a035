"""Train the demo model: `python -m v4compile.demo_model.train --out DIR [--steps N] [--time-budget S] ...`.

The ReferenceModel itself is trained (quantized=False float32 weights, `set_differentiable(True)`), with
Muon for hidden matrices and AdamW for the rest. Losses: cross-entropy of the value token at every query
position, plus an auxiliary supervised loss on the lightning indexer of every CSA layer: cross-entropy of
the indexer scores at the query position against the compressed blocks holding the needle record (block j
and the overlapping block j + 1). The indexer's top-k is discrete, so without it the indexer gets no
gradient. FP8 / FP4 fake-quant roundings pass gradients straight through while training (`straight_through`).
Curriculum: 512 -> 1024 -> 2048 -> 4096-token contexts at about constant tokens per step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from v4compile.demo_model.evaluate import indexer_hit_rate, retrieval_accuracy
from v4compile.demo_model.export import write_demo_checkpoint
from v4compile.demo_model.muon import build_optimizers
from v4compile.demo_model.report import final_report
from v4compile.demo_model.task import Batch, Vocab, sample
from v4compile.model.checkpoint import load_checkpoint
from v4compile.model.config import ModelConfig
from v4compile.model.reference import ReferenceModel
from v4compile.quant import formats as qf


@dataclass
class TrainConfig:
    preset: str = "demo"
    steps: int = 100000  # upper bound; --time-budget usually ends training first
    time_budget: float = 0.0  # seconds of training (0: no limit); schedules follow max(step, time) progress
    tokens_per_step: int = 32768
    stages: tuple[tuple[float, int], ...] = ((0.0, 512), (0.2, 1024), (0.45, 2048), (0.75, 4096))
    n_queries: int = 8
    records: tuple[int, int] = (8, 48)
    lr: float = 3e-3  # Muon (RMS-matched updates) and AdamW share it
    warmup: int = 30
    weight_decay: float = 0.0
    aux_weight: float = 1.0
    clip: float = 1.0
    act_dtype: str = "float32"
    seed: int = 0
    eval_every: float = 60.0  # seconds between progress evals
    eval_n: int = 32
    eval_lengths: tuple[int, ...] = (2048, 8192)  # progress evals use the first; the final report all


@contextlib.contextmanager
def straight_through() -> Iterator[None]:
    """FP8 / FP4 fake-quant rounding with an identity gradient (the e2m1 encoder is integer code, so the
    indexer's FP4 query / key would otherwise get no gradient); restores the exact functions on exit."""
    orig8, orig4 = qf.round_e4m3, qf.round_e2m1
    qf.round_e4m3 = lambda x: x + (orig8(x) - x).detach()
    qf.round_e2m1 = lambda x: x + (orig4(x) - x).detach()
    try:
        yield
    finally:
        qf.round_e4m3, qf.round_e2m1 = orig8, orig4


def make_model(cfg: ModelConfig, act_dtype: torch.dtype, device: torch.device, seed: int) -> ReferenceModel:
    """The seeded reference model with float32 trainable weights (integer tables stay buffers)."""
    model = ReferenceModel(cfg, dtype=act_dtype, device=device, seed=seed, quantized=False)
    for name, p in model.named_parameters():
        p.data = p.data.float()
        p.requires_grad_(not name.endswith("gate.bias"))  # selection-only bias: set by balance_experts
    model.set_differentiable(True)
    return model


def indexer_loss(trace: dict, b: Batch) -> Tensor:
    """Mean over CSA layers and queries of -log softmax(indexer scores at the query)[needle blocks j, j+1]."""
    losses = []
    for scores in trace.get("indexer_scores", {}).values():  # [B, L, N]
        N = scores.shape[-1]
        s = scores.gather(1, b.query_pos.to(scores.device).unsqueeze(-1).expand(-1, -1, N))  # [B, Q, N]
        logp = torch.log_softmax(s.float(), -1)
        j = b.needle_block.to(scores.device).unsqueeze(-1)
        pos = logp.gather(-1, torch.cat((j, (j + 1).clamp(max=N - 1)), -1))
        losses.append(-torch.logsumexp(pos, -1).mean())
    return torch.stack(losses).mean() if losses else torch.zeros(())


def train_step(model: ReferenceModel, b: Batch, tc: TrainConfig) -> tuple[Tensor, Tensor, Tensor, dict]:
    """(total loss, answer cross-entropy, indexer loss, expert ids per layer) of one batch; backward is the
    caller's."""
    trace: dict = {}
    logits = model(b.tokens.to(model.device), trace=trace)  # [B, L, V]
    qp = b.query_pos.to(model.device)
    at = logits.gather(1, qp.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))  # [B, Q, V]
    ce = F.cross_entropy(at.flatten(0, 1).float(), b.answer.to(model.device).flatten())
    aux = indexer_loss(trace, b)
    return ce + tc.aux_weight * aux, ce, aux, trace.get("experts", {})


@torch.no_grad()
def balance_experts(model: ReferenceModel, experts: dict, rate: float = 1e-3) -> None:
    """Auxiliary-loss-free load balancing (V4 / V3): nudge each bias-routed layer's selection bias up for
    under-loaded experts and down for over-loaded ones (the bias gets no gradient: it only selects)."""
    for layer, ids in experts.items():
        gate = model.layers[layer].ffn.gate
        if gate.hash:
            continue
        load = torch.bincount(ids.flatten(), minlength=gate.bias.numel()).float()
        gate.bias.add_(rate * torch.sign(load.mean() - load))


def max_records(context_len: int, n_queries: int, window: int) -> int:
    """Record slots that fit before the queries and the window (task.sample's bound)."""
    return (context_len - (3 * n_queries - 1) - window - 4) // 4


def _stage(tc: TrainConfig, frac: float) -> int:
    return [ctx for start, ctx in tc.stages if frac >= start][-1]


def train(tc: TrainConfig, out: Path, device: torch.device, log=print, init: Path | None = None
          ) -> tuple[ReferenceModel, list[dict]]:
    """Train until tc.steps or tc.time_budget; logs a dict per eval; returns the model and the log."""
    torch.manual_seed(tc.seed)
    cfg = ModelConfig.preset(tc.preset)
    act = getattr(torch, tc.act_dtype)
    model = make_model(cfg, act, device, tc.seed)
    if init is not None:  # continue from a checkpoint (weights only; optimizer state starts fresh)
        trained = load_checkpoint(init, dtype=torch.float32)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(trained.state_dict()[name].float())
        log(f"initialised from {init}")
    muon, adam, _ = build_optimizers(model.named_parameters(), tc.lr, tc.lr, tc.weight_decay)
    g = torch.Generator().manual_seed(tc.seed + 1)
    vocab = Vocab(size=cfg.vocab_size)
    history: list[dict] = []
    t0 = last_eval = time.time()
    step = 0
    with straight_through():
        while step < tc.steps:
            elapsed = time.time() - t0
            frac = max(step / tc.steps, elapsed / tc.time_budget if tc.time_budget else 0.0)
            if frac >= 1.0:
                break
            ctx = _stage(tc, frac)
            bsz = max(1, tc.tokens_per_step // ctx)
            lo, hi = tc.records
            n_rec = min(int(torch.randint(lo, hi + 1, (1,), generator=g)), max_records(ctx, tc.n_queries, cfg.window_size))
            b = sample(bsz, ctx, n_records=n_rec, n_queries=tc.n_queries, window=cfg.window_size,
                       generator=g, with_answer=True, vocab=vocab)
            lr = tc.lr * min(1.0, (step + 1) / tc.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
            for opt in (muon, adam):
                for grp in opt.param_groups:
                    grp["lr"] = lr
            loss, ce, aux, trace_experts = train_step(model, b, tc)
            for opt in (muon, adam):
                opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip)
            muon.step()
            adam.step()
            balance_experts(model, trace_experts)
            step += 1
            if step % 10 == 1:
                log(f"step {step} ctx {ctx} bs {bsz} lr {lr:.2e} loss {loss.item():.4f} ce {ce.item():.4f} "
                    f"aux {aux.item():.4f} gnorm {gn.item():.2f} t {time.time() - t0:.0f}s")
            if tc.eval_every and time.time() - last_eval > tc.eval_every:
                history.append(_progress_eval(model, tc, step, time.time() - t0, out, log))
                last_eval = time.time()
    history.append(_progress_eval(model, tc, step, time.time() - t0, out, log))
    return model, history


def _progress_eval(model: ReferenceModel, tc: TrainConfig, step: int, elapsed: float, out: Path, log) -> dict:
    model.eval()
    L = tc.eval_lengths[0]
    acc = retrieval_accuracy(model, tc.eval_n, L, seed=1234, batch=16)
    hits = indexer_hit_rate(model, tc.eval_n, L, seed=1234, batch=16)
    model.train()
    rec = dict(step=step, time_s=round(elapsed, 1), eval_len=L, acc=acc, indexer_hits=hits)
    log(f"EVAL {json.dumps(rec)}")
    write_demo_checkpoint(float_state(model), model.cfg, out / "ckpt_bf16", "bf16", "bf16")  # survives a timeout
    return rec


def float_state(model: ReferenceModel) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items()}


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace, str, int, float]:
    ap = argparse.ArgumentParser(prog="v4compile train-demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=TrainConfig.steps)
    ap.add_argument("--time-budget", type=float, default=0.0)
    ap.add_argument("--tokens-per-step", type=int, default=TrainConfig.tokens_per_step)
    ap.add_argument("--stages", default="0:512,0.2:1024,0.45:2048,0.75:4096", help="frac:context,...")
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--aux-weight", type=float, default=TrainConfig.aux_weight)
    ap.add_argument("--act-dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=float, default=TrainConfig.eval_every)
    ap.add_argument("--eval-n", type=int, default=TrainConfig.eval_n)
    ap.add_argument("--eval-lengths", default="2048,8192", help="context lengths of the evals")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--init", type=Path, default=None, help="start from this (bf16) checkpoint's weights")
    ap.add_argument("--scratch", type=Path, default=None, help="where the final checkpoints go (default --out)")
    ap.add_argument("--final-n", type=int, default=64, help="queries per final eval (0: skip the final report)")
    ap.add_argument("--final-budget", type=float, default=120.0, help="seconds for the final report")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    try:
        stages = tuple((float(f), int(c)) for f, c in (s.split(":") for s in a.stages.split(",")))
        lengths = tuple(int(x) for x in a.eval_lengths.split(","))
    except ValueError:
        ap.error(f"--stages {a.stages!r} / --eval-lengths {a.eval_lengths!r}: expected 'frac:ctx,...' / 'len,...'")
    if not stages or stages[0][0] != 0.0 or any(c < 128 for _, c in stages):
        ap.error(f"--stages {a.stages!r}: the first stage starts at 0 and contexts are >= 128 tokens")
    tc = TrainConfig(preset=a.preset, steps=a.steps, time_budget=a.time_budget, tokens_per_step=a.tokens_per_step,
                     stages=stages, lr=a.lr, aux_weight=a.aux_weight, act_dtype=a.act_dtype, seed=a.seed,
                     eval_every=a.eval_every, eval_n=a.eval_n,
                     eval_lengths=lengths)
    return tc, a, a.device, a.final_n, a.final_budget


def main(argv: list[str] | None = None) -> int:
    tc, args, device, final_n, final_budget = parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    log_f = (out / "train_log.txt").open("a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_f.write(msg + "\n")
        log_f.flush()

    log(f"train config {json.dumps(asdict(tc))} device {device} torch {torch.__version__}")
    t0 = time.time()
    model, history = train(tc, out, torch.device(device), log, args.init)
    if final_n:
        final_report(model, args.scratch or out, final_n, time.time() + final_budget, torch.device(device),
                     tc.eval_lengths, log, metrics_dir=out)
    else:
        write_demo_checkpoint(float_state(model), model.cfg, out / "ckpt_bf16", "bf16", "bf16")
    (out / "train_history.json").write_text(json.dumps(dict(config=asdict(tc), history=history,
                                                            train_seconds=round(time.time() - t0, 1))))
    log(f"done in {time.time() - t0:.0f}s; checkpoints in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

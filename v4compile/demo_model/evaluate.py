"""Retrieval accuracy of the demo model, for an eager ReferenceModel or a runtime Engine (same task, same seed)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from v4compile.demo_model.task import Batch, sample
from v4compile.errors import InputError

DEFAULT_RECORDS = 32  # key-value records per eval sequence (1 needle + 31 distractors)


def _is_engine(m: Any) -> bool:
    return hasattr(m, "prefill") and hasattr(m, "new_session")


def last_logits(model_or_engine: Any, tokens: Tensor) -> Tensor:
    """Logits f32 [B, V] at the last position of a fresh prefill of tokens [B, L]."""
    if _is_engine(model_or_engine):
        eng = model_or_engine
        session = eng.new_session(tokens.shape[0])
        return eng.prefill(tokens.to(eng.device), 0, session)[:, -1].float().cpu()
    if isinstance(model_or_engine, torch.nn.Module):
        with torch.no_grad():
            return model_or_engine(tokens.to(model_or_engine.device))[:, -1].float().cpu()
    raise InputError(f"retrieval_accuracy: expected a ReferenceModel or an Engine, got {type(model_or_engine).__name__}")


def _cfg_of(m: Any):
    return m.cfg


def _max_batch(m: Any, batch: int) -> int:
    return min(batch, m.max_batch) if _is_engine(m) else batch


def eval_batches(model_or_engine: Any, n: int, context_len: int, seed: int, batch: int = 8,
                 n_records: int = DEFAULT_RECORDS):
    """Yield (Batch, predicted token [b]) over n seeded eval queries. The queries depend only on (n, context_len,
    seed, batch): an eager model and an engine that serves fewer sequences per call see the same ones."""
    if n < 1:
        raise InputError(f"retrieval_accuracy: n = {n}; expected >= 1")
    cfg = _cfg_of(model_or_engine)
    run = _max_batch(model_or_engine, batch)  # an engine may serve fewer sequences per call than `batch`
    for i0 in range(0, n, batch):  # sampling depends on (seed, batch) only, never on the model or engine
        b = sample(min(batch, n - i0), context_len, n_records=n_records, window=cfg.window_size,
                   seed=seed * 1_000_003 + i0)
        preds = [last_logits(model_or_engine, b.tokens[j:j + run]).argmax(-1)
                 for j in range(0, b.tokens.shape[0], run)]
        yield b, torch.cat(preds)


def retrieval_accuracy(model_or_engine: Any, n: int, context_len: int, seed: int, batch: int = 8,
                       n_records: int = DEFAULT_RECORDS) -> float:
    """Fraction of n seeded queries at `context_len` tokens whose greedy next token is the exact value."""
    hits = 0
    for b, pred in eval_batches(model_or_engine, n, context_len, seed, batch, n_records):
        hits += int((pred == b.answer[:, -1]).sum())
    return hits / n


def example_queries(model_or_engine: Any, n: int = 4, context_len: int = 2048, seed: int = 0) -> list[dict]:
    """A few queries for the demo output: query key, expected value, model answer, needle distance."""
    rows = []
    for b, pred in eval_batches(model_or_engine, n, context_len, seed, batch=n):
        for i in range(b.tokens.shape[0]):
            rows.append(dict(key=int(b.query_key[i, -1]), expected=int(b.answer[i, -1]), answer=int(pred[i]),
                             needle_distance=int(b.query_pos[i, -1] - b.needle_pos[i, -1]),
                             correct=bool(pred[i] == b.answer[i, -1])))
    return rows


def format_examples(rows: list[dict]) -> str:
    """Human lines: 'key 57 -> expected 201, model 201 (needle 1804 tokens back) ok'."""
    return "\n".join(f"key {r['key']:>4} -> expected {r['expected']:>4}, model {r['answer']:>4} "
                     f"(needle {r['needle_distance']} tokens back) {'ok' if r['correct'] else 'WRONG'}" for r in rows)


def indexer_hit_rate(model: torch.nn.Module, n: int, context_len: int, seed: int, batch: int = 8,
                     n_records: int = DEFAULT_RECORDS) -> dict[int, float]:
    """Per CSA layer: fraction of eval queries whose indexer picks (at the query position) include a
    compressed block holding the needle record (block j or the overlapping j + 1). Eager model only."""
    hits: dict[int, int] = {}
    cfg = model.cfg
    for i0 in range(0, n, batch):
        b = sample(min(batch, n - i0), context_len, n_records=n_records, window=cfg.window_size,
                   seed=seed * 1_000_003 + i0)
        trace: dict = {}
        with torch.no_grad():
            model(b.tokens.to(model.device), trace=trace)
        for layer, picks in trace.get("indexer", {}).items():
            hits[layer] = hits.get(layer, 0) + int(needle_hits(picks.cpu(), b).sum())
    return {layer: h / n for layer, h in sorted(hits.items())}


def needle_hits(picks: Tensor, b: Batch) -> Tensor:
    """picks int [B, L, k] -> bool [B, Q]: the picks at each query position include block j or j + 1."""
    at = picks.gather(1, b.query_pos.unsqueeze(-1).expand(-1, -1, picks.shape[-1]).to(picks.device).long())
    j = b.needle_block.unsqueeze(-1).to(picks.device)
    return ((at == j) | (at == j + 1)).any(-1)

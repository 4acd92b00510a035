"""Eager models and engines are scored on the same queries, whatever batch an engine serves per call."""

import torch

from v4compile.demo_model.evaluate import eval_batches
from v4compile.model.config import ModelConfig


class _Recorder:
    """Engine-shaped stub: records every sequence it is given (and always answers token 0)."""

    def __init__(self, max_batch: int) -> None:
        self.cfg, self.max_batch, self.seen, self.device = ModelConfig.preset("demo"), max_batch, [], "cpu"

    def new_session(self, batch: int):
        assert batch <= self.max_batch
        return None

    def prefill(self, tokens, start_pos, session):
        self.seen += [tuple(t.tolist()) for t in tokens]
        logits = torch.zeros(tokens.shape[0], tokens.shape[1], self.cfg.vocab_size)
        logits[:, -1, 0] = 1.0  # always answers token 0
        return logits


def test_engine_batch_does_not_change_the_queries():
    small, large = _Recorder(max_batch=2), _Recorder(max_batch=8)
    got_small = [b.tokens for b, _ in eval_batches(small, 7, 600, seed=3, batch=4)]
    got_large = [b.tokens for b, _ in eval_batches(large, 7, 600, seed=3, batch=4)]
    assert all(torch.equal(a, b) for a, b in zip(got_small, got_large))
    assert small.seen == large.seen and len(small.seen) == 7

"""The build-time parity check's verdicts, against a stand-in engine that runs the eager model (no build)."""

import pytest
import torch

from v4compile.api import check_parity, eager_generate
from v4compile.errors import ParityError


class EagerEngine:
    """Engine interface over the eager model, optionally adding noise to the prefill logits."""

    max_len, max_batch = 16, 2

    def __init__(self, model, noise: float) -> None:
        self.model, self.noise = model, noise

    def new_session(self, batch):
        return self.model.new_cache(batch, self.max_len)

    def prefill(self, tokens, start_pos, cache):
        logits = self.model(tokens, start_pos, cache)
        return logits + self.noise * torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))

    def generate(self, prompts, n, stop_tokens=()):
        return [eager_generate(self.model, p, n) for p in prompts]


def test_parity_summary_and_failure(eager):
    ok = check_parity(eager, EagerEngine(eager, 0.0), "fp32")
    assert ok["ok"] and ok["logits_calc_diff"] == 0 and ok["greedy_token_agreement"] == "8/8"
    assert ok["prompts"] == [8, 7, 1]
    with pytest.raises(ParityError, match="calc_diff .* \\(bound 1e-05\\)"):
        check_parity(eager, EagerEngine(eager, 1.0), "fp32")

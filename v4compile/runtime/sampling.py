"""Next-token choice from logits: greedy at temperature 0, else temperature + nucleus (top-p) sampling."""

from __future__ import annotations

import torch
from torch import Tensor

from v4compile.errors import InputError


def sample(logits: Tensor, temperature: float, top_p: float, gen: torch.Generator) -> Tensor:
    """logits [B, V] -> token ids int64 [B]; ties under greedy go to the lowest id (torch.argmax)."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise InputError(f"temperature {temperature} must be >= 0 and top_p {top_p} in (0, 1]")
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.double() / temperature, -1)
    if top_p < 1:
        p_sorted, idx = probs.sort(-1, descending=True)
        keep = p_sorted.cumsum(-1) - p_sorted < top_p  # the smallest prefix whose mass reaches top_p
        p_sorted = torch.where(keep, p_sorted, 0.0)
        choice = torch.multinomial(p_sorted, 1, generator=gen)
        return idx.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)

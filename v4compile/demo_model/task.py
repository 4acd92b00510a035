"""Synthetic long-context retrieval task for the demo model: key-value records scattered over filler, a query at
the end, answerable only by looking further back than the sliding window.

Layout of one sequence (L tokens): BOS, filler, K records of 4 tokens [REC, key, value, END] at positions
4j .. 4j+3 (aligned to the CSA compression blocks, so one compressed entry holds a whole record), more filler,
then n_queries queries [QRY, key, value] (the last query's value is left out in eval sequences). Every record
ends more than `window` positions before the first query token, so the window alone never sees a needle; the
K - 1 other records are distractors (distinct keys, random values).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from v4compile.errors import InputError

BOS, REC, QRY, END = 0, 2, 3, 4
BLOCK = 4  # record alignment = the CSA compression ratio


@dataclass(frozen=True)
class Vocab:
    """Token id ranges of the task: markers below `first_key`, then keys, values, filler up to `size`."""

    size: int = 512
    n_keys: int = 128
    n_values: int = 128
    first_key: int = 16

    @property
    def first_value(self) -> int:
        return self.first_key + self.n_keys

    @property
    def first_filler(self) -> int:
        return self.first_value + self.n_values

    def __post_init__(self) -> None:
        if self.first_filler >= self.size:
            raise InputError(f"task vocab: keys + values end at {self.first_filler}, vocab_size is {self.size}")


@dataclass
class Batch:
    """tokens int64 [B, L]; for each query q: key position query_pos [B, Q] (the prediction position),
    answer value [B, Q], record (needle) start position needle_pos [B, Q] and its key [B, Q]."""

    tokens: Tensor
    query_pos: Tensor
    answer: Tensor
    needle_pos: Tensor
    query_key: Tensor

    @property
    def needle_block(self) -> Tensor:
        """Compressed-block index j holding the needle record (positions 4j..4j+3)."""
        return torch.div(self.needle_pos, BLOCK, rounding_mode="floor")


def sample(batch: int, context_len: int, *, n_records: int = 16, n_queries: int = 1, window: int = 64,
           seed: int | None = None, generator: torch.Generator | None = None, with_answer: bool = False,
           vocab: Vocab = Vocab()) -> Batch:
    """`batch` sequences of `context_len` tokens. Eval form (with_answer=False): the sequence ends with
    [QRY, key] and the model's next-token prediction at the last position is scored. Training form
    (with_answer=True): every query is [QRY, key, value] and the sequence is context_len + 1 tokens long
    so that the last value is a teacher-forced target too (loss at query_pos predicts answer)."""
    if (seed is None) == (generator is None):
        raise InputError("task.sample: give exactly one of seed / generator")
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    if n_records > vocab.n_keys or n_queries > n_records or n_queries < 1:
        raise InputError(f"task: n_records={n_records}, n_queries={n_queries}; need 1 <= queries <= records "
                         f"<= n_keys={vocab.n_keys}")
    q0 = context_len - (3 * n_queries - 1)  # first QRY; the last query's key is at context_len - 1
    n_slots = (q0 - window - BLOCK) // BLOCK  # slots 1..n_slots: a record ends <= q0 - window - 1 (slot 0: BOS)
    if n_slots < n_records:
        raise InputError(f"context_len {context_len} too short for {n_records} records beyond a window of {window}")
    L = context_len + (1 if with_answer else 0)
    tok = torch.randint(vocab.first_filler, vocab.size, (batch, L), generator=g)
    tok[:, 0] = BOS
    keys = torch.rand(batch, vocab.n_keys, generator=g).argsort(1)[:, :n_records] + vocab.first_key
    values = torch.randint(vocab.first_value, vocab.first_value + vocab.n_values, (batch, n_records), generator=g)
    slots = torch.rand(batch, n_slots, generator=g).argsort(1)[:, :n_records] + 1
    starts = slots * BLOCK  # [B, K]
    for off, fill in enumerate((torch.full_like(keys, REC), keys, values, torch.full_like(keys, END))):
        tok.scatter_(1, starts + off, fill)
    which = torch.rand(batch, n_records, generator=g).argsort(1)[:, :n_queries]  # records asked about
    qry = q0 + 3 * torch.arange(n_queries)  # [Q]
    qpos = (qry + 1).expand(batch, -1).contiguous()  # key positions = prediction positions
    qkey, qval = keys.gather(1, which), values.gather(1, which)
    tok[:, qry] = QRY
    tok.scatter_(1, qpos, qkey)
    ans_pos = qpos + 1
    keep = ans_pos < L
    tok[keep.nonzero(as_tuple=True)[0], ans_pos[keep]] = qval[keep]
    return Batch(tokens=tok, query_pos=qpos, answer=qval, needle_pos=starts.gather(1, which), query_key=qkey)

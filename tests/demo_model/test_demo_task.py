"""The retrieval task generator: determinism, needle beyond the window, answers, distractors."""

import pytest
import torch

from v4compile.demo_model.task import BLOCK, QRY, REC, Vocab, sample
from v4compile.errors import InputError


@pytest.mark.parametrize("with_answer,n_queries", [(False, 1), (True, 4)])
def test_records_queries_and_window(with_answer, n_queries):
    v = Vocab()
    b = sample(6, 512, n_records=12, n_queries=n_queries, window=64, seed=3, with_answer=with_answer)
    assert b.tokens.shape == (6, 512 + int(with_answer))
    for i in range(6):
        t = b.tokens[i]
        starts = (t == REC).nonzero().flatten()
        assert len(starts) == 12 and bool((starts % BLOCK == 0).all())
        keys, vals = t[starts + 1], t[starts + 2]
        assert len(set(keys.tolist())) == 12  # distinct keys: 11 distractors per needle
        assert bool(((keys >= v.first_key) & (keys < v.first_value)).all())
        for q in range(n_queries):
            p = int(b.query_pos[i, q])
            assert int(t[p - 1]) == QRY and int(t[p]) == int(b.query_key[i, q])
            n = int(b.needle_pos[i, q])
            assert int(t[n + 1]) == int(b.query_key[i, q]) and int(t[n + 2]) == int(b.answer[i, q])
            assert int(vals[keys == t[p]][0]) == int(b.answer[i, q])  # the needle is the one record with that key
            assert p - (n + BLOCK - 1) > 64  # the whole record lies outside the query's window
            if p + 1 < t.shape[0]:
                assert int(t[p + 1]) == int(b.answer[i, q])  # teacher-forced value
        assert int(b.query_pos[i, -1]) == 511  # the last query key closes the context
        # nothing but the needle record can give the answer away within the window
        assert int(b.answer[i, -1]) not in t[int(b.query_pos[i, -1]) - 63:int(b.query_pos[i, -1]) + 1].tolist() \
            or n_queries > 1


def test_deterministic_and_seed_dependent():
    a, b, c = (sample(3, 300, n_records=8, window=32, seed=s) for s in (5, 5, 6))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.needle_pos, b.needle_pos)
    assert not torch.equal(a.tokens, c.tokens)


def test_bad_arguments():
    with pytest.raises(InputError, match="too short"):
        sample(1, 128, n_records=40, window=64, seed=0)
    with pytest.raises(InputError, match="exactly one"):
        sample(1, 256, seed=0, generator=torch.Generator())

"""The v4 primitive ops against naive, independently written formulations of V4-SPEC (small shapes)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from v4compile.model import ops
from v4compile.model.ops import BODIES, hadamard, window_indices
from v4compile.model.rope import apply_rope_tail, rope_inv_freq
from v4compile.quant import formats as qf
from v4compile.quant.kv_layout import pack_index_rows, pack_kv_rows


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------- mHC


def naive_sinkhorn(m: list[list[float]], iters: int, eps: float) -> list[list[float]]:
    n = len(m)
    rows = [[math.exp(v - max(r)) for v in r] for r in m]
    m = [[v / sum(r) + eps for v in r] for r in rows]

    def col_norm(a):
        cs = [sum(a[j][k] for j in range(n)) for k in range(n)]
        return [[a[j][k] / (cs[k] + eps) for k in range(n)] for j in range(n)]

    m = col_norm(m)
    for _ in range(iters - 1):
        m = [[v / (sum(r) + eps) for v in r] for r in m]
        m = col_norm(m)
    return m


def test_sinkhorn_matches_spec_order_and_is_column_stochastic():
    logits = 4 * torch.randn(64, 4, 4, generator=gen(1))
    comb = ops.sinkhorn(logits, 20, 1e-6)
    assert (comb >= 0).all()
    col = comb.sum(-2)
    assert (col - 1).abs().max() < 1e-5, f"column sums off by {(col - 1).abs().max():.2e}"
    assert (comb.sum(-1) - 1).abs().max() < 0.1  # only approximately row-stochastic after 20 steps
    want = torch.tensor(naive_sinkhorn(logits[3].double().tolist(), 20, 1e-6), dtype=torch.float64)
    torch.testing.assert_close(comb[3].double(), want, rtol=1e-5, atol=1e-6)


def test_hc_mix_collapse_post_and_head_formulas():
    g = gen(2)
    B, T, hc, d = 2, 3, 4, 16
    x = torch.randn(B, T, hc, d, generator=g)
    fn = torch.randn(24, hc * d, generator=g) / 8
    scale, base = torch.rand(3, generator=g), torch.randn(24, generator=g)
    pre, post, logits = ops.hc_mix(x, fn, scale, base, 1e-6, 1e-6)
    v = x.flatten(-2).double()  # stream-major flatten
    mix = (v @ fn.double().T) / torch.sqrt(v.square().mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(pre.double(), torch.sigmoid(mix[..., :4] * scale[0] + base[:4]) + 1e-6)
    torch.testing.assert_close(post.double(), 2 * torch.sigmoid(mix[..., 4:8] * scale[1] + base[4:8]))
    torch.testing.assert_close(logits.double(), (mix[..., 8:] * scale[2] + base[8:]).view(B, T, 4, 4))
    u = ops.hc_collapse(x, pre)
    torch.testing.assert_close(u, sum(pre[..., j, None] * x[:, :, j] for j in range(hc)))
    comb = ops.sinkhorn(logits, 20, 1e-6)
    y = torch.randn(B, T, d, generator=g)
    out = ops.hc_post(y, x, post, comb)
    for k in range(hc):
        want = post[..., k, None] * y + sum(comb[..., j, k, None] * x[:, :, j] for j in range(hc))
        torch.testing.assert_close(out[:, :, k], want)
    # convexity: identical streams and y = 0 are reproduced exactly (columns of comb sum to 1)
    same = x[:, :, :1].expand(-1, -1, hc, -1)
    torch.testing.assert_close(ops.hc_post(torch.zeros_like(y), same, post, comb), same, rtol=1e-5, atol=1e-5)
    fnh, baseh, sch = torch.randn(hc, hc * d, generator=g), torch.randn(hc, generator=g), torch.rand(1, generator=g)
    mixh = (v @ fnh.double().T) / torch.sqrt(v.square().mean(-1, keepdim=True) + 1e-6)
    preh = torch.sigmoid(mixh * sch + baseh) + 1e-6
    torch.testing.assert_close(ops.hc_head(x, fnh, sch, baseh, 1e-6, 1e-6).double(),
                               (preh[..., None] * x.double()).sum(-2), rtol=1e-5, atol=1e-6)
    u2, post2, comb2 = ops.hc_pre(x, fn, scale, base, 1e-6, 1e-6, 20)
    assert torch.equal(u2, u) and torch.equal(post2, post) and torch.equal(comb2, comb)


# ------------------------------------------------------------------------------ rope, hadamard


def test_yarn_frequencies_of_the_real_config():
    base = rope_inv_freq(64, 160000.0, yarn=False)
    f = rope_inv_freq(64, 160000.0, yarn=True, factor=16, original_seq_len=65536, beta_fast=32, beta_slow=1)
    assert torch.equal(f[:16], base[:16])  # lo = 15: pairs 0..15 untouched
    torch.testing.assert_close(f[25:], base[25:] / 16)  # hi = 25: pairs 25..31 divided by 16
    mid = f[16:25] / base[16:25]
    assert ((mid < 1) & (mid > 1 / 16)).all()


def test_rope_interleaved_pairs_on_last_channels_and_inverse():
    inv = rope_inv_freq(4, 10000.0, yarn=False)
    x = torch.randn(1, 2, 6, generator=gen(3))
    pos = torch.tensor([[0, 7]])
    y = apply_rope_tail(x, pos, inv)
    assert torch.equal(y[..., :2], x[..., :2])  # nope channels untouched
    assert torch.equal(y[0, 0], x[0, 0])  # position 0: identity
    th = 7 * inv
    a, b = x[0, 1, 2::2], x[0, 1, 3::2]  # pairs (2, 3) and (4, 5)
    torch.testing.assert_close(y[0, 1, 2::2], a * torch.cos(th) - b * torch.sin(th))
    torch.testing.assert_close(y[0, 1, 3::2], a * torch.sin(th) + b * torch.cos(th))
    torch.testing.assert_close(apply_rope_tail(y, pos, inv, inverse=True), x, rtol=1e-6, atol=1e-6)


def test_hadamard_is_sylvester_order_and_orthonormal():
    h = torch.ones(1, 1)
    while h.shape[0] < 64:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    x = torch.randn(5, 64, generator=gen(4))
    torch.testing.assert_close(hadamard(x), x @ h.T / 8, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hadamard(hadamard(x)), x, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- window and ring


def test_window_indices_and_ring_write_against_a_position_log():
    W, D = 5, 3
    ring = torch.zeros(2, W, D)
    log: list[dict[int, torch.Tensor]] = [{}, {}]  # per sequence: position -> kv row
    starts = [0, 0]
    for b_T, T in enumerate([7, 1, 3, 1, 6]):
        kv = torch.randn(2, T, D, generator=gen(10 + b_T))
        s = torch.tensor(starts)
        idx = window_indices(s, T, W)
        buf = torch.cat((ring, kv), 1)
        for b in range(2):
            for t in range(T):
                p = starts[b] + t
                want = [q for q in range(p - W + 1, p + 1)]
                for w, q in enumerate(want):
                    if q < 0:
                        assert idx[b, t, w] == -1
                    else:
                        row = kv[b, q - starts[b]] if q >= starts[b] else log[b][q]
                        assert torch.equal(buf[b, idx[b, t, w]], row), (b, p, q)
        ops.ring_write(ring, kv, s)
        for b in range(2):
            for t in range(T):
                log[b][starts[b] + t] = kv[b, t]
        starts = [starts[0] + T, starts[1] + T]
        if b_T == 1:  # let the two sequences drift apart
            starts[1] = 0
            ring[1] = 0
            log[1] = {}


# ----------------------------------------------------------------------------------- compress


def naive_entries(kvp, gp, ape, norm_w, inv_freq, m, rotate, eps=1e-6):
    """Section 4.1 / 5 directly: one sequence [L, cD] from position 0 -> entries [L // m, D]."""
    L, CW = kvp.shape
    c = 2 if m == 4 else 1
    D = CW // c
    out = []
    for j in range(L // m):
        vals, logit = [], []
        for r in range(m):
            if c == 2:
                if j > 0:
                    t = m * (j - 1) + r
                    vals.append(kvp[t, :D]); logit.append(gp[t, :D] + ape[r, :D])
                else:
                    vals.append(torch.zeros(D)); logit.append(torch.full((D,), -math.inf))
        for r in range(m):
            t = m * j + r
            vals.append(kvp[t, D:] if c == 2 else kvp[t]); logit.append((gp[t] + ape[r])[D:] if c == 2 else gp[t] + ape[r])
        v, lg = torch.stack(vals).double(), torch.stack(logit).double()
        pooled = (v * torch.softmax(lg, 0)).sum(0).float()
        e = pooled * torch.rsqrt(pooled.double().square().mean() + eps).float() * norm_w
        e = apply_rope_tail(e.view(1, 1, D), torch.tensor([[m * j]]), inv_freq).view(D)
        if rotate:
            e = qf.fake_quant_fp4(hadamard(e), 32)
        else:
            nope = D - 2 * inv_freq.numel()
            e = torch.cat((qf.fake_quant_fp8(e[:nope], 64), e[nope:]))
        out.append(e)
    return torch.stack(out) if out else torch.zeros(0, D)


def run_compress(kvp, gp, ape, norm_w, inv, m, rotate, chunks, cap):
    B, L, CW = kvp.shape
    c = 2 if m == 4 else 1
    D = CW // c
    kv_state = torch.zeros(B, c * m, CW)
    sc_state = torch.full((B, c * m, CW), -math.inf)
    cache = torch.zeros(B, cap + 1, D)
    s = 0
    for T in chunks:
        ops.compress(kvp[:, s:s + T], gp[:, s:s + T], ape, norm_w, inv, torch.full((B,), s), kv_state, sc_state,
                     cache, m, 1e-6, rotate)
        s += T
    return cache, kv_state, sc_state


@pytest.mark.parametrize("m,D,rotate", [(4, 96, False), (16, 96, False), (4, 64, True)], ids=["csa", "hca", "indexer"])
def test_compress_any_chunking_equals_the_spec(m, D, rotate):
    g = gen(5)
    L, c = 45, 2 if m == 4 else 1
    kvp = torch.randn(1, L, c * D, generator=g)
    gp = torch.randn(1, L, c * D, generator=g)
    ape = torch.randn(m, c * D, generator=g)
    norm_w = 1 + 0.1 * torch.randn(D, generator=g)
    inv = rope_inv_freq(32, 160000.0, yarn=True, factor=16, original_seq_len=65536)
    cap = L // m + 2
    want = naive_entries(kvp[0], gp[0], ape, norm_w, inv, m, rotate)
    one, st1, sc1 = run_compress(kvp, gp, ape, norm_w, inv, m, rotate, [L], cap)
    n = L // m
    torch.testing.assert_close(one[0, :n], want, rtol=1e-6, atol=1e-6)
    assert not one[0, n:cap].any(), "an incomplete block was written"
    for chunks in ([7, 1, 1, 13, 23], [1] * L, [3, 42], [m - 1, 1, m, L - 2 * m]):
        got, st, sc = run_compress(kvp, gp, ape, norm_w, inv, m, rotate, chunks, cap)
        assert torch.equal(got[:, :cap], one[:, :cap]), f"chunks {chunks}: entries differ"
        assert torch.equal(st, st1) and torch.equal(sc, sc1), f"chunks {chunks}: state differs"


def test_compress_state_rows_hold_the_incomplete_block_and_the_previous_one():
    g = gen(6)
    m, D, L = 4, 8 * 12, 10  # block 2 = positions 8, 9 incomplete
    kvp, gp = torch.randn(1, L, 2 * D, generator=g), torch.randn(1, L, 2 * D, generator=g)
    ape = torch.randn(m, 2 * D, generator=g)
    inv = rope_inv_freq(32, 10000.0, yarn=False)
    _, st, sc = run_compress(kvp, gp, ape, torch.ones(D), inv, m, False, [L], 4)
    assert torch.equal(st[0, :4], kvp[0, 4:8]) and torch.equal(st[0, 4:6], kvp[0, 8:10])
    assert torch.equal(sc[0, 4:6], gp[0, 8:10] + ape[:2])
    assert not st[0, 6:].any() and (sc[0, 6:] == -math.inf).all()


def test_compress_per_sequence_start_positions():
    g = gen(7)
    m, D, L = 4, 96, 30
    kvp, gp = torch.randn(2, L, 2 * D, generator=g), torch.randn(2, L, 2 * D, generator=g)
    ape, inv = torch.randn(m, 2 * D, generator=g), rope_inv_freq(32, 10000.0, yarn=False)
    alone = [run_compress(kvp[b:b + 1], gp[b:b + 1], ape, torch.ones(D), inv, m, False, [L], 9) for b in range(2)]
    st = torch.zeros(2, 8, 2 * D)
    sc = torch.full((2, 8, 2 * D), -math.inf)
    cache = torch.zeros(2, 9, D)
    pre = (5, 11)  # sequence b first gets pre[b] tokens alone, then both continue together
    for b in range(2):
        s_, c_, k_ = st[b:b + 1].clone(), sc[b:b + 1].clone(), cache[b:b + 1].clone()
        ops.compress(kvp[b:b + 1, :pre[b]], gp[b:b + 1, :pre[b]], ape, torch.ones(D), inv, torch.tensor([0]),
                     s_, c_, k_, m, 1e-6, False)
        st[b], sc[b], cache[b] = s_[0], c_[0], k_[0]
    T = L - pre[1]
    joint_kv = torch.stack((kvp[0, pre[0]:pre[0] + T], kvp[1, pre[1]:]))
    joint_g = torch.stack((gp[0, pre[0]:pre[0] + T], gp[1, pre[1]:]))
    ops.compress(joint_kv, joint_g, ape, torch.ones(D), inv, torch.tensor(pre), st, sc, cache, m, 1e-6, False)
    n0 = (pre[0] + T) // m
    assert torch.equal(cache[0, :n0], alone[0][0][0, :n0])
    assert torch.equal(cache[1, :L // m], alone[1][0][0, :L // m])
    assert torch.equal(st[1], alone[1][1][0])


# ---------------------------------------------------------------------- indexer, top-k, attention


def test_indexer_scores_formula_and_causal_mask():
    g = gen(8)
    B, T, Hi, Di, N, m = 2, 5, 3, 8, 6, 4
    q, w = torch.randn(B, T, Hi, Di, generator=g), torch.randn(B, T, Hi, generator=g)
    k = torch.randn(B, N, Di, generator=g)
    pos = torch.tensor([[3, 4, 5, 6, 7], [10, 11, 12, 13, 14]])
    s = ops.indexer_scores(q, w, k, pos, m)
    for b in range(B):
        for t in range(T):
            for j in range(N):
                p = int(pos[b, t])
                if m * (j + 1) > p + 1:
                    assert s[b, t, j] == -math.inf
                else:
                    want = sum(float(w[b, t, h]) * max(0.0, float(q[b, t, h] @ k[b, j])) for h in range(Hi))
                    assert abs(float(s[b, t, j]) - want) < 1e-5 * max(1.0, abs(want))


def test_topk_select_masks_and_breaks_ties_by_lower_index():
    s = torch.tensor([[[0.0, 2.0, 0.0, -math.inf, 0.0, 1.0]]])
    assert ops.topk_select(s, 4).tolist() == [[[1, 5, 0, 2]]]
    s2 = torch.tensor([[[0.5, -math.inf, -math.inf]]])
    assert ops.topk_select(s2, 3).tolist() == [[[0, -1, -1]]]
    wide = torch.cat((s, torch.full((1, 1, 10), -math.inf)), -1)  # a larger cache never changes the picks
    assert ops.topk_select(wide, 4).tolist() == [[[1, 5, 0, 2]]]
    assert ops.topk_select(s, 4).dtype == torch.int32


def naive_attention(q, kv, idx, kv2, idx2, sink, scale):
    B, T, H, D = q.shape
    out = torch.zeros(B, T, H, D, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            rows = [kv[b, i] for i in idx[b, t].tolist() if i >= 0] + [kv2[b, i] for i in idx2[b, t].tolist() if i >= 0]
            if not rows:
                continue
            r = torch.stack(rows).double()
            for h in range(H):
                s = (r @ q[b, t, h].double()) * scale
                z = torch.exp(s - s.max()).sum() + torch.exp(sink[h].double() - s.max())
                out[b, t, h] = (torch.exp(s - s.max())[:, None] * r).sum(0) / z
    return out


def test_sparse_attention_one_softmax_with_sink_over_two_sources():
    g = gen(9)
    B, T, H, D, N, N2 = 2, 4, 3, 16, 7, 5
    q, kv, kv2 = torch.randn(B, T, H, D, generator=g), torch.randn(B, N, D, generator=g), torch.randn(B, N2, D, generator=g)
    idx = torch.randint(-1, N, (B, T, 5), generator=g, dtype=torch.int64).to(torch.int32)
    idx2 = torch.randint(-1, N2, (B, T, 3), generator=g, dtype=torch.int64).to(torch.int32)
    idx[1, 2] = -1
    idx2[1, 2] = -1  # a query with no valid index gets 0
    sink = torch.randn(H, generator=g)
    o = ops.sparse_attention(q, kv, idx, kv2, idx2, sink, D ** -0.5)
    want = naive_attention(q, kv, idx, kv2, idx2, sink, D ** -0.5)
    torch.testing.assert_close(o.double(), want, rtol=1e-5, atol=1e-6)
    assert not o[1, 2].any()
    perm = torch.randperm(5, generator=g)
    torch.testing.assert_close(ops.sparse_attention(q, kv, idx[..., perm], kv2, idx2, sink, D ** -0.5), o,
                               rtol=1e-6, atol=1e-6)
    empty = ops.sparse_attention(q, kv, idx, kv2[:, :0], idx2[..., :0], sink, D ** -0.5)
    torch.testing.assert_close(empty.double(), naive_attention(q, kv, idx, kv2, idx2[..., :0], sink, D ** -0.5),
                               rtol=1e-5, atol=1e-6)


def test_sparse_attention_bf16_rounds_probabilities_before_pv():
    g = gen(10)
    q = torch.randn(1, 2, 2, 8, generator=g).bfloat16()
    kv = torch.randn(1, 6, 8, generator=g).bfloat16()
    idx = torch.tensor([[[0, 1, 2, 3], [2, 3, 4, 5]]], dtype=torch.int32)
    e2 = torch.zeros(1, 2, 0, dtype=torch.int32)
    o = ops.sparse_attention(q, kv, idx, kv[:, :0], e2, torch.zeros(2), 8 ** -0.5)
    assert o.dtype == torch.bfloat16
    want = naive_attention(q.float(), kv.float(), idx, kv[:, :0].float(), e2, torch.zeros(2), 8 ** -0.5)
    torch.testing.assert_close(o.double(), want, rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------------------- MoE


def test_moe_route_hash_bias_and_weights():
    g = gen(11)
    N, d, E, k = 6, 32, 8, 2
    x, w = torch.randn(N, d, generator=g), torch.randn(E, d, generator=g)
    tokens = torch.tensor([0, 1, 2, 3, 4, 5])
    table = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(10)])
    scores = F.softplus(x.double() @ w.double().T).sqrt()
    wt, ids = ops.moe_route(x, w, torch.zeros(0), table, tokens, k, 1.5, True)
    assert torch.equal(ids, table[tokens])
    want = scores.gather(1, ids) / scores.gather(1, ids).sum(-1, keepdim=True) * 1.5
    torch.testing.assert_close(wt.double(), want)
    bias = torch.zeros(E)
    bias[5] = 100.0  # selection only: expert 5 always picked, weighted by its UNBIASED score
    wt, ids = ops.moe_route(x, w, bias, torch.zeros(0, k, dtype=torch.int64), tokens, k, 1.5, False)
    assert (ids == 5).any(-1).all()
    other = (scores + bias.double()).topk(k).indices
    assert torch.equal(ids.sort(-1).values, other.sort(-1).values)
    torch.testing.assert_close(wt.double(), scores.gather(1, ids) / scores.gather(1, ids).sum(-1, keepdim=True) * 1.5)
    torch.testing.assert_close(wt.sum(-1), torch.full((N,), 1.5))


@pytest.mark.parametrize("fmt", ["fp4", "fp8", "plain"])
def test_moe_experts_against_per_token_loop(fmt):
    g = gen(12)
    N, d, I, E, k, limit = 5, 256, 128, 4, 2, 1.0
    x = torch.randn(N, d, generator=g)
    w1, w3 = torch.randn(E, I, d, generator=g) / 16, torch.randn(E, I, d, generator=g) / 16
    w2 = torch.randn(E, d, I, generator=g) / 11
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
    wt = torch.rand(N, k, generator=g)
    if fmt == "fp4":
        enc = [qf.quant_fp4_block(w, 32) for w in (w1, w3, w2)]
        lin = qf.fp4_linear_reference
    elif fmt == "fp8":
        enc = [qf.quant_fp8_block(w, (128, 128), "fp32") for w in (w1, w3, w2)]
        lin = qf.fp8_linear_reference
    else:
        enc = [(w, torch.zeros(0)) for w in (w1, w3, w2)]
        lin = None
    (q1, s1), (q3, s3), (q2, s2) = enc
    y = ops.moe_experts(x, wt, ids, q1, s1, q3, s3, q2, s2, limit)
    want = torch.zeros(N, d)
    for n in range(N):
        for slot in range(k):
            e = int(ids[n, slot])
            f = (lambda v, q, s: lin(v, q[e], s[e])) if lin else (lambda v, q, s: v @ q[e].T)
            gte = f(x[n:n + 1], q1, s1).clamp(max=limit)
            up = f(x[n:n + 1], q3, s3).clamp(-limit, limit)
            h = F.silu(gte) * up * wt[n, slot]
            want[n] += f(h, q2, s2)[0]
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)


def test_fp8_linear_matches_the_formats_reference():
    g = gen(13)
    x = torch.randn(3, 5, 256, generator=g)
    wq, ws = qf.quant_fp8_block(torch.randn(200, 256, generator=g) / 16)
    torch.testing.assert_close(ops.fp8_linear(x, wq, ws), qf.fp8_linear_reference(x, wq, ws), rtol=1e-5, atol=1e-6)
    xb = x.bfloat16()
    torch.testing.assert_close(ops.fp8_linear(xb, wq, ws), qf.fp8_linear_reference(xb, wq, ws), rtol=1e-2, atol=1e-2)


# -------------------------------------------------------------------------- op registration


def _opcheck_cases():
    g = gen(14)
    B, T, H, D, hc, d = 1, 3, 2, 96, 4, 16
    x4 = torch.randn(B, T, hc, d, generator=g)
    fn, sc, base = torch.randn(24, hc * d, generator=g), torch.rand(3, generator=g), torch.randn(24, generator=g)
    q = torch.randn(B, T, H, D, generator=g)
    kv = torch.randn(B, 5, D, generator=g)
    idx = torch.tensor([[[0, 1], [1, -1], [2, 3]]], dtype=torch.int32)
    m, CW = 4, 2 * D
    wq, ws = qf.quant_fp8_block(torch.randn(128, 128, generator=g))
    return {
        "fp8_linear": (torch.randn(2, 128, generator=g), wq, ws),
        "rms_norm": (torch.randn(2, 8, generator=g), torch.rand(8, generator=g), 1e-6),
        "hc_mix": (x4, fn, sc, base, 1e-6, 1e-6),
        "sinkhorn": (torch.randn(B, T, 4, 4, generator=g), 20, 1e-6),
        "hc_collapse": (x4, torch.rand(B, T, hc, generator=g)),
        "hc_pre": (x4, fn, sc, base, 1e-6, 1e-6, 20),
        "hc_post": (torch.randn(B, T, d, generator=g), x4, torch.rand(B, T, hc, generator=g),
                    torch.rand(B, T, hc, hc, generator=g)),
        "hc_head": (x4, torch.randn(hc, hc * d, generator=g), torch.rand(1, generator=g), torch.randn(hc, generator=g),
                    1e-6, 1e-6),
        "compress": (torch.randn(B, T, CW, generator=g), torch.randn(B, T, CW, generator=g),
                     torch.randn(m, CW, generator=g), torch.ones(D), rope_inv_freq(32, 1e4, yarn=False),
                     torch.tensor([2]), torch.zeros(B, 2 * m, CW), torch.full((B, 2 * m, CW), -math.inf),
                     torch.zeros(B, 4, D), m, 1e-6, False),
        "compress_packed": (torch.randn(B, T, CW, generator=g), torch.randn(B, T, CW, generator=g),
                            torch.randn(m, CW, generator=g), torch.ones(D), rope_inv_freq(32, 1e4, yarn=False),
                            torch.tensor([2]), torch.zeros(B, 2 * m, CW), torch.full((B, 2 * m, CW), -math.inf),
                            torch.zeros(B, 4, D + 32, dtype=torch.uint8), torch.zeros(B, 4, 8, dtype=torch.uint8), m,
                            1e-6, False),
        "indexer_scores_fp4": (torch.randn(B, T, 2, 64, generator=g), torch.randn(B, T, 2, generator=g),
                               *pack_index_rows(qf.fake_quant_fp4(torch.randn(B, 4, 64, generator=g), 32)),
                               torch.tensor([[3, 4, 9]]), 4),
        "sparse_attention_fp8": (q.bfloat16(), *pack_kv_rows(kv, 32), idx, *pack_kv_rows(kv[:, :3], 32), idx,
                                 torch.randn(H, generator=g), 0.1),
        "indexer_scores": (torch.randn(B, T, 2, 8, generator=g), torch.randn(B, T, 2, generator=g),
                           torch.randn(B, 4, 8, generator=g), torch.tensor([[3, 4, 9]]), 4),
        "topk_select": (torch.randn(B, T, 6, generator=g), 3),
        "sparse_attention": (q, kv, idx, kv[:, :3], idx, torch.randn(H, generator=g), 0.1),
        "ring_write": (torch.zeros(B, 4, D), torch.randn(B, T, D, generator=g), torch.tensor([2])),
        "moe_route": (torch.randn(4, d, generator=g), torch.randn(8, d, generator=g), torch.randn(8, generator=g),
                      torch.zeros(0, 2, dtype=torch.int64), torch.arange(4), 2, 1.5, False),
        "moe_experts": (torch.randn(4, d, generator=g), torch.rand(4, 2, generator=g),
                        torch.tensor([[0, 1], [1, 2], [3, 0], [2, 3]]), torch.randn(4, 32, d, generator=g),
                        torch.zeros(0), torch.randn(4, 32, d, generator=g), torch.zeros(0),
                        torch.randn(4, d, 32, generator=g), torch.zeros(0), 10.0),
    }


def test_every_op_is_registered_with_a_consistent_schema_and_fake():
    cases = _opcheck_cases()
    assert set(cases) == set(BODIES), f"untested ops: {set(BODIES) ^ set(cases)}"
    for name, args in cases.items():
        # test_schema compares inputs with arithmetic that float8 does not support: fake-tensor check only there
        checks = ("test_faketensor",) if name == "fp8_linear" else ("test_schema", "test_faketensor")
        torch.library.opcheck(getattr(torch.ops.v4, name).default, args, test_utils=checks)

"""V4 primitive ops (DESIGN.md section 5): torch.library custom ops whose bodies are the reference math.

Each op is ONE node under torch.export; Triton kernels and the cpu target's aten decompositions implement
the same signatures and are tested against `BODIES[name]` (the plain-torch body, also callable directly
when autograd through the reference is wanted). Bodies avoid data-dependent Python control flow: positions
are tensors, blocks that complete are masked writes, top-k has a fixed k with -1 for masked picks.

Dimension letters: B batch, T tokens of this call, H query heads, D head width (K = V), R rope channels,
N / N2 rows of a KV source, K / K2 picks per query, W window, hc mHC streams, d hidden, E experts,
k experts per token, m compress ratio, c = 2 for the overlapping (ratio 4) compressor else 1.
Activation dtype ("act"): bfloat16 as deployed, float32 for exact tests; every "BF16 cast" of V4-SPEC
is a cast to the act dtype.

Op list (signatures in each docstring):
  fp8_linear, rms_norm                                   dense projections, norms
  hc_mix, sinkhorn, hc_collapse, hc_pre, hc_post, hc_head   mHC (section 7)
  compress                                               compressor state machine (sections 4.1, 4.2, 5, 6)
  compress_packed, indexer_scores_fp4, sparse_attention_fp8   the same over production-layout caches
                                                         (model/packed_ops.py, registered on import)
  indexer_scores, topk_select                            lightning indexer (section 4.3)
  sparse_attention, ring_write                           one-softmax attention over two KV sources (3.4)
  moe_route, moe_experts                                 MoE (section 8)
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from v4compile.model.numerics import acc_dtype, fn_acc, linear_acc, rsqrt_mean_square
from v4compile.model.rope import apply_rope_tail
from v4compile.quant import formats as qf

BODIES: dict[str, Callable] = {}
"""Op name (without namespace) -> plain-torch reference body (differentiable where the math is)."""

_CHUNK_ELEMS = 1 << 26  # bound on gathered/score elements per query chunk (256 MiB of fp32)


def _v4op(name: str, mutates_args: tuple[str, ...] = ()):
    """Register `fn` as torch.ops.v4.<name> and remember its body; returns the registered op."""

    def wrap(fn: Callable):
        BODIES[name] = fn
        return torch.library.custom_op(f"v4::{name}", mutates_args=mutates_args)(fn)

    return wrap


# ============================================================================ numerics helpers


def fp8_act_dequant(x: Tensor, block: int = 128) -> Tensor:
    """Per-row FP8 activation quantisation (power-of-two scales per `block` channels), dequantised: float32.

    Equals quant_fp8_act's e4m3 values times their scales: the same scale rule and rounding as
    fake_quant_fp8, whose result (e4m3 x 2^k) is exact in any activation dtype.
    """
    return qf.fake_quant_fp8(x, block).float()


# ============================================================================ plain helpers


def hadamard(x: Tensor) -> Tensor:
    """Walsh-Hadamard transform (Sylvester order) of the last dim (a power of two), scale 1/sqrt(n); x.dtype."""
    n = x.shape[-1]
    assert n & (n - 1) == 0, f"hadamard needs a power-of-two width, got {n}"
    y = x.float()
    h = 1
    while h < n:
        y = y.unflatten(-1, (n // (2 * h), 2, h))
        y = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2).flatten(-3)
        h *= 2
    return (y * (n ** -0.5)).to(x.dtype)


def positions_of(start_pos: Tensor, T: int) -> Tensor:
    """start_pos [B] -> absolute positions [B, T] (int64)."""
    return start_pos.to(torch.int64).unsqueeze(1) + torch.arange(T, device=start_pos.device)


def window_indices(start_pos: Tensor, T: int, window: int) -> Tensor:
    """int32 [B, T, W]: for query p, slots of cat(ring [W], chunk [T]) holding positions p-W+1 .. p, -1 if < 0.

    A position t >= start_pos lies in the chunk (slot W + t - start_pos), an older one in ring slot t mod W.
    """
    s = start_pos.to(torch.int64).view(-1, 1, 1)
    t = positions_of(start_pos, T).unsqueeze(-1) - (window - 1) + torch.arange(window, device=start_pos.device)
    slot = torch.where(t >= s, window + t - s, torch.remainder(t, window))
    return torch.where(t >= 0, slot, -1).to(torch.int32)


def visible_block_indices(positions: Tensor, n_blocks: int, ratio: int) -> Tensor:
    """int32 [B, T, n_blocks]: j where block j is complete for the query (m (j+1) <= p+1), else -1 (HCA picks)."""
    j = torch.arange(n_blocks, device=positions.device)
    ok = j < torch.div(positions + 1, ratio, rounding_mode="floor").unsqueeze(-1)
    return torch.where(ok, j, -1).to(torch.int32)


def _rms(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    y = x.float() * rsqrt_mean_square(x, eps, x.dtype)
    if weight is not None:
        y = weight.float() * y
    return y.to(x.dtype)


# ============================================================================ dense


@_v4op("fp8_linear")
def fp8_linear(x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
    """x [..., K] act, weight e4m3 [O, K], scale [ceil(O/128), ceil(K/128)] e8m0 or f32 -> y [..., O] act.

    The activation is FP8-quantised per row in blocks of 128 (power-of-two scales), products accumulate
    in fp32 (fp64 with fp32 activations, see acc_dtype); equals quant.formats.fp8_linear_reference up to
    summation order. Plain float weights do not use this op (the model's Linear calls linear_acc).
    """
    w = qf.dequant_fp8_block(weight, scale, block=(128, 128))
    return linear_acc(fp8_act_dequant(x), w, x.dtype).to(x.dtype)


@fp8_linear.register_fake
def _(x, weight, scale):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@_v4op("rms_norm")
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim: weight * x * rsqrt(mean(x^2) + eps) computed in fp32, cast to x.dtype."""
    return _rms(x, weight, eps)


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


# ============================================================================ mHC (section 7)


def _hc_mixes(x: Tensor, fn: Tensor, norm_eps: float) -> Tensor:
    v = x.flatten(-2).float()  # [..., hc*d], stream-major
    return linear_acc(v, fn, x.dtype) * rsqrt_mean_square(v, norm_eps, x.dtype)


@_v4op("hc_mix")
def hc_mix(x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, norm_eps: float,
           hc_eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """x [..., hc, d], fn f32 [(2+hc) hc, hc d], scale f32 [3], base f32 [(2+hc) hc] ->
    (pre f32 [..., hc], post f32 [..., hc], comb_logits f32 [..., hc, hc]) (section 7.2 before Sinkhorn)."""
    hc = x.shape[-2]
    mix = _hc_mixes(x, fn, norm_eps)
    pre = fn_acc(torch.sigmoid, mix[..., :hc] * scale[0] + base[:hc], x.dtype) + hc_eps
    post = 2 * fn_acc(torch.sigmoid, mix[..., hc:2 * hc] * scale[1] + base[hc:2 * hc], x.dtype)
    comb = (mix[..., 2 * hc:] * scale[2] + base[2 * hc:]).unflatten(-1, (hc, hc))
    return pre, post, comb


@hc_mix.register_fake
def _(x, fn, scale, base, norm_eps, hc_eps):
    hc = x.shape[-2]
    lead = x.shape[:-2]
    f = torch.float32
    return x.new_empty(*lead, hc, dtype=f), x.new_empty(*lead, hc, dtype=f), x.new_empty(*lead, hc, hc, dtype=f)


@_v4op("sinkhorn")
def sinkhorn(logits: Tensor, iters: int, eps: float) -> Tensor:
    """logits f32 [..., hc(j), hc(k)] -> comb f32, column sums (over j) 1: row softmax + eps, then
    column / row normalisations in section 7.2's order (`iters` column steps, iters-1 row steps).
    Plain fp32 in every mode: 4x4 per token, no shape-dependent reduction order."""
    m = torch.softmax(logits.float(), dim=-1) + eps
    m = m / (m.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(-1, keepdim=True) + eps)
        m = m / (m.sum(-2, keepdim=True) + eps)
    return m


@sinkhorn.register_fake
def _(logits, iters, eps):
    return torch.empty_like(logits, dtype=torch.float32)


@_v4op("hc_collapse")
def hc_collapse(x: Tensor, pre: Tensor) -> Tensor:
    """x [..., hc, d] act, pre f32 [..., hc] -> u [..., d] = sum_j pre_j x_j in fp32, cast to x.dtype."""
    acc = acc_dtype(x.dtype)
    return (pre.to(acc).unsqueeze(-1) * x.to(acc)).sum(-2).to(x.dtype)


@hc_collapse.register_fake
def _(x, pre):
    return x.new_empty(*x.shape[:-2], x.shape[-1])


@_v4op("hc_pre")
def hc_pre(x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, norm_eps: float, hc_eps: float,
           iters: int) -> tuple[Tensor, Tensor, Tensor]:
    """hc_mix -> sinkhorn -> hc_collapse in one op: x [..., hc, d] -> (u [..., d] act, post f32 [..., hc],
    comb f32 [..., hc, hc]); the form the fuse_mhc pass produces."""
    pre, post, logits = BODIES["hc_mix"](x, fn, scale, base, norm_eps, hc_eps)
    comb = BODIES["sinkhorn"](logits, iters, hc_eps)
    return BODIES["hc_collapse"](x, pre), post, comb


@hc_pre.register_fake
def _(x, fn, scale, base, norm_eps, hc_eps, iters):
    hc, lead, f = x.shape[-2], x.shape[:-2], torch.float32
    return x.new_empty(*lead, x.shape[-1]), x.new_empty(*lead, hc, dtype=f), x.new_empty(*lead, hc, hc, dtype=f)


@_v4op("hc_post")
def hc_post(y: Tensor, x: Tensor, post: Tensor, comb: Tensor) -> Tensor:
    """y [..., d] sublayer output, x [..., hc, d] streams, post f32 [..., hc], comb f32 [..., hc(j), hc(k)] ->
    x' [..., hc, d] (y.dtype): x'_k = post_k y + sum_j comb[j, k] x_j, in fp32 (section 7.3)."""
    acc = acc_dtype(y.dtype)
    mixed = (comb.to(acc).unsqueeze(-1) * x.to(acc).unsqueeze(-2)).sum(-3)  # [..., k, d]
    return (post.to(acc).unsqueeze(-1) * y.to(acc).unsqueeze(-2) + mixed).to(y.dtype)


@hc_post.register_fake
def _(y, x, post, comb):
    return torch.empty_like(x, dtype=y.dtype)


@_v4op("hc_head")
def hc_head(x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, norm_eps: float, hc_eps: float) -> Tensor:
    """x [..., hc, d] act, fn f32 [hc, hc d], scale f32 [1], base f32 [hc] -> y [..., d] act (section 7.4)."""
    pre = fn_acc(torch.sigmoid, _hc_mixes(x, fn, norm_eps) * scale + base, x.dtype) + hc_eps
    return BODIES["hc_collapse"](x, pre)


@hc_head.register_fake
def _(x, fn, scale, base, norm_eps, hc_eps):
    return x.new_empty(*x.shape[:-2], x.shape[-1])


# ============================================================================ compressor (sections 4.1, 4.2, 5, 6)


def _locate(t: Tensor, s: Tensor, T: int, m: int, lag: int) -> tuple[Tensor, Tensor]:
    """Absolute positions t [B, X] -> (row in cat(state rows, chunk [T]), valid) for a call starting at s [B].

    The state holds positions q0 - lag .. q0 + m - 1 at rows 0 .. lag + m - 1 (q0 = s - s mod m starts the
    incomplete block; lag = m for CSA, whose rows 0..m-1 keep the previous block, 0 for HCA); chunk token
    t >= s is row lag + m + t - s. Positions before 0 or past the call's end are invalid.
    """
    s1 = s.unsqueeze(1)
    S = lag + m
    q0 = s1 - torch.remainder(s1, m)
    row = torch.where(t >= s1, S + t - s1, t - q0 + lag)
    valid = (t >= 0) & (t < s1 + T) & (row >= 0)
    return row.clamp(0, S + T - 1), valid


def _gather_rows(src: Tensor, rows: Tensor) -> Tensor:
    """src [B, L, C], rows [B, X] -> [B, X, C]."""
    return torch.gather(src, 1, rows.unsqueeze(-1).expand(-1, -1, src.shape[-1]))


def compress_core(kv_proj: Tensor, gate_proj: Tensor, ape: Tensor, norm_weight: Tensor, inv_freq: Tensor,
                  start_pos: Tensor, kv_state: Tensor, score_state: Tensor, n_rows: int, act: torch.dtype,
                  ratio: int, norm_eps: float, rotate: bool) -> tuple[Tensor, Tensor]:
    """What every compress variant shares: advance the state (kv_state / score_state updated in place) and
    return the candidate entries (act [B, J, D], fake-quantised) with their cache rows (int64 [B, J]: j for a
    block that completes in this chunk and fits, else n_rows - 1, the scratch row). See v4::compress."""
    B, T, CW = kv_proj.shape
    m = ratio
    c = 2 if m == 4 else 1
    D = CW // c
    S = c * m
    lag = (c - 1) * m
    dev = kv_proj.device
    s = start_pos.to(torch.int64)
    pos = positions_of(s, T)
    ext_kv = torch.cat((kv_state, kv_proj.float()), 1)  # [B, S + T, c D]
    ext_sc = torch.cat((score_state, gate_proj.float() + ape[torch.remainder(pos, m)]), 1)

    # Candidate blocks: those that may complete in this chunk, j = s // m + i, i < T // m + 1.
    J = T // m + 1
    j = torch.div(s, m, rounding_mode="floor").unsqueeze(1) + torch.arange(J, device=dev)  # [B, J]
    complete = m * (j + 1) <= (s + T).unsqueeze(1)
    r = torch.arange(m, device=dev)
    cur_t = (m * j).unsqueeze(-1) + r  # [B, J, m]
    rows, ok = _locate(cur_t.flatten(1), s, T, m, lag)
    half = slice(D, 2 * D) if c == 2 else slice(0, D)  # current block: B halves (CSA) or all channels
    kv_slots = torch.where(ok.unsqueeze(-1), _gather_rows(ext_kv, rows)[..., half], 0.0)
    sc_slots = torch.where(ok.unsqueeze(-1), _gather_rows(ext_sc, rows)[..., half], -math.inf)
    if c == 2:  # previous block's A halves in slots 0..m-1
        prows, pok = _locate((cur_t - m).flatten(1), s, T, m, lag)
        pkv = torch.where(pok.unsqueeze(-1), _gather_rows(ext_kv, prows)[..., :D], 0.0)
        psc = torch.where(pok.unsqueeze(-1), _gather_rows(ext_sc, prows)[..., :D], -math.inf)
        kv_slots = torch.cat((pkv.unflatten(1, (J, m)), kv_slots.unflatten(1, (J, m))), 2)
        sc_slots = torch.cat((psc.unflatten(1, (J, m)), sc_slots.unflatten(1, (J, m))), 2)
    else:
        kv_slots, sc_slots = kv_slots.unflatten(1, (J, m)), sc_slots.unflatten(1, (J, m))
    sc_slots = torch.where(complete[..., None, None], sc_slots, 0.0)  # incomplete: finite garbage, never kept
    acc = acc_dtype(act)
    pooled = (kv_slots.to(acc) * torch.softmax(sc_slots.to(acc), dim=2)).sum(2).float()  # [B, J, D]

    entry = _rms(pooled.to(act), norm_weight, norm_eps)
    entry = apply_rope_tail(entry, m * j, inv_freq)
    if rotate:
        entry = qf.fake_quant_fp4(hadamard(entry), 32)
    else:
        nope = D - 2 * inv_freq.shape[-1]
        entry = torch.cat((qf.fake_quant_fp8(entry[..., :nope], 64), entry[..., nope:]), -1)
    spare = n_rows - 1
    target = torch.where(complete & (j < spare), j, spare)

    # New state: rows for positions [q0' - lag, q0' - lag + S) of the call's end e (q0' = e - e mod m).
    e = s + T
    t_new = (e - torch.remainder(e, m) - lag).unsqueeze(1) + torch.arange(S, device=dev)
    rows, ok = _locate(t_new, s, T, m, lag)
    ok = ok.unsqueeze(-1)
    new_kv = torch.where(ok, _gather_rows(ext_kv, rows), 0.0)
    new_sc = torch.where(ok, _gather_rows(ext_sc, rows), -math.inf)
    kv_state.copy_(new_kv)
    score_state.copy_(new_sc)
    return entry.to(act), target


def scatter_rows(cache: Tensor, target: Tensor, rows: Tensor) -> None:
    """cache [B, N, C] (mutated) row target[b, j] <- rows[b, j] (int64 target [B, J], rows [B, J, C])."""
    cache.scatter_(1, target.unsqueeze(-1).expand(-1, -1, cache.shape[-1]), rows.to(cache.dtype))


@_v4op("compress", mutates_args=("kv_state", "score_state", "cache"))
def compress(kv_proj: Tensor, gate_proj: Tensor, ape: Tensor, norm_weight: Tensor, inv_freq: Tensor,
             start_pos: Tensor, kv_state: Tensor, score_state: Tensor, cache: Tensor, ratio: int,
             norm_eps: float, rotate: bool) -> None:
    """Advance one compressor over a chunk; writes every block that completes in it to `cache`.

    kv_proj, gate_proj f32 [B, T, c D] (x W^T of this chunk, no ape), ape f32 [m, c D], norm_weight [D],
    inv_freq f32 [R/2], start_pos int [B] (position of the chunk's first token, per sequence),
    kv_state / score_state f32 [B, c m, c D] (mutated; rows of absent tokens hold kv 0 and score -inf, as
    Cache.allocate and reset leave them and every call keeps them: the GPU kernel rewrites only rows that change),
    cache act [B, n_blocks + 1, D] (mutated; the LAST row is scratch that absorbs masked writes),
    ratio m (4 = overlapping CSA: c = 2), rotate: indexer variant (Hadamard + FP4 instead of FP8 nope).

    Block j pools tokens m j .. m j + m - 1 (CSA: plus the A halves of block j-1) with a per-channel
    softmax over the slots of (ape-biased) gate logits; then act cast, RMSNorm, RoPE at position m j,
    and FP8 fake-quant of the first D-R channels (or Hadamard + FP4 fake-quant of all D). State rows hold
    the tokens of the incomplete block (CSA: rows m..2m-1, rows 0..m-1 the previous complete block).
    """
    entry, target = compress_core(kv_proj, gate_proj, ape, norm_weight, inv_freq, start_pos, kv_state, score_state,
                                  cache.shape[1], cache.dtype, ratio, norm_eps, rotate)
    scatter_rows(cache, target, entry)


@compress.register_fake
def _(kv_proj, gate_proj, ape, norm_weight, inv_freq, start_pos, kv_state, score_state, cache, ratio,
      norm_eps, rotate):
    return None


# ============================================================================ indexer (section 4.3)


def _query_chunks(T: int, per_query: int) -> list[tuple[int, int]]:
    """Split T queries into chunks of at most _CHUNK_ELEMS / per_query (bounds gathered / score memory)."""
    step = max(1, _CHUNK_ELEMS // max(per_query, 1))
    return [(t0, min(T, t0 + step)) for t0 in range(0, max(T, 1), step)]


@_v4op("indexer_scores")
def indexer_scores(q: Tensor, weights: Tensor, k_cache: Tensor, positions: Tensor, ratio: int) -> Tensor:
    """q [B, T, Hi, Di] act, weights [B, T, Hi] act (already x Di^-1/2 Hi^-1/2), k_cache [B, N, Di],
    positions int [B, T] -> scores f32 [B, T, N] = sum_h w_h relu(q_h . k_j), accumulated in fp32 (fp64);
    -inf where block j is not complete for the query (j >= (p+1) // ratio)."""
    B, T, Hi, Di = q.shape
    N = k_cache.shape[1]
    acc = acc_dtype(q.dtype)
    kf = k_cache.to(acc)
    parts = []
    for t0, t1 in _query_chunks(T, Hi * N):
        dots = torch.einsum("bthd,bnd->bthn", q[:, t0:t1].to(acc), kf).relu()
        parts.append((dots * weights[:, t0:t1].to(acc).unsqueeze(-1)).sum(2).float())
    scores = torch.cat(parts, 1) if len(parts) != 1 else parts[0]
    limit = torch.div(positions.to(torch.int64) + 1, ratio, rounding_mode="floor").unsqueeze(-1)
    return scores.masked_fill(torch.arange(N, device=q.device) >= limit, -math.inf)


@indexer_scores.register_fake
def _(q, weights, k_cache, positions, ratio):
    return q.new_empty(q.shape[0], q.shape[1], k_cache.shape[1], dtype=torch.float32)


def topk_lowest_first(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, indices) of the k largest along the last dim, in descending order, EQUAL scores ordered by
    ascending index. Deterministic: appending -inf columns (a larger cache) never changes the picks, which
    matters because relu-based indexer scores tie exactly at 0 (torch.topk's tie order is unspecified)."""
    vals, idx = torch.sort(scores, dim=-1, descending=True, stable=True)
    return vals[..., :k].contiguous(), idx[..., :k].contiguous()


@_v4op("topk_select")
def topk_select(scores: Tensor, k: int) -> Tensor:
    """scores f32 [B, T, N] -> int32 [B, T, k] indices of the k largest (k <= N fixed), -1 where the pick is -inf.
    Ties go to the lower index (topk_lowest_first); picks are in descending score order."""
    vals, idx = topk_lowest_first(scores, k)
    return torch.where(vals == -math.inf, -1, idx).to(torch.int32)


@topk_select.register_fake
def _(scores, k):
    return scores.new_empty(*scores.shape[:-1], k, dtype=torch.int32)


# ============================================================================ attention (section 3.4)


def _gather_kv(kv: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """kv [B, N, D], idx [B, Tc, K] (-1 = none) -> (rows [B, Tc, K, D], valid [B, Tc, K])."""
    B, Tc, K = idx.shape
    valid = idx >= 0
    if kv.shape[1] == 0 or K == 0:
        return kv.new_zeros(B, Tc, K, kv.shape[-1]), valid & False
    safe = idx.to(torch.int64).clamp(0, kv.shape[1] - 1).flatten(1)
    return _gather_rows(kv, safe).unflatten(1, (Tc, K)), valid


@_v4op("sparse_attention")
def sparse_attention(q: Tensor, kv: Tensor, idx: Tensor, kv2: Tensor, idx2: Tensor, sink: Tensor,
                     scale: float) -> Tensor:
    """q [B, T, H, D] act; kv [B, N, D] with picks idx int32 [B, T, K]; kv2 [B, N2, D] with picks idx2 int32
    [B, T, K2] (N2 = K2 = 0 allowed); sink f32 [H] -> o [B, T, H, D] act.

    One softmax per (query, head) over the picked rows of both sources plus the sink logit (zero value);
    -1 picks contribute nothing; a query with no valid pick gets 0. Scores q.k * scale in fp32,
    probabilities rounded to q.dtype before P.V, fp32 accumulation (fp64 with fp32 q, see acc_dtype),
    V4-SPEC section 3.4; value = key. The order of picks does not matter beyond fp rounding.
    """
    B, T, H, D = q.shape
    K = idx.shape[-1] + idx2.shape[-1]
    acc = acc_dtype(q.dtype)
    out = []
    for t0, t1 in _query_chunks(T, K * max(D, H)):
        r1, v1 = _gather_kv(kv, idx[:, t0:t1])
        r2, v2 = _gather_kv(kv2, idx2[:, t0:t1])
        rows = torch.cat((r1, r2), 2).to(acc)  # [B, Tc, K, D]
        valid = torch.cat((v1, v2), 2).unsqueeze(2)  # [B, Tc, 1, K]
        s = torch.einsum("bthd,btkd->bthk", q[:, t0:t1].to(acc), rows).float() * scale
        s = s.masked_fill(~valid, -math.inf)
        mx = s.amax(-1, keepdim=True)
        mx = torch.where(mx == -math.inf, 0.0, mx)
        p = fn_acc(torch.exp, s - mx, q.dtype)
        z = p.to(acc).sum(-1, keepdim=True).float() + fn_acc(torch.exp, sink.float().view(1, 1, H, 1) - mx, q.dtype)
        o = torch.einsum("bthk,btkd->bthd", p.to(q.dtype).to(acc), rows).float() / z
        out.append(torch.where(valid.any(-1, keepdim=True), o, 0.0).to(q.dtype))
    return torch.cat(out, 1) if len(out) != 1 else out[0]


@sparse_attention.register_fake
def _(q, kv, idx, kv2, idx2, sink, scale):
    return torch.empty_like(q)


@_v4op("ring_write", mutates_args=("ring",))
def ring_write(ring: Tensor, kv: Tensor, start_pos: Tensor) -> None:
    """ring [B, W, D] (mutated), kv [B, T, D] of positions start_pos .. start_pos+T-1 -> ring slot p mod W
    holds the newest position p < start_pos + T with that residue (older slots keep their entry)."""
    B, W, D = ring.shape
    T = kv.shape[1]
    s = start_pos.to(torch.int64).unsqueeze(1)
    last = s + T - 1
    i = torch.arange(W, device=ring.device)
    t = last - torch.remainder(last - i, W)  # newest position with t mod W == i, [B, W]
    fresh = t >= s
    rows = _gather_rows(kv, (t - s).clamp(0, max(T - 1, 0)))
    ring.copy_(torch.where(fresh.unsqueeze(-1), rows.to(ring.dtype), ring))


@ring_write.register_fake
def _(ring, kv, start_pos):
    return None


# ============================================================================ MoE (section 8)


@_v4op("moe_route")
def moe_route(x: Tensor, gate_w: Tensor, bias: Tensor, tid2eid: Tensor, token_ids: Tensor, topk: int,
              route_scale: float, hash: bool) -> tuple[Tensor, Tensor]:
    """x [N, d] act, gate_w [E, d], bias f32 [E] or [0], tid2eid int [V, k] or [0, k], token_ids int [N] ->
    (weights f32 [N, k], ids int64 [N, k]). Score sqrt(softplus(x W^T)) in fp32; experts from the hash
    table or top-k of score + bias (bias selects only); weights = unbiased scores renormalised x route_scale."""
    scores = fn_acc(F.softplus, linear_acc(x, gate_w, x.dtype), x.dtype).sqrt()
    if hash:
        ids = tid2eid[token_ids.to(torch.int64)].to(torch.int64)
    else:
        biased = scores + bias.float() if bias.numel() else scores
        ids = topk_lowest_first(biased, topk)[1]  # ties (improbable) to the lower expert id
    w = scores.gather(1, ids)
    return w / w.sum(-1, keepdim=True) * route_scale, ids


@moe_route.register_fake
def _(x, gate_w, bias, tid2eid, token_ids, topk, route_scale, hash):
    return x.new_empty(x.shape[0], topk, dtype=torch.float32), x.new_empty(x.shape[0], topk, dtype=torch.int64)


def _expert_input(x: Tensor, w: Tensor) -> Tensor:
    """The matmul input of an expert projection: FP8-quantised rows for FP4 / FP8 weights, else x."""
    return fp8_act_dequant(x) if w.dtype in (torch.int8, torch.float8_e4m3fn) else x


def _expert_mm(xin: Tensor, w: Tensor, s: Tensor, act: torch.dtype) -> Tensor:
    if w.dtype == torch.int8:  # same formulation as quant.formats.fp4_linear_reference, acc_dtype accumulation
        w = qf.dequant_fp4_block(w, s, block=32)
    elif w.dtype == torch.float8_e4m3fn:  # 128x128 scales, or the finer blocks of an exact MXFP4 repack
        w = qf.dequant_fp8_block(w, s)
    return linear_acc(xin, w, act).to(act)


def expert_linear(x: Tensor, w: Tensor, s: Tensor) -> Tensor:
    """One expert projection by storage: int8 packed FP4 (per-32 e8m0), e4m3 (128x128 scales), or float."""
    return _expert_mm(_expert_input(x, w), w, s, x.dtype)


def _at(scale: Tensor, e: int) -> Tensor:
    return scale[e] if scale.dim() > 1 else scale  # plain-float experts pass an empty scale


def swiglu(gate: Tensor, up: Tensor, limit: float) -> Tensor:
    """silu(min(gate, limit)) * clamp(up, -limit, limit) in fp32 (limit 0 disables the clamp)."""
    g, u = gate.float(), up.float()
    if limit > 0:
        u = u.clamp(-limit, limit)
        g = g.clamp(max=limit)
    return fn_acc(F.silu, g, gate.dtype) * u


@_v4op("moe_experts")
def moe_experts(x: Tensor, weights: Tensor, ids: Tensor, w1: Tensor, s1: Tensor, w3: Tensor, s3: Tensor,
                w2: Tensor, s2: Tensor, swiglu_limit: float) -> Tensor:
    """x [N, d] act, weights f32 [N, k], ids int [N, k]; stacked experts w1/w3 [E, I, d(/2)], w2 [E, d, I(/2)]
    with scales (int8 = packed FP4 + e8m0 per-32; e4m3 = 128x128 e8m0/f32; float = plain, scales ignored)
    -> y f32 [N, d] = sum over picks of expert_e(x) (each output rounded to x.dtype), the routing weight
    applied to h before w2 in fp32; gate/up rounded to x.dtype before the clamp (section 8.2, 14.3).
    The shared expert is NOT included (the model adds it)."""
    N, d = x.shape
    y = torch.zeros(N, d, dtype=torch.float32, device=x.device)
    xin = _expert_input(x, w1)  # activation quantisation is per row: once for every expert
    for e in range(w1.shape[0]):  # ascending expert order, as the reference accumulates
        tok, slot = torch.where(ids == e)
        if tok.numel() == 0:
            continue
        xe = xin.index_select(0, tok)
        h = swiglu(_expert_mm(xe, w1[e], _at(s1, e), x.dtype), _expert_mm(xe, w3[e], _at(s3, e), x.dtype),
                   swiglu_limit)
        h = h * weights[tok, slot].unsqueeze(-1).float()
        y.index_add_(0, tok, expert_linear(h.to(x.dtype), w2[e], _at(s2, e)).float())
    return y


@moe_experts.register_fake
def _(x, weights, ids, w1, s1, w3, s3, w2, s2, swiglu_limit):
    return x.new_empty(x.shape[0], x.shape[1], dtype=torch.float32)


from v4compile.model import packed_ops  # noqa: E402,F401 - registers the production-layout ops into BODIES

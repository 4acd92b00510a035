"""v4triton::indexer_scores / topk_select / indexer_topk against the v4:: reference ops (TRITON_INTERPRET on CPU).

Top-k sets are compared with ties explained: the kernel takes every score strictly above the k-th largest and
the LOWEST-index entries among those equal to it; torch.topk (the reference) takes some tie entries in an
unspecified order. `_check_topk` therefore demands: same number of picks, identical strictly-greater sets,
and tie picks that all carry exactly the k-th largest score; it also checks the documented output order.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math

import pytest
import torch

from v4compile.model import ops as v4ops  # noqa: F401  (registers torch.ops.v4.*)
from v4compile.plugins.triton import indexer_topk as it
from v4compile.plugins.triton import launch
from v4compile.validate import assert_kernel_close

REF_SCORES = v4ops.BODIES["indexer_scores"]
REF_TOPK = v4ops.BODIES["topk_select"]


def _inputs(B, T, Hi, Di, N, dtype, seed=0, pos_max=None, ratio=4):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hi, Di, generator=g).to(dtype)
    w = (torch.randn(B, T, Hi, generator=g) * (Hi * Di) ** -0.5).to(dtype)
    kc = torch.randn(B, N, Di, generator=g).to(dtype)
    hi = pos_max if pos_max is not None else ratio * N + 3
    pos = torch.randint(0, hi, (B, T), generator=g)
    return q, w, kc, pos


def _expected_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The kernel's documented pick and order: > k-th largest ascending, then lowest-index ties, then -1."""
    N = scores.shape[-1]
    flat = scores.reshape(-1, N).double()
    out = torch.full((flat.shape[0], k), -1, dtype=torch.int32)
    for r in range(flat.shape[0]):
        s = flat[r]
        vis = torch.nonzero(s != -math.inf).flatten()
        if vis.numel() < k:  # fewer than k visible: all of them, ascending
            out[r, : vis.numel()] = vis.to(torch.int32)
            continue
        kth = torch.sort(s[vis], descending=True).values[k - 1]
        gt = torch.nonzero(s > kth).flatten()
        eq = torch.nonzero(s == kth).flatten()[: k - gt.numel()]
        out[r] = torch.cat((gt, eq)).to(torch.int32)
    return out.reshape(*scores.shape[:-1], k)


def _check_topk(idx: torch.Tensor, scores: torch.Tensor, ref_idx: torch.Tensor, what: str) -> None:
    """Exact order/pick per the module rule, and set agreement with the reference up to exact ties."""
    exp = _expected_topk(scores, idx.shape[-1])
    bad = (idx != exp).nonzero()
    if bad.numel():
        c = bad[0].tolist()
        raise AssertionError(f"{what}: {bad.shape[0]} picks differ from the documented rule, first at {c}: "
                             f"{idx[tuple(c)].item()} vs {exp[tuple(c)].item()}")
    N = scores.shape[-1]
    flat_s = scores.reshape(-1, N)
    for r, (a, b) in enumerate(zip(idx.reshape(-1, idx.shape[-1]), ref_idx.reshape(-1, idx.shape[-1]))):
        sa, sb = set(a[a >= 0].tolist()), set(b[b >= 0].tolist())
        assert len(sa) == len(sb), f"{what} row {r}: {len(sa)} picks vs reference {len(sb)}"
        if sa != sb:  # only exact ties with the k-th largest may differ
            kth = min(flat_s[r, list(sb)].tolist())
            diff = [flat_s[r, j].item() for j in sa ^ sb]
            assert all(v == kth for v in diff), f"{what} row {r}: sets differ beyond ties: {diff} vs k-th {kth}"


@pytest.mark.parametrize("B,T,Hi,Di,N", [(1, 1, 64, 128, 129), (2, 3, 4, 64, 127), (3, 1, 8, 16, 1), (1, 5, 2, 32, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_indexer_scores_matches_reference(B, T, Hi, Di, N, dtype):
    q, w, kc, pos = _inputs(B, T, Hi, Di, N, dtype, seed=N + T)
    ref = REF_SCORES(q, w, kc, pos, 4)
    out = torch.full((B, T, N), float("nan"))
    it.indexer_scores_launch(q, w, kc, pos, 4, out=out)
    assert_kernel_close(out, ref, "fp32" if dtype == torch.float32 else "bf16", f"indexer_scores {dtype}")
    assert torch.equal(torch.isinf(out), torch.isinf(ref)), "causal mask differs"


def test_indexer_scores_registered_op_and_strided_inputs():
    q, w, kc, pos = _inputs(2, 4, 4, 32, 20, torch.float32, seed=1, ratio=3)
    qs = torch.randn(2, 6, 4, 32)[:, 1:5]  # non-contiguous over T
    qs.copy_(q)
    out = torch.ops.v4triton.indexer_scores(qs, w, kc, pos.to(torch.int32), 3)
    assert_kernel_close(out, REF_SCORES(q, w, kc, pos, 3), "fp32", "indexer_scores strided")


@pytest.mark.parametrize("R,N,k", [(1, 1, 1), (3, 129, 7), (2, 300, 64), (4, 40, 40), (2, 5, 9)])
def test_topk_select_random(R, N, k):
    g = torch.Generator().manual_seed(R * N + k)
    s = torch.randn(R, 1, N, generator=g)
    s[0, 0, ::3] = -math.inf  # masked entries are never picked
    out = torch.full((R, 1, k), -7, dtype=torch.int32)
    it.topk_select_launch(s, k, out=out)
    ref = REF_TOPK(s, k) if k <= N else None
    _check_topk(out, s, ref if ref is not None else _expected_topk(s, k), "topk_select")


def test_topk_select_ties_and_deep_digits():
    """Scores sharing their top 21 bits force all three radix levels; heavy exact ties at the k-th value."""
    N = 1000
    base = torch.full((N,), 1.0)
    base += torch.arange(N) % 37 * 2.0**-22  # same sign/exponent/mantissa prefix down to the last digit
    rows = [base, -base, torch.zeros(N), torch.where(torch.arange(N) % 2 == 0, 3.0, -math.inf)]
    s = torch.stack(rows).unsqueeze(1).contiguous()
    for k in (1, 27, 500, 999):
        out = torch.ops.v4triton.topk_select(s, k)
        _check_topk(out, s, REF_TOPK(s, k), f"ties k={k}")
    all_masked = torch.full((1, 1, 16), -math.inf)
    assert torch.equal(it.topk_select_launch(all_masked, 4), torch.full((1, 1, 4), -1, dtype=torch.int32))


@pytest.mark.parametrize("B,T,Hi,Di,N,k", [(1, 1, 64, 128, 300, 32), (2, 3, 4, 64, 127, 5), (3, 2, 8, 16, 129, 17),
                                           (2, 1, 16, 32, 3, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_indexer_topk_matches_reference(B, T, Hi, Di, N, k, dtype):
    q, w, kc, pos = _inputs(B, T, Hi, Di, N, dtype, seed=B * N + k)
    pos[0, 0] = 2  # no visible block: all -1
    ref_scores = REF_SCORES(q, w, kc, pos, 4)
    ref = REF_TOPK(ref_scores, k)
    out = torch.full((B, T, k), -7, dtype=torch.int32)
    it.indexer_topk_launch(q, w, kc, pos, 4, k, out=out)
    # the kernel selects on its own fp32 scores (summation order differs from the reference's einsum)
    kernel_scores = it.indexer_scores_launch(q, w, kc, pos, 4)
    _check_topk(out, kernel_scores, _expected_topk(kernel_scores, k), "indexer_topk vs own scores")
    assert (out[0, 0] == -1).all()
    # against the reference: identical sets except near-ties; the chosen entries' reference scores must
    # be within the fp32 rounding of the reference's k-th largest score
    for r, (a, b) in enumerate(zip(out.reshape(-1, k), ref.reshape(-1, k))):
        sa, sb = set(a[a >= 0].tolist()), set(b[b >= 0].tolist())
        assert len(sa) == len(sb)
        if sa != sb:
            srow = ref_scores.reshape(-1, N)[r]
            kth = min(srow[list(sb)].tolist())
            gap = max(abs(srow[j].item() - kth) for j in sa ^ sb)
            assert gap <= 1e-5 * max(1.0, abs(kth)), f"row {r}: picks differ by score gap {gap} (k-th {kth})"


def test_indexer_topk_chunked_workspace_and_registered_op(monkeypatch):
    monkeypatch.setattr(launch, "FORCE_WRAP", True)  # the launch path export/AOTInductor traces
    q, w, kc, pos = _inputs(2, 7, 4, 32, 50, torch.float32, seed=3)
    full = torch.ops.v4triton.indexer_topk(q, w, kc, pos, 4, 6)
    chunked = it.indexer_topk_launch(q, w, kc, pos, 4, 6, workspace_floats=2 * 50 * 3)  # 3 queries per chunk
    assert torch.equal(full, chunked)
    _check_topk(full, REF_SCORES(q, w, kc, pos, 4), REF_TOPK(REF_SCORES(q, w, kc, pos, 4), 6), "registered")


@pytest.mark.parametrize("topk_cfg", [it.TopkConfig(64, 1, False), it.TopkConfig(128, 2, True)])
def test_indexer_topk_configs_agree(topk_cfg):
    """Decode shapes (one query per program, hist1 fused or not) and several chunkings give the same picks."""
    q, w, kc, pos = _inputs(3, 1, 16, 32, 300, torch.bfloat16, seed=5)
    base = it.indexer_topk_launch(q, w, kc, pos, 4, 40)
    got = it.indexer_topk_launch(q, w, kc, pos, 4, 40, topk_config=topk_cfg)
    assert torch.equal(base, got)
    _check_topk(got, it.indexer_scores_launch(q, w, kc, pos, 4), REF_TOPK(REF_SCORES(q, w, kc, pos, 4), 40), "cfg")


@pytest.mark.parametrize("bad,match", [
    (dict(q=torch.zeros(1, 1, 3, 32), w=torch.zeros(1, 1, 3)), "powers of two"),
    (dict(kc=torch.zeros(1, 10, 64)), "k_cache must be"),
    (dict(pos=torch.zeros(1, 1)), "positions must be"),
    (dict(ratio=0), "ratio"),
    (dict(kc=torch.zeros(1, 10, 32, dtype=torch.bfloat16)), "share a float dtype"),
])
def test_indexer_input_errors(bad, match):
    args = dict(q=torch.zeros(1, 1, 4, 32), w=torch.zeros(1, 1, 4), kc=torch.zeros(1, 10, 32),
                pos=torch.zeros(1, 1, dtype=torch.long), ratio=4)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        it.indexer_scores_launch(args["q"], args["w"], args["kc"], args["pos"], args["ratio"])
    with pytest.raises(ValueError, match="k must be"):
        it.topk_select_launch(torch.zeros(1, 4), 0)


def test_registry_entries():
    from v4compile.plugins.registry import lookup
    q, w, kc, pos = _inputs(1, 1, 4, 32, 8, torch.bfloat16)
    for target in ("h100", "h200"):
        assert lookup("v4::indexer_scores", target, q, w, kc, pos, 4) is not None
        assert lookup("v4::topk_select", target, torch.zeros(1, 1, 8), 4) is not None
        assert lookup("v4::indexer_scores", target, q[..., :3, :], w[..., :3], kc, pos, 4) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs a CUDA GPU and TRITON_INTERPRET=0")
@pytest.mark.parametrize("B,N", [(1, 262144), (8, 32768)])
def test_indexer_topk_gpu_real_shapes(B, N):
    dev = torch.device("cuda")
    q, w, kc, pos = (t.to(dev) for t in _inputs(B, 1, 64, 128, N, torch.bfloat16, pos_max=4 * N + 4))
    ref_scores = REF_SCORES(q, w, kc, pos, 4)
    idx = torch.ops.v4triton.indexer_topk(q, w, kc, pos, 4, 512)
    ks = torch.ops.v4triton.indexer_scores(q, w, kc, pos, 4)
    assert_kernel_close(ks, ref_scores, "bf16", "indexer_scores gpu")
    _check_topk(idx.cpu(), ks.cpu(), REF_TOPK(ks, 512).cpu(), "indexer_topk gpu")

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
from v4compile.plugins.triton import radix_topk as rt
from v4compile.quant.formats import fake_quant_fp4
from v4compile.quant.kv_layout import pack_index_keys, unpack_index_keys
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
    _assert_same_picks_up_to_near_ties(out, ref, ref_scores, N, k)


def test_indexer_topk_chunked_workspace_and_registered_op(monkeypatch):
    monkeypatch.setattr(launch, "FORCE_WRAP", True)  # the launch path export/AOTInductor traces
    q, w, kc, pos = _inputs(2, 7, 4, 32, 50, torch.float32, seed=3)
    full = torch.ops.v4triton.indexer_topk(q, w, kc, pos, 4, 6)
    per_row = 50 + rt.workspace_ints_per_row(it.pick_topk_config(q.device, 6))
    chunked = it.indexer_topk_launch(q, w, kc, pos, 4, 6, workspace_floats=2 * per_row * 3)  # 3 queries per chunk
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


# ---------------------------------------------------------------------------------------------- top-k paths


def _crowded_scores(R, N, seed):
    """Rows that take every path of the radix select: random; a large common offset (every score in one
    1/128-wide bin: the third histogram pass); heavy exact ties; fewer visible scores than k."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randn(N, generator=g),
            1000.0 + 1e-3 * torch.randn(N, generator=g),
            torch.where(torch.arange(N) % 3 == 0, 2.0, torch.randn(N, generator=g).clamp(max=1.0)),
            torch.where(torch.arange(N) < 9, torch.randn(N, generator=g), -math.inf)]
    return torch.stack([rows[r % len(rows)] for r in range(R)]).unsqueeze(1).contiguous()


TOPK_PATHS = [it.TopkConfig(64, 1, False, cand=256),  # candidate list fits: the sorted-runs finish
              it.TopkConfig(32, 1, False, fuse_finish=True, cand=256),  # the last compaction program finishes
              it.TopkConfig(64, 1, False, cand=16),  # crowded rows: third pass, then the row-scan finish
              it.TopkConfig(64, 2, False, cand=16, hist3=False),  # no third pass: row-scan finish
              it.TopkConfig(32, 1, True, fuse_finish=True, cand=32)]


@pytest.mark.parametrize("cfg", TOPK_PATHS)
@pytest.mark.parametrize("k", [1, 9, 40])
def test_topk_select_every_path_follows_the_rule(cfg, k, monkeypatch):
    monkeypatch.setattr(rt, "REVERSE_CHUNKS", True)  # runs arrive out of chunk order, as they may on a GPU
    s = _crowded_scores(5, 300, seed=k)
    out = torch.full((5, 1, k), -7, dtype=torch.int32)
    it.topk_select_launch(s, k, out=out, config=cfg)
    _check_topk(out, s, REF_TOPK(s, k), f"{cfg} k={k}")


def test_third_pass_runs_only_for_crowded_rows():
    """The conditional LEVEL-3 histogram fills only rows whose 16-bit prefix leaves more than `cand` keys."""
    s = _crowded_scores(2, 300, seed=0).reshape(2, 300)  # row 0 random, row 1 offset by 1000
    cfg = it.TopkConfig(64, 1, False, cand=32)
    ws = rt.new_workspace(2, s.device, cfg, zeroed=True)
    out = torch.empty((2, 8), dtype=torch.int32)
    rt.launch_select(s, 2, 300, 8, out, ws, hist1_done=False, config=cfg)
    hist3 = ws[0][:, 512:768].sum(1)
    assert hist3[0] == 0 and hist3[1] > 32, f"third-pass histogram counts {hist3.tolist()}"
    _check_topk(out.unsqueeze(1), s.unsqueeze(1), REF_TOPK(s.unsqueeze(1), 8), "third pass")


@pytest.mark.parametrize("fp4", [False, True])
def test_score_kernels_zero_the_topk_workspace(fp4):
    """The fused op needs no memset: its score kernel zeroes the workspace rows of its queries (every row,
    also when a row sees no block)."""
    q, w, kc, packed, pos = _fp4_inputs(2, 3, 4, 64, 40, torch.float32, seed=2)
    pos[1, 2] = 0
    ws = torch.full((6, rt.WS_INTS.value), 7, dtype=torch.int32)
    scores = torch.empty((6, 40))
    cfg = it.pick_score_config(3, 4, q.device, fp4=fp4)
    it._launch_scores(q, w, *(packed if fp4 else (kc, None)), pos, 4, scores, ws, 0, 3, False, cfg, zero_ws=True)
    assert int(ws.abs().sum()) == 0


# ---------------------------------------------------------------------------------------------- FP4 keys


def _fp4_inputs(B, T, Hi, Di, N, dtype, seed=0, pos_max=None):
    """Queries / weights as `_inputs`; keys on the FP4 grid with magnitudes from 2^-20 to 2^20, packed."""
    q, w, kc, pos = _inputs(B, T, Hi, Di, N, torch.float32, seed=seed, pos_max=pos_max)
    g = torch.Generator().manual_seed(seed + 1)
    gain = 2.0 ** torch.randint(-20, 21, (B, N, 1), generator=g).float()
    kc = fake_quant_fp4(kc * gain, 32).to(dtype)
    codes, scales = pack_index_keys(kc)
    return fake_quant_fp4(q, 32).to(dtype), w.to(dtype), kc, (codes, scales), pos


@pytest.mark.parametrize("B,T,Hi,Di,N", [(1, 1, 64, 128, 129), (2, 3, 4, 64, 127), (3, 1, 8, 32, 1), (1, 5, 2, 32, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_indexer_scores_fp4_matches_reference_and_bf16_layout(B, T, Hi, Di, N, dtype):
    q, w, kc, packed, pos = _fp4_inputs(B, T, Hi, Di, N, dtype, seed=N + T)
    assert torch.equal(unpack_index_keys(*packed, dtype), kc)
    ref = REF_SCORES(q, w, kc, pos, 4)
    out = torch.full((B, T, N), float("nan"))
    it.indexer_scores_launch(q, w, packed, pos, 4, out=out)
    prec = "fp32" if dtype == torch.float32 else "bf16"
    assert_kernel_close(out, ref, prec, f"indexer_scores fp4 {dtype}")
    assert torch.equal(torch.isinf(out), torch.isinf(ref)), "causal mask differs"
    dense = it.indexer_scores_launch(q, w, kc, pos, 4)  # same products, other summation order
    assert_kernel_close(out, dense, prec, f"fp4 vs bf16 layout {dtype}")


@pytest.mark.parametrize("Di", [32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp4_kernel_decodes_every_code_and_scale_exactly(Di, dtype):
    """Query t of heads (+e_t, -e_t) with weights (1, -1) scores key j as exactly k[j, t]: the kernel's
    decode of every code byte at scales 2^-126 .. 2^125 equals unpack_index_keys bit for bit."""
    N, nb = 96, Di // 32
    codes = torch.arange(N * Di // 2).remainder(256).to(torch.uint8).reshape(1, N, Di // 2)
    g = torch.Generator().manual_seed(Di)
    scales = torch.randint(1, 253, (1, N, nb), generator=g).to(torch.uint8)
    scales[0, :4] = torch.tensor([1, 126, 129, 252], dtype=torch.uint8).unsqueeze(-1)
    keys = unpack_index_keys(codes, scales, dtype)  # [1, N, Di]
    eye = torch.eye(Di)
    q = torch.stack((eye, -eye), 1).unsqueeze(0).to(dtype)  # [1, T = Di, 2, Di]
    w = torch.tensor([1.0, -1.0]).expand(1, Di, 2).contiguous().to(dtype)
    pos = torch.full((1, Di), 4 * N)
    out = torch.full((1, Di, N), float("nan"))
    it.indexer_scores_launch(q, w, (codes, scales), pos, 4, out=out)
    assert torch.equal(out[0], keys[0].float().T), "decoded keys differ from unpack_index_keys"


@pytest.mark.parametrize("B,T,Hi,Di,N,k", [(1, 1, 64, 128, 300, 32), (2, 3, 4, 64, 127, 5), (2, 1, 16, 32, 3, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_indexer_topk_fp4_matches_reference(B, T, Hi, Di, N, k, dtype):
    q, w, kc, packed, pos = _fp4_inputs(B, T, Hi, Di, N, dtype, seed=B * N + k)
    pos[0, 0] = 2  # no visible block: all -1
    out = torch.full((B, T, k), -7, dtype=torch.int32)
    it.indexer_topk_launch(q, w, packed, pos, 4, k, out=out)
    own = it.indexer_scores_launch(q, w, packed, pos, 4)
    _check_topk(out, own, _expected_topk(own, k), "indexer_topk fp4 vs own scores")
    assert (out[0, 0] == -1).all()
    ref_scores = REF_SCORES(q, w, kc, pos, 4)
    _assert_same_picks_up_to_near_ties(out, REF_TOPK(ref_scores, k), ref_scores, N, k)


def test_fp4_registered_ops_and_registry(monkeypatch):
    monkeypatch.setattr(launch, "FORCE_WRAP", True)  # the launch path export/AOTInductor traces
    q, w, kc, (codes, scales), pos = _fp4_inputs(2, 2, 8, 64, 45, torch.bfloat16, seed=7)
    scores = torch.ops.v4triton.indexer_scores_fp4(q, w, codes, scales, pos, 4)
    assert_kernel_close(scores, REF_SCORES(q, w, kc, pos, 4), "bf16", "registered fp4 scores")
    idx = torch.ops.v4triton.indexer_topk_fp4(q, w, codes, scales, pos, 4, 6)
    assert torch.equal(idx, it.indexer_topk_launch(q, w, (codes, scales), pos, 4, 6))
    _check_topk(idx, scores, _expected_topk(scores, 6), "registered fp4 topk")
    from v4compile.plugins.registry import lookup
    assert lookup("v4::indexer_topk_fp4", "h200", q, w, codes, scales, pos, 4, 6) is not None
    assert lookup("v4::indexer_topk_fp4", "h200", q.half(), w, codes, scales, pos, 4, 6) is None


@pytest.mark.parametrize("bad,match", [
    (dict(codes=torch.zeros(1, 10, 32, dtype=torch.int8)), "uint8"),
    (dict(scales=torch.zeros(1, 10, 4, dtype=torch.uint8)), "scales must be"),
    (dict(codes=torch.zeros(1, 10, 16, dtype=torch.uint8)), "codes must be"),
    (dict(q=torch.zeros(1, 1, 4, 64, dtype=torch.float16)), "bf16 or fp32"),
    (dict(q=torch.zeros(1, 1, 4, 16), codes=torch.zeros(1, 10, 8, dtype=torch.uint8)), "multiple of 32"),
])
def test_fp4_input_errors(bad, match):
    args = dict(q=torch.zeros(1, 1, 4, 64), w=torch.zeros(1, 1, 4), codes=torch.zeros(1, 10, 32, dtype=torch.uint8),
                scales=torch.zeros(1, 10, 2, dtype=torch.uint8), pos=torch.zeros(1, 1, dtype=torch.long))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        it.indexer_topk_launch(args["q"], args["w"], (args["codes"], args["scales"]), args["pos"], 4, 2)


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs a CUDA GPU and TRITON_INTERPRET=0")
@pytest.mark.parametrize("B,N", [(1, 262144), (8, 32768)])
def test_indexer_topk_fp4_gpu_real_shapes(B, N):
    """Packed FP4 keys at V4-Flash shapes: scores vs the reference on the decoded keys and vs the bf16-layout
    kernel; picks by the documented rule on the kernel's scores and equal to the bf16 layout's picks up to
    summation-order near-ties; every top-k config gives the default's picks."""
    dev = torch.device("cuda")
    q, w, kc, packed, pos = (t.to(dev) if torch.is_tensor(t) else tuple(x.to(dev) for x in t)
                             for t in _fp4_inputs(B, 1, 64, 128, N, torch.bfloat16, pos_max=4 * N + 4))
    ref_scores = REF_SCORES(q, w, kc, pos, 4)
    ks = torch.ops.v4triton.indexer_scores_fp4(q, w, *packed, pos, 4)
    assert_kernel_close(ks, ref_scores, "bf16", "indexer_scores_fp4 gpu")
    assert_kernel_close(ks, torch.ops.v4triton.indexer_scores(q, w, kc, pos, 4), "bf16", "fp4 vs bf16 layout")
    idx = torch.ops.v4triton.indexer_topk_fp4(q, w, *packed, pos, 4, 512)
    _check_topk(idx.cpu(), ks.cpu(), REF_TOPK(ks, 512).cpu(), "indexer_topk_fp4 gpu")
    for cfg in it.TOPK_CONFIGS:
        got = it.indexer_topk_launch(q, w, packed, pos, 4, 512, topk_config=cfg)
        assert torch.equal(got, idx), f"{cfg}: {int((got != idx).sum())} picks differ from the default config"
    crowded = _crowded_scores(4, N, seed=1).to(dev)  # offset / ties / few-visible rows at real length
    for cfg in it.TOPK_CONFIGS:
        _check_topk(it.topk_select_launch(crowded, 512, config=cfg).cpu(), crowded.cpu(),
                    REF_TOPK(crowded, 512).cpu(), f"crowded rows {cfg}")


def _assert_same_picks_up_to_near_ties(out, ref, ref_scores, N: int, k: int) -> None:
    """Per row: the same number of picks, and picks that differ from the reference's lie within fp32 rounding
    (summation order) of the reference's k-th largest score."""
    for r, (a, b) in enumerate(zip(out.reshape(-1, k), ref.reshape(-1, k))):
        sa, sb = set(a[a >= 0].tolist()), set(b[b >= 0].tolist())
        assert len(sa) == len(sb)
        if sa != sb:
            srow = ref_scores.reshape(-1, N)[r]
            kth = min(srow[list(sb)].tolist())
            gap = max(abs(srow[j].item() - kth) for j in sa ^ sb)
            assert gap <= 1e-5 * max(1.0, abs(kth)), f"row {r}: picks differ by score gap {gap} (k-th {kth})"

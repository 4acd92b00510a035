"""v4triton MoE kernels (router, FP8 experts) against the model's reference ops v4::moe_route / v4::moe_experts.

CPU runs go through the Triton interpreter at small shapes (E = 8 experts, top-2, d = 256, I = 128); the
GPU tests (marker gpu) use V4-Flash widths. Outputs and intermediates are poisoned with NaN (launcher option)
so an element a kernel forgets to write shows up.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

import v4compile.model.ops  # noqa: E402,F401  (registers torch.ops.v4.*)
from v4compile.plugins import registry  # noqa: E402
from v4compile.plugins.triton import moe_gemm as mg  # noqa: E402
from v4compile.plugins.triton import moe_route as mr  # noqa: E402
from v4compile.quant import formats as qf  # noqa: E402
from v4compile.validate import assert_kernel_close, calc_diff  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# poisoned (NaN) padding rows of h are quantised by the grouped path but never read: numpy warns about them;
# e4m3 casts as the GPU rounds them (tests/plugins/conftest.py)
pytestmark = [pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning"),
              pytest.mark.usefixtures("exact_interpreter_casts")]
E, D, INTER, TOPK, LIMIT = 8, 256, 128, 2, 10.0
G = mg.GemmConfig


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _experts(n_exp: int, fmt: str, seed: int, d: int = D, inter: int = INTER, device: str = "cpu"):
    """Stacked FP8 experts [n_exp, ...] with 128x128 scales (e8m0 or fp32), weights ~ N(0, 1/K)."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for O, K in ((inter, d), (inter, d), (d, inter)):
        w = torch.randn(n_exp, O, K, generator=g, device=device) / K**0.5
        out += qf.quant_fp8_block(w, (128, 128), scale_fmt=fmt)
    return out  # w1, s1, w3, s3, w2, s2


def _tokens(n: int, dtype: torch.dtype, seed: int, k: int = TOPK, n_exp: int = E):
    g = _gen(seed)
    x = (torch.randn(n, D, generator=g) * 2).to(dtype)
    ids = torch.stack([torch.randperm(n_exp, generator=g)[:k] for _ in range(n)]) if n else \
        torch.empty(0, k, dtype=torch.int64)
    w = torch.rand(n, k, generator=g) + 0.2
    return x, w, ids


def _reference(x, w, ids, experts, n_shared):
    """v4::moe_experts over the stack, the shared experts appended as picks of weight 1 (the model's sum)."""
    n_routed = experts[0].shape[0] - n_shared
    shared_ids = torch.arange(n_routed, n_routed + n_shared, device=x.device).expand(x.shape[0], n_shared)
    ids_full = torch.cat([ids, shared_ids], 1)
    w_full = torch.cat([w, torch.ones(x.shape[0], n_shared, device=x.device)], 1)
    return torch.ops.v4.moe_experts(x, w_full, ids_full, *experts, LIMIT)


def _run(x, w, ids, experts, n_shared, path, configs, **kw):
    w1, s1, w3, s3, w2, s2 = experts
    return mg.moe_experts_launch(x, w, ids, w1, w3, s1, s3, w2, s2, LIMIT, n_shared, path, configs, poison=True,
                                 **kw)


# ------------------------------------------------------------------------------------------ router

ROUTE_CASES = [  # (tokens, hash layer, act dtype, hidden-dim splits, experts, top-k)
    (1, False, torch.float32, None, 8, 2),
    (3, True, torch.bfloat16, 3, 8, 2),
    (17, False, torch.bfloat16, 1, 8, 2),
    (17, True, torch.float32, 1, 8, 2),
    (129, False, torch.bfloat16, None, 8, 2),
    (5, False, torch.float32, 2, 20, 6),  # expert count not a power of two, V4's top-6
]


@pytest.mark.parametrize("n, use_hash, dtype, split, n_exp, k", ROUTE_CASES)
def test_route_matches_reference(n, use_hash, dtype, split, n_exp, k):
    g = _gen(n + 7 * n_exp)
    x = torch.randn(n, D, generator=g).to(dtype)
    gate = (torch.randn(n_exp, D, generator=g) / D**0.5).to(torch.bfloat16)
    bias = torch.randn(n_exp, generator=g) * 0.1 if not use_hash else torch.empty(0)
    tid2eid = torch.stack([torch.randperm(n_exp, generator=g)[:k] for _ in range(50)])
    tok = torch.randint(0, 50, (n,), generator=g)
    w, ids = mr.moe_route_launch(x, gate, bias, tid2eid, tok, k, 1.5, use_hash, split=split, poison=True)
    w_ref, ids_ref = torch.ops.v4.moe_route(x, gate, bias, tid2eid, tok, k, 1.5, use_hash)
    assert ids.dtype == ids_ref.dtype and torch.equal(ids, ids_ref), \
        f"{int((ids != ids_ref).sum())} ids differ, first rows {ids[:2].tolist()} vs {ids_ref[:2].tolist()}"
    assert_kernel_close(w, w_ref, "fp32", "routing weights")


def test_route_op_and_errors():
    x, _, _ = _tokens(4, torch.bfloat16, 1)
    gate = torch.randn(E, D).to(torch.bfloat16)
    bias, tid, tok = torch.zeros(E), torch.empty(0, TOPK, dtype=torch.int64), torch.zeros(4, dtype=torch.int64)
    w, ids = torch.ops.v4triton.moe_route(x, gate, bias, tid, tok, TOPK, 1.0, False)
    assert torch.equal(ids, torch.ops.v4.moe_route(x, gate, bias, tid, tok, TOPK, 1.0, False)[1])
    with pytest.raises(ValueError, match="topk must be in"):
        mr.moe_route_launch(x, gate, bias, tid, tok, E + 1, 1.0, False)
    with pytest.raises(ValueError, match="bias must be contiguous float32"):
        mr.moe_route_launch(x, gate, bias.double(), tid, tok, TOPK, 1.0, False)
    with pytest.raises(ValueError, match="gate weight must be"):
        mr.moe_route_launch(x, gate[:, :128], bias, tid, tok, TOPK, 1.0, False)
    assert registry.lookup("v4::moe_route", "h200", x, gate, bias, tid, tok, TOPK, 1.0, False) is not None


# ------------------------------------------------------------------------------------------ experts

EXPERT_CASES = [  # (path, GEMM1 config, GEMM2 config, act dtype, scale format, tokens, shared experts)
    ("route", G(16, 32, 4, 2), G(16, 32, 4, 2), torch.bfloat16, "ue8m0", 1, 1),
    ("route", G(16, 128, 4, 2), G(16, 64, 4, 2), torch.float32, "ue8m0", 3, 1),
    ("route", G(16, 16, 4, 2), G(16, 16, 4, 2), torch.bfloat16, "fp32", 3, 0),
    ("grouped", G(16, 128, 4, 2), G(16, 128, 4, 2), torch.bfloat16, "ue8m0", 17, 1),
    ("grouped", G(16, 64, 4, 2), G(16, 64, 4, 2), torch.bfloat16, "ue8m0", 17, 0),
    ("grouped", G(32, 128, 4, 2), G(32, 256, 4, 2), torch.float32, "fp32", 3, 1),
    ("grouped", G(16, 128, 4, 2), G(16, 128, 4, 2), torch.bfloat16, "ue8m0", 129, 1),
]


@pytest.mark.parametrize("path, c1, c2, dtype, fmt, n, n_shared", EXPERT_CASES)
def test_experts_match_reference(path, c1, c2, dtype, fmt, n, n_shared):
    experts = _experts(E + n_shared, fmt, seed=n)
    x, w, ids = _tokens(n, dtype, seed=n + 1)
    y = _run(x, w, ids, experts, n_shared, path, (c1, c2))
    ref = _reference(x, w, ids, experts, n_shared)
    assert y.dtype == torch.float32 and y.shape == (n, D)
    assert_kernel_close(y, ref, "fp8", f"moe_experts {path}")
    # with exact casts both sides form the same products: only fp32 summation order differs
    assert calc_diff(y, ref) < 1e-9, f"calc_diff {calc_diff(y, ref):.2e}: more than summation order"


@pytest.mark.parametrize("n", [1, 40])
def test_experts_default_path_and_configs(n):
    """path='auto' and the default configs (route at 1 token; grouped BM 64 at 40 tokens x 3 slots / 9 experts)."""
    experts = _experts(E + 1, "ue8m0", seed=20 + n)
    x, w, ids = _tokens(n, torch.bfloat16, seed=21 + n)
    y = _run(x, w, ids, experts, 1, "auto", None)
    assert calc_diff(y, _reference(x, w, ids, experts, 1)) < 1e-9


@pytest.mark.parametrize("path", ["route", "grouped"])
def test_experts_per_row_weight_scales(path):
    """Scales with one row per output channel ([E, O, K/128], the finer layout a repack may need)."""
    experts = _experts(E, "fp32", seed=3)
    fine = list(experts)
    for i in (1, 3, 5):
        fine[i] = experts[i].repeat_interleave(128, dim=1)[:, : experts[i - 1].shape[1]].contiguous()
    x, w, ids = _tokens(3, torch.bfloat16, seed=4)
    cfg = (G(16, 128, 4, 2), G(16, 128, 4, 2))
    assert torch.equal(_run(x, w, ids, fine, 0, path, cfg), _run(x, w, ids, experts, 0, path, cfg))


@pytest.mark.parametrize("path, fmt", [("route", "fp32"), ("grouped", "ue8m0")])
def test_experts_per_row_per_32_weight_scales(path, fmt):
    """Scales [E, O, K/32] (an exact MXFP4 repack's layout), each differing from its 128x128 block by a random
    factor 1 or 1/2 with the e4m3 values doubled to match: same weights, so the same result as the 128x128 path."""
    experts = _experts(E, fmt, seed=13)
    g = _gen(14)
    fine = list(experts)
    for i in (0, 2, 4):
        w, s = experts[i], qf.scale_to_float(experts[i + 1])
        w = w.float().clamp(-224, 224).to(torch.float8_e4m3fn)  # doubling stays exact
        experts[i] = w
        O, K = w.shape[1:]
        half = torch.randint(0, 2, (E, O, K // 32), generator=g).bool()  # scale / 2, value * 2
        s_fine = s.repeat_interleave(128, 1)[:, :O].repeat_interleave(4, 2) * torch.where(half, 0.5, 1.0)
        w_fine = w.float() * half.repeat_interleave(32, 2).float().add(1.0)
        fine[i] = w_fine.to(torch.float8_e4m3fn)
        fine[i + 1] = s_fine if fmt == "fp32" else qf.float_to_e8m0(s_fine)
    assert torch.equal(qf.dequant_fp8_block(fine[0][0], fine[1][0]), qf.dequant_fp8_block(experts[0][0], experts[1][0]))
    x, w, ids = _tokens(3, torch.bfloat16, seed=15)
    cfg = (G(16, 128, 4, 2), G(16, 128, 4, 2))
    y_fine = _run(x, w, ids, fine, 0, path, cfg)
    assert calc_diff(y_fine, _reference(x, w, ids, experts, 0)) < 1e-9


@pytest.mark.parametrize("path", ["route", "grouped"])
def test_invalid_ids_contribute_nothing(path):
    experts = _experts(E, "ue8m0", seed=5)
    x, w, ids = _tokens(3, torch.bfloat16, seed=6)
    ids[0, 1], ids[2, 0] = -1, E + 3  # the reference's loop over experts never matches these
    y = _run(x, w, ids, experts, 0, path, (G(16, 128, 4, 2), G(16, 128, 4, 2)))
    assert calc_diff(y, _reference(x, w, ids, experts, 0)) < 1e-9


def test_sort_routes_groups_every_route_once():
    n, k, n_shared, n_exp, bm = 37, 2, 1, 9, 16
    _, _, ids = _tokens(n, torch.float32, seed=8, k=k, n_exp=n_exp - n_shared)
    counts, sroute, t_max = mg.sort_routes(ids, n_exp, n_shared, bm)
    experts_of_route = torch.cat([ids, torch.full((n, 1), n_exp - 1)], 1).flatten()
    assert torch.equal(counts.long(), torch.bincount(experts_of_route, minlength=n_exp))
    first = 0
    for e in range(n_exp):
        c = int(counts[e])
        got = sroute[first * bm: first * bm + c]
        assert sorted(got.tolist()) == (experts_of_route == e).nonzero()[:, 0].tolist(), f"expert {e}"
        first += -(-c // bm)
    assert first <= t_max


def test_triton_ops_pack_and_registry():
    w1, s1, w3, s3, w2, s2 = _experts(E + 1, "ue8m0", seed=9)
    routed = (w1[:E], s1[:E], w3[:E], s3[:E], w2[:E], s2[:E])
    shared = (w1[E], s1[E], w3[E], s3[E], w2[E], s2[E])
    w13, s13, w2p, s2p, n_shared = mg.pack_experts_fp8(*routed, shared=shared)
    assert n_shared == 1 and w13.shape == (E + 1, 2 * INTER, D) and s13.shape == (E + 1, 2 * INTER // 128, D // 128)
    x, w, ids = _tokens(3, torch.bfloat16, seed=10)
    y = torch.ops.v4triton.moe_experts_fp8(x, w, ids, w13, s13, w2p, s2p, LIMIT, 1)
    assert calc_diff(y, _reference(x, w, ids, (w1, s1, w3, s3, w2, s2), 1)) < 1e-9
    y_routed = torch.ops.v4triton.moe_experts(x, w, ids, *routed, LIMIT)
    assert calc_diff(y_routed, torch.ops.v4.moe_experts(x, w, ids, *routed, LIMIT)) < 1e-9
    f32 = mg.pack_experts_fp8(w1[:E], s1[:E].float(), w3[:E], s3[:E].float(), w2[:E], s2[:E].float(), shared)
    assert f32[1].dtype == torch.float32 and torch.equal(f32[1][E], qf.e8m0_to_float(torch.cat([s1[E], s3[E]])))
    args = (x, w, ids, *routed, LIMIT)
    assert registry.lookup("v4::moe_experts", "h200", *args).name == "v4triton::moe_experts"
    fp4 = (torch.zeros(E, INTER, D // 2, dtype=torch.int8),) * 2
    assert registry.lookup("v4::moe_experts", "h100", x, w, ids, fp4[0], s1, fp4[1], s3, w2, s2, LIMIT) is None


def test_experts_errors_and_empty():
    w1, s1, w3, s3, w2, s2 = _experts(E, "ue8m0", seed=11)
    x, w, ids = _tokens(2, torch.bfloat16, seed=12)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        mg.moe_experts_launch(x, w, ids, w1.float(), w3, s1, s3, w2, s2, LIMIT)
    with pytest.raises(ValueError, match="scales must all be"):
        mg.moe_experts_launch(x, w, ids, w1, w3, s1, s3.float(), w2, s2, LIMIT)
    with pytest.raises(ValueError, match="weights must be float32"):
        mg.moe_experts_launch(x, w.double(), ids, w1, w3, s1, s3, w2, s2, LIMIT)
    with pytest.raises(ValueError, match="multiples of 128"):
        mg.moe_experts_launch(x[:, :200], w, ids, w1[..., :200], w3[..., :200], s1[..., :2], s3[..., :2],
                              w2[:, :200], s2[:, :2], LIMIT)
    with pytest.raises(ValueError, match="path must be"):
        mg.moe_experts_launch(x, w, ids, w1, w3, s1, s3, w2, s2, LIMIT, path="dense")
    y = mg.moe_experts_launch(x[:0], w[:0], ids[:0], w1, w3, s1, s3, w2, s2, LIMIT)
    assert y.shape == (0, D)


# ------------------------------------------------------------------------------------------ GPU, V4-Flash widths

gpu = pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="needs a CUDA GPU (sm_90), not the "
                         "interpreter (run with TRITON_INTERPRET=0)")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("n", [1, 2, 64, 1000])
def test_gpu_flash_widths(n):
    """d = 4096, I = 2048, top-6 of 32 routed + 1 shared (fewer experts than Flash: the widths are what matter)."""
    n_exp, k = 32, 6
    experts = _experts(n_exp + 1, "ue8m0", seed=n, d=4096, inter=2048, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(n)
    x = torch.randn(n, 4096, device="cuda", generator=g).to(torch.bfloat16)
    ids = torch.rand(n, n_exp, device="cuda", generator=g).topk(k, dim=1).indices
    w = torch.rand(n, k, device="cuda", generator=g) + 0.2
    ref = _reference(x, w, ids, experts, 1)
    for path in ("route", "grouped"):
        w1, s1, w3, s3, w2, s2 = experts
        y = mg.moe_experts_launch(x, w, ids, w1, w3, s1, s3, w2, s2, LIMIT, 1, path, poison=True)
        assert_kernel_close(y, ref, "fp8", f"moe_experts {path} n={n}")


@pytest.mark.gpu
@gpu
def test_gpu_route_flash():
    n, d, n_exp, k = 4096, 4096, 256, 6
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, d, device="cuda", generator=g).to(torch.bfloat16)
    gate = (torch.randn(n_exp, d, device="cuda", generator=g) / d**0.5).to(torch.bfloat16)
    bias = 0.05 * torch.randn(n_exp, device="cuda", generator=g)
    empty, tok = torch.empty(0, k, dtype=torch.int64, device="cuda"), torch.zeros(n, dtype=torch.int64, device="cuda")
    w, ids = mr.moe_route_launch(x, gate, bias, empty, tok, k, 1.5, False, poison=True)
    w_ref, ids_ref = torch.ops.v4.moe_route(x, gate, bias, empty, tok, k, 1.5, False)
    bad = (ids.sort(1).values != ids_ref.sort(1).values).any(1)
    if bad.any():  # only near-ties may differ: both sides sum the same exact products in another order
        s = (torch.nn.functional.softplus(x[bad].float() @ gate.float().T).sqrt() + bias).sort(1, descending=True)
        gap = (s.values[:, k - 1] - s.values[:, k]).abs().max().item()
        assert gap < 1e-5, f"{int(bad.sum())} tokens pick other experts; score gap {gap:.2e} is not a near-tie"
    assert_kernel_close(w[~bad], w_ref[~bad], "fp32", "routing weights")

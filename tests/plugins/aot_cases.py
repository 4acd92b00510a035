"""Shapes, inputs and drivers shared by the AOT TensorRT plugin tests (test_tensorrt_aot.py, its GPU part
test_tensorrt_aot_gpu.py): tiny and V4-Flash dimensions, the fused ops' argument lists, fresh caches, and the
reference-vs-composition driver over prefill / decode / continuation calls."""

import math

import torch

from v4compile.model.ops import positions_of, window_indices
from v4compile.model.rope import rope_inv_freq
from v4compile.plugins.tensorrt import aot
from v4compile.plugins.tensorrt.specs import SPECS
from v4compile.plugins.triton import compressor, indexer_topk, sparse_attention
from v4compile.targets import trt_ops
from v4compile.validate import assert_kernel_close

F, I64, I32 = "float32", "int64", "int32"
TINY = dict(H=4, D=96, W=8, R=32, Hi=4, Di=64, N1=17, topk=4, m=16, N1h=5, d=64, E=8, k=2, V=50)
FLASH = dict(H=64, D=512, W=128, R=64, Hi=64, Di=128, N1=1025, topk=512, m=128, N1h=33, d=4096, E=256, k=6, V=1000)


def _csa_io(B, T, d, act):
    """(shapes, dtypes) of csa_attention's tensor inputs (spec order)."""
    D, H, Hi, Di, N1 = d["D"], d["H"], d["Hi"], d["Di"], d["N1"]
    shapes = [(B, T, H, D), (B, T, D), (B,), (B, d["W"], D), (B, T, 2 * D), (B, T, 2 * D), (4, 2 * D), (D,),
              (d["R"] // 2,), (B, 8, 2 * D), (B, 8, 2 * D), (B, N1, D), (B, T, Hi, Di), (B, T, Hi),
              (B, T, 2 * Di), (B, T, 2 * Di), (4, 2 * Di), (Di,), (B, 8, 2 * Di), (B, 8, 2 * Di), (B, N1, Di), (H,)]
    dtypes = [act, act, I64, act, F, F, F, act, F, F, F, act, act, act, F, F, F, act, F, F, act, F]
    return shapes, dtypes


def _hca_io(B, T, d, act):
    D, m = d["D"], d["m"]
    shapes = [(B, T, d["H"], D), (B, T, D), (B,), (B, d["W"], D), (B, T, D), (B, T, D), (m, D), (D,), (d["R"] // 2,),
              (B, m, D), (B, m, D), (B, d["N1h"], D), (d["H"],)]
    return shapes, [act, act, I64, act, F, F, F, act, F, F, F, act, F]


def _route_io(N, d, act, use_hash):
    shapes = [(N, d["d"]), (d["E"], d["d"]), (0,) if use_hash else (d["E"],), (d["V"], d["k"]) if use_hash
              else (0, d["k"]), (N,)]
    return shapes, [act, act, F, I64, I64]


def _attrs(name, d):
    return {"csa_attention": (d["D"] ** -0.5, 1e-6, d["topk"]), "hca_attention": (d["D"] ** -0.5, d["m"], 1e-6),
            "moe_route": None}[name]


def _zeros(shapes, dtypes):
    return [torch.zeros(s, dtype=getattr(torch, dt)) for s, dt in zip(shapes, dtypes)]


def _fresh_state(op, B, d, dtype):
    """New caches in spec `updates` order: rings and compressed caches zero, states empty (kv 0, score -inf)."""
    D, Di, W = d["D"], d["Di"], d["W"]
    if op == "csa_attention":
        return [torch.zeros(B, W, D, dtype=dtype), torch.zeros(B, 8, 2 * D), torch.full((B, 8, 2 * D), -math.inf),
                torch.zeros(B, d["N1"], D, dtype=dtype), torch.zeros(B, 8, 2 * Di), torch.full((B, 8, 2 * Di), -math.inf),
                torch.zeros(B, d["N1"], Di, dtype=dtype)]
    m = d["m"]
    return [torch.zeros(B, W, D, dtype=dtype), torch.zeros(B, m, D), torch.full((B, m, D), -math.inf),
            torch.zeros(B, d["N1h"], D, dtype=dtype)]


def _drive(op, chunks, starts, d=TINY, dtype=torch.float32, device="cpu", seed=0, strict=True):
    """Reference body and AOT composition through the same calls, each fed its own updated caches (fresh
    caches: each start must be a block boundary, as for any real sequence); strict: assert per the kernel
    tolerance table (fp32); always return the worst calc_diff / pick-set overlap / inf-NaN mismatches seen."""
    from v4compile.validate import calc_diff, nonfinite_mismatch

    g = torch.Generator().manual_seed(seed)
    B = len(starts)

    def rn(*s, dt=torch.float32):
        return torch.randn(*s, generator=g).to(device=device, dtype=dt)

    inv = rope_inv_freq(d["R"], 160000.0, yarn=True, factor=16, original_seq_len=65536).to(device)
    D, Di, H, Hi, m = d["D"], d["Di"], d["H"], d["Hi"], (4 if op == "csa_attention" else d["m"])
    c = 2 if m == 4 else 1
    ape, nw, iape, inw, sink = rn(m, c * D), 1 + 0.1 * rn(D, dt=dtype), rn(4, 2 * Di), 1 + 0.1 * rn(Di, dt=dtype), rn(H)
    ref_st = [t.to(device) for t in _fresh_state(op, B, d, dtype)]
    aot_st = [t.clone() for t in ref_st]
    start = torch.tensor(starts, device=device)
    spec = SPECS[op]
    worst = {"o": 0.0, "caches": 0.0, "overlap": 1.0, "nonfinite": 0}
    for step, T in enumerate(chunks):
        x = [rn(B, T, H, D, dt=dtype), rn(B, T, D, dt=dtype), start]
        proj = [rn(B, T, c * D), 2 * rn(B, T, c * D), ape, nw, inv]
        idx = [rn(B, T, Hi, Di, dt=dtype), (rn(B, T, Hi).abs() * Hi ** -0.5).to(dtype), rn(B, T, 2 * Di),
               2 * rn(B, T, 2 * Di), iape, inw]

        def call(st, body):
            if op == "csa_attention":
                return body(*x, st[0], *proj, *st[1:4], *idx, *st[4:7], sink, *_attrs(op, d))
            return body(*x, st[0], *proj, *st[1:4], sink, *_attrs(op, d))

        ref = call(ref_st, trt_ops.BODIES_TRT[op])
        with aot.poisoned():
            got = call(aot_st, trt_ops.AOT_BODIES[op])
        what = f"{op} step {step} (T={T})"
        if op == "csa_attention":
            a, b = got[1].sort(-1).values, ref[1].sort(-1).values
            worst["overlap"] = min(worst["overlap"], _overlap(a, b))
            assert not strict or torch.equal(a, b), f"{what}: picks differ as sets"
        worst["o"] = max(worst["o"], calc_diff(got[0], ref[0]))
        worst["nonfinite"] += nonfinite_mismatch(got[0], ref[0])
        if strict:
            assert_kernel_close(got[0], ref[0], "fp32", f"{what} attention output")
        for name, a, b in zip(spec.output_names[spec.n_results:], got[spec.n_results:], ref[spec.n_results:]):
            if "cache" in name:  # the last row is the reference's scratch row; the kernels leave it alone
                worst["caches"] = max(worst["caches"], calc_diff(a[:, :-1], b[:, :-1]))
                worst["nonfinite"] += nonfinite_mismatch(a[:, :-1], b[:, :-1])
                if strict:
                    assert_kernel_close(a[:, :-1], b[:, :-1], "fp32", f"{what} {name}")
            else:
                assert torch.equal(a, b), f"{what}: {name} differs"
        ref_st, aot_st = list(ref[spec.n_results:]), list(got[spec.n_results:])
        start = start + T
    return worst


def _overlap(a, b) -> float:
    """Mean share of each row's valid reference picks (not -1) that the other row also holds (1 if none)."""
    shares = []
    for r1, r2 in zip(a.flatten(0, -2).tolist(), b.flatten(0, -2).tolist()):
        want = set(r2) - {-1}
        shares.append(len(want & set(r1)) / len(want) if want else float(set(r1) == {-1}))
    return sum(shares) / len(shares)


def _random_call(op, d, dtype, starts, T, g, state=None):
    """Arguments of one csa / hca_attention call on CUDA (fresh caches unless `state`, spec updates order)."""
    B, D, Di, H, Hi = len(starts), d["D"], d["Di"], d["H"], d["Hi"]
    m = 4 if op == "csa_attention" else d["m"]
    c = 2 if m == 4 else 1

    def rn(*s, dt=torch.float32):
        return torch.randn(*s, generator=g).to(device="cuda", dtype=dt)

    st = state or [t.cuda() for t in _fresh_state(op, B, d, dtype)]
    inv = rope_inv_freq(d["R"], 160000.0, yarn=True, factor=16, original_seq_len=65536).cuda()
    head = [rn(B, T, H, D, dt=dtype), rn(B, T, D, dt=dtype), torch.tensor(starts, device="cuda"), st[0],
            rn(B, T, c * D), 2 * rn(B, T, c * D), rn(m, c * D), 1 + 0.1 * rn(D, dt=dtype), inv, *st[1:4]]
    if op == "hca_attention":
        return [*head, rn(H)]
    return [*head, rn(B, T, Hi, Di, dt=dtype), (rn(B, T, Hi).abs() * Hi ** -0.5).to(dtype), rn(B, T, 2 * Di),
            2 * rn(B, T, 2 * Di), rn(4, 2 * Di), 1 + 0.1 * rn(Di, dt=dtype), *st[4:7], rn(H)]


def _launcher_outputs(op, a, d):
    """The same call through the plugins/triton launchers with their own GPU choices (one attention split)."""
    from v4compile.model.ops import visible_block_indices

    q, kv, start, ring = a[:4]
    T, csa = q.shape[1], op == "csa_attention"
    kvs, scs, kc = (t.clone() for t in a[9:12])
    compressor.compress_launch(*a[4:9], start, kvs, scs, kc, 4 if csa else d["m"], 1e-6, False)
    out = {"kv_state": kvs, "score_state": scs, "kv_cache": kc}
    pos = positions_of(start, T)
    if csa:
        ikvs, iscs, ic = (t.clone() for t in a[18:21])
        compressor.compress_launch(*a[14:18], a[8], start, ikvs, iscs, ic, 4, 1e-6, True)
        picks = indexer_topk.indexer_topk_launch(a[12], a[13], ic[:, :-1], pos, 4, d["topk"])
        out.update(picks=picks, idx_kv_state=ikvs, idx_score_state=iscs, idx_cache=ic)
    else:
        picks = visible_block_indices(pos, kc.shape[1] - 1, d["m"])
    out["out"] = sparse_attention.sparse_attention_launch(q, torch.cat((ring, kv), 1),
                                                          window_indices(start, T, ring.shape[1]), kc, picks,
                                                          a[-1], d["D"] ** -0.5, num_splits=1)
    return out

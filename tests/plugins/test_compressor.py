"""v4triton::compress against the v4::compress reference body (TRITON_INTERPRET on CPU).

Each case drives kernel and reference through the same sequence of chunks (prefill, single-token decode
steps, continuation chunks; sequences of the batch at different positions) and compares after every call:
the state rows exactly (pure data movement), the cache rows with the kernel tolerance of the path. The cache
starts NaN-poisoned, so a block the kernel fails to write shows as a NaN mismatch; the last cache row is the
reference's scratch row (it absorbs masked writes there) and must stay untouched (NaN) in the kernel's copy.
Quantised values are also counted: with fp32 or bf16 activations the kernel reproduces the reference's e4m3 /
e2m1 values exactly on the CPU (rounding is done on the bits); only RoPE channels differ by fp32 ulps (cos/sin).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math

import pytest
import torch

from v4compile.model import ops as v4ops
from v4compile.model.rope import rope_inv_freq
from v4compile.plugins.triton import compressor as ck
from v4compile.validate import assert_kernel_close

REF = v4ops.BODIES["compress"]


def _state(B, m, D, R, n_blocks, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    c = 2 if m == 4 else 1
    ape = torch.randn(m, c * D, generator=g)
    norm_w = (1 + 0.1 * torch.randn(D, generator=g)).to(dtype)
    inv_freq = rope_inv_freq(R, 160000.0, yarn=True, factor=16, original_seq_len=65536)
    kv_state = torch.zeros(B, c * m, c * D)
    score_state = torch.full((B, c * m, c * D), -math.inf)
    cache = torch.full((B, n_blocks + 1, D), float("nan"), dtype=dtype)
    return ape, norm_w, inv_freq, [kv_state, score_state, cache], g


def _drive(B, m, D, R, rotate, chunks, dtype, n_blocks=40, seed=0, starts=None):
    ape, norm_w, inv_freq, ref_st, g = _state(B, m, D, R, n_blocks, dtype, seed)
    ker_st = [t.clone() for t in ref_st]
    c = 2 if m == 4 else 1
    start = torch.tensor(starts if starts is not None else [0] * B, dtype=torch.int64)
    prec = "fp32" if dtype == torch.float32 else "bf16"
    for step, T in enumerate(chunks):
        kv = torch.randn(B, T, c * D, generator=g)
        gate = torch.randn(B, T, c * D, generator=g) * 2
        REF(kv, gate, ape, norm_w, inv_freq, start, *ref_st, m, 1e-6, rotate)
        ck.compress_launch(kv, gate, ape, norm_w, inv_freq, start, *ker_st, m, 1e-6, rotate)
        what = f"m={m} D={D} rotate={rotate} {dtype} step {step} (T={T})"
        assert torch.equal(ker_st[0], ref_st[0]), f"{what}: kv_state differs"
        assert torch.equal(ker_st[1], ref_st[1]), f"{what}: score_state differs"
        assert torch.isnan(ker_st[2][:, -1]).all(), f"{what}: scratch row written"
        out, ref = ker_st[2][:, :-1], ref_st[2][:, :-1]
        assert_kernel_close(out, ref, prec, what)
        quant = slice(None) if rotate else slice(0, D - R)  # channels that went through e4m3 / e2m1
        fin = torch.isfinite(ref[..., quant])
        flips = int((out[..., quant][fin] != ref[..., quant][fin]).sum())
        assert flips == 0, f"{what}: {flips} quantised values differ"
        start = start + T
    return ker_st


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_csa_main_prefill_then_decode(dtype):
    _drive(2, 4, 128, 64, False, [13, 1, 1, 1, 3, 9], dtype, starts=[0, 2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_csa_indexer_rotated_fp4(dtype):
    _drive(2, 4, 64, 32, True, [7, 1, 1, 2, 11], dtype, starts=[0, 5])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hca_awkward_width(dtype):
    _drive(3, 16, 96, 32, False, [37, 1, 1, 10, 20], dtype, starts=[0, 3, 15])


def test_hca_ratio_128_and_flash_width():
    _drive(1, 128, 512, 64, False, [129, 127, 1], torch.bfloat16, n_blocks=4)


def test_csa_flash_width_decode():
    _drive(1, 4, 512, 64, False, [3, 1, 1, 5], torch.bfloat16, n_blocks=3)


def test_blocks_past_capacity_are_dropped():
    """n_blocks = 2: blocks 2.. complete but have no row; nothing may land in the scratch row."""
    st = _drive(1, 4, 96, 32, False, [13, 4], torch.float32, n_blocks=2)
    assert torch.isfinite(st[2][:, :2]).all()


def test_registered_op_mutates_in_place():
    ape, norm_w, inv_freq, st, g = _state(1, 4, 96, 32, 8, torch.float32, 0)
    kv, gate = torch.randn(1, 8, 192, generator=g), torch.randn(1, 8, 192, generator=g)
    torch.ops.v4triton.compress(kv, gate, ape, norm_w, inv_freq, torch.zeros(1, dtype=torch.long), *st, 4, 1e-6,
                                False)
    assert torch.isfinite(st[2][0, :2]).all() and torch.isnan(st[2][0, 2:]).all()
    assert torch.isinf(st[1][0, 4:]).all() and torch.equal(st[0][0, :4], kv[0, 4:8])


@pytest.mark.parametrize("change,match", [
    (dict(ape=torch.zeros(4, 100)), "ape must be"),
    (dict(kv_state=torch.zeros(1, 8, 64)), "kv_state must be"),
    (dict(gate_proj=torch.zeros(1, 4, 64)), "one shape"),
    (dict(rotate=True, D=96), "power-of-two D"),
    (dict(R=48), r"\(D - R\) % 64"),
])
def test_compress_input_errors(change, match):
    D = change.pop("D", 128)
    R = change.pop("R", 32)
    args = dict(kv_proj=torch.zeros(1, 4, 2 * D), gate_proj=torch.zeros(1, 4, 2 * D), ape=torch.zeros(4, 2 * D),
                norm_weight=torch.ones(D), inv_freq=torch.ones(R // 2), start_pos=torch.zeros(1, dtype=torch.long),
                kv_state=torch.zeros(1, 8, 2 * D), score_state=torch.zeros(1, 8, 2 * D),
                cache=torch.zeros(1, 5, D), ratio=4, norm_eps=1e-6, rotate=False)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        ck.compress_launch(**args)
    assert not ck.supports_compress(*args.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs a CUDA GPU and TRITON_INTERPRET=0")
@pytest.mark.parametrize("m,D,rotate", [(4, 512, False), (4, 128, True), (128, 512, False)])
def test_compress_gpu_exact(m, D, rotate):
    """Real widths on the GPU against the reference run on the same device: states exact, cache within the fp8
    tolerance, and (softmax / rsqrt differ by ulps between torch and Triton) fewer than 1% rounding flips."""
    dev = torch.device("cuda")
    B, c = 4, 2 if m == 4 else 1
    g = torch.Generator(device=dev).manual_seed(0)
    ape = torch.randn(m, c * D, device=dev, generator=g)
    norm_w = torch.ones(D, device=dev, dtype=torch.bfloat16)
    inv_freq = rope_inv_freq(64, 160000.0, yarn=True, factor=16, original_seq_len=65536, device=dev)
    st = [torch.zeros(B, c * m, c * D, device=dev), torch.full((B, c * m, c * D), -math.inf, device=dev),
          torch.full((B, 65, D), float("nan"), device=dev, dtype=torch.bfloat16)]
    st2 = [t.clone() for t in st]
    start = torch.tensor([0, 1, 2, 3], device=dev)
    for T in (1000, 1, 1, 3):
        kv = torch.randn(B, T, c * D, device=dev, generator=g)
        gate = torch.randn(B, T, c * D, device=dev, generator=g)
        REF(kv, gate, ape, norm_w, inv_freq, start, *st, m, 1e-6, rotate)
        torch.ops.v4triton.compress(kv, gate, ape, norm_w, inv_freq, start, *st2, m, 1e-6, rotate)
        assert torch.equal(st[0], st2[0]) and torch.equal(st[1], st2[1])
        assert_kernel_close(st2[2][:, :-1], st[2][:, :-1], "fp8", f"compress gpu m={m}")
        written = torch.isfinite(st[2][:, :-1])
        flips = int((st2[2][:, :-1][written] != st[2][:, :-1][written]).sum())
        assert flips <= 0.01 * int(written.sum()), f"{flips} of {int(written.sum())} cache values differ"
        start = start + T


# ------------------------------------------------------------------------ production layout (compress_packed)

REF_PACKED = v4ops.BODIES["compress_packed"]


def _drive_packed(B, m, D, R, rotate, chunks, n_blocks=40, seed=0, starts=None):
    """Kernel and reference v4::compress_packed through the same chunks: states equal, the data and scale bytes of
    every written row equal (nope codes, scale bytes and FP4 codes exactly; the bf16 RoPE values within the bf16
    kernel tolerance: cos / sin may differ in the last fp32 bit, which can move a bf16 rounding), the scratch rows
    and unwritten rows untouched (poisoned 0xAB)."""
    g = torch.Generator().manual_seed(seed)
    c = 2 if m == 4 else 1
    ape = torch.randn(m, c * D, generator=g)
    norm_w = (1 + 0.1 * torch.randn(D, generator=g)).to(torch.bfloat16)
    inv_freq = rope_inv_freq(R, 160000.0, yarn=True, factor=16, original_seq_len=65536)
    width, sw = (D // 2, D // 32) if rotate else (D + R, 8)
    ref = [torch.zeros(B, c * m, c * D), torch.full((B, c * m, c * D), -math.inf),
           torch.full((B, n_blocks + 1, width), 0xAB, dtype=torch.uint8),
           torch.full((B, n_blocks + 1, sw), 0xAB, dtype=torch.uint8)]
    ker = [t.clone() for t in ref]
    start = torch.tensor(starts if starts is not None else [0] * B, dtype=torch.int64)
    written = torch.zeros(B, n_blocks, dtype=torch.bool)
    for step, T in enumerate(chunks):
        kv = torch.randn(B, T, c * D, generator=g)
        gate = torch.randn(B, T, c * D, generator=g) * 2
        REF_PACKED(kv, gate, ape, norm_w, inv_freq, start, *ref, m, 1e-6, rotate)
        ck.compress_packed_launch(kv, gate, ape, norm_w, inv_freq, start, *ker, m, 1e-6, rotate)
        what = f"packed m={m} D={D} rotate={rotate} step {step} (T={T})"
        assert torch.equal(ker[0], ref[0]) and torch.equal(ker[1], ref[1]), f"{what}: states differ"
        for b in range(B):
            done = (int(start[b]) + T) // m
            written[b, :min(done, n_blocks)] = True
        assert (ker[2][:, -1] == 0xAB).all() and (ker[3][:, -1] == 0xAB).all(), f"{what}: scratch row written"
        assert (ker[2][:, :-1][~written] == 0xAB).all(), f"{what}: a row of an incomplete block was written"
        data, ref_data = ker[2][:, :-1][written], ref[2][:, :-1][written]
        assert torch.equal(ker[3][:, :-1][written], ref[3][:, :-1][written]), f"{what}: scale bytes differ"
        exact = slice(None) if rotate else slice(0, D - R)  # FP4 codes / e4m3 nope codes
        assert torch.equal(data[:, exact], ref_data[:, exact]), f"{what}: codes differ"
        if not rotate:  # RoPE as bf16: the kernel tolerance
            bits = [t[:, D - R:].reshape(-1, R, 2).to(torch.int32) for t in (data, ref_data)]
            val = [(x[..., 0] | (x[..., 1] << 8)).to(torch.int16).view(torch.bfloat16).float() for x in bits]
            assert_kernel_close(val[0], val[1], "bf16", f"{what} rope")
        start = start + T
    assert written.any()
    return ker


def test_packed_csa_main_prefill_then_decode():
    _drive_packed(2, 4, 128, 64, False, [13, 1, 1, 1, 3, 9], starts=[0, 2])


def test_packed_indexer_keys_fp4():
    _drive_packed(2, 4, 64, 32, True, [7, 1, 1, 2, 11], starts=[0, 5])


def test_packed_hca_awkward_width_tiny_rope():
    """D 96 = 64 nope + 32 RoPE (the tiny presets' narrower RoPE): two 64-blocks, the second padding only."""
    _drive_packed(3, 16, 96, 32, False, [37, 1, 1, 10, 20], starts=[0, 3, 15])


def test_packed_flash_widths():
    _drive_packed(1, 4, 512, 64, False, [3, 1, 1, 5], n_blocks=3)
    _drive_packed(1, 128, 512, 64, False, [129, 127, 1], n_blocks=4)
    _drive_packed(1, 4, 128, 64, True, [9, 1, 3], n_blocks=3)


def test_packed_rows_decode_to_the_act_kernels_entries():
    """The packed kernel stores exactly the encoding of what v4triton::compress writes into a bf16 cache."""
    from v4compile.quant.kv_layout import unpack_kv_rows

    g = torch.Generator().manual_seed(3)
    B, m, D, R, N = 2, 4, 128, 64, 6
    ape = torch.randn(m, 2 * D, generator=g)
    norm_w = torch.ones(D, dtype=torch.bfloat16)
    inv_freq = rope_inv_freq(R, 10000.0, yarn=False)
    st = [torch.zeros(B, 2 * m, 2 * D), torch.full((B, 2 * m, 2 * D), -math.inf)]
    kv, gate = torch.randn(B, 17, 2 * D, generator=g), torch.randn(B, 17, 2 * D, generator=g)
    act = torch.full((B, N + 1, D), float("nan"), dtype=torch.bfloat16)
    data, scale = torch.zeros(B, N + 1, D + R, dtype=torch.uint8), torch.zeros(B, N + 1, 8, dtype=torch.uint8)
    start = torch.zeros(B, dtype=torch.long)
    st2 = [t.clone() for t in st]
    ck.compress_launch(kv, gate, ape, norm_w, inv_freq, start, *st, act, m, 1e-6, False)
    ck.compress_packed_launch(kv, gate, ape, norm_w, inv_freq, start, *st2, data, scale, m, 1e-6, False)
    decoded = unpack_kv_rows(data[:, :4], scale[:, :4], R)
    assert torch.equal(decoded, act[:, :4]), "packed rows do not decode to the bf16 kernel's entries"


def test_packed_registered_op_and_input_errors():
    D, R = 128, 64
    args = dict(kv_proj=torch.zeros(1, 4, 2 * D), gate_proj=torch.zeros(1, 4, 2 * D), ape=torch.zeros(4, 2 * D),
                norm_weight=torch.ones(D), inv_freq=torch.ones(R // 2), start_pos=torch.zeros(1, dtype=torch.long),
                kv_state=torch.zeros(1, 8, 2 * D), score_state=torch.full((1, 8, 2 * D), -math.inf),
                cache=torch.zeros(1, 3, D + R, dtype=torch.uint8), cache_scale=torch.zeros(1, 3, 8, dtype=torch.uint8),
                ratio=4, norm_eps=1e-6, rotate=False)
    assert ck.supports_compress_packed(*args.values())
    torch.ops.v4triton.compress_packed(*args.values())
    assert (args["cache_scale"][0, 0, :1] > 0).all() and (args["cache"][0, 1:] == 0).all()
    for change, match in ((dict(cache=torch.zeros(1, 3, D, dtype=torch.uint8)), "cache must be uint8"),
                          (dict(cache_scale=torch.zeros(1, 3, 8)), "cache_scale must be uint8"),
                          (dict(cache_scale=torch.zeros(1, 4, 8, dtype=torch.uint8)), "same rows"),
                          (dict(ape=torch.zeros(4, 100)), "ape must be")):
        bad = {**args, **change}
        with pytest.raises(ValueError, match=match):
            ck.compress_packed_launch(**bad)
        assert not ck.supports_compress_packed(*bad.values())


_TRACE_SCRIPT = """
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from v4compile.plugins.triton import compressor as ck
B, T, D, R, m = 2, 5, 128, 64, 4
args = (torch.randn(B, T, 2 * D), torch.randn(B, T, 2 * D), torch.randn(m, 2 * D), torch.ones(D).bfloat16(),
        torch.ones(R // 2), torch.zeros(B, dtype=torch.long), torch.zeros(B, 2 * m, 2 * D),
        torch.zeros(B, 2 * m, 2 * D), torch.zeros(B, 9, D + R, dtype=torch.uint8), torch.zeros(B, 9, 8, dtype=torch.uint8))
gm = make_fx(lambda *a: ck.compress_packed_launch(*a, m, 1e-6, False), tracing_mode="fake")(*args)
print(",".join(str(n.target) for n in gm.graph.nodes if n.op == "call_function"))
"""


def test_packed_tracing_records_both_passes_as_wrap_triton_nodes():
    """Traced (fake tensors, as torch.export sees it) the packed compressor is two wrap_triton launches: pool into
    the byte caches, then the state pass. A subprocess without TRITON_INTERPRET (interpreted kernels cannot be
    traced); nothing executes, so no GPU is needed."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _TRACE_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    targets = res.stdout.strip().splitlines()[-1].split(",")
    assert targets.count("triton_kernel_wrapper_mutation") == 2, targets


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs a CUDA GPU and TRITON_INTERPRET=0")
@pytest.mark.parametrize("m,D,rotate", [(4, 512, False), (4, 128, True), (128, 512, False)])
def test_compress_packed_gpu_matches_the_reference(m, D, rotate):
    """Real widths on the GPU against v4::compress_packed run on the same device: states exact; the rows decode
    to the reference's within the fp8 tolerance, and (softmax / rsqrt differ by ulps between torch and Triton)
    fewer than 1% of the decoded values differ; scratch rows untouched."""
    from v4compile.quant.kv_layout import unpack_index_rows, unpack_kv_rows

    dev = torch.device("cuda")
    B, c, R = 4, 2 if m == 4 else 1, 64
    g = torch.Generator(device=dev).manual_seed(0)
    ape = torch.randn(m, c * D, device=dev, generator=g)
    norm_w = torch.ones(D, device=dev, dtype=torch.bfloat16)
    inv_freq = rope_inv_freq(R, 160000.0, yarn=True, factor=16, original_seq_len=65536, device=dev)
    width, sw = (D // 2, D // 32) if rotate else (D + R, 8)
    st = [torch.zeros(B, c * m, c * D, device=dev), torch.full((B, c * m, c * D), -math.inf, device=dev),
          torch.zeros(B, 65, width, device=dev, dtype=torch.uint8), torch.zeros(B, 65, sw, device=dev, dtype=torch.uint8)]
    st2 = [t.clone() for t in st]
    st2[2][:, -1], st2[3][:, -1] = 0xAB, 0xAB
    start = torch.tensor([0, 1, 2, 3], device=dev)
    for T in (1000, 1, 1, 3):
        kv = torch.randn(B, T, c * D, device=dev, generator=g)
        gate = torch.randn(B, T, c * D, device=dev, generator=g)
        REF_PACKED(kv, gate, ape, norm_w, inv_freq, start, *st, m, 1e-6, rotate)
        torch.ops.v4triton.compress_packed(kv, gate, ape, norm_w, inv_freq, start, *st2, m, 1e-6, rotate)
        assert torch.equal(st[0], st2[0]) and torch.equal(st[1], st2[1])
        assert (st2[2][:, -1] == 0xAB).all() and (st2[3][:, -1] == 0xAB).all()
        dec = [unpack_index_rows(t[2][:, :-1], t[3][:, :-1], torch.float32) if rotate else
               unpack_kv_rows(t[2][:, :-1], t[3][:, :-1], R, torch.float32) for t in (st2, st)]
        assert_kernel_close(dec[0], dec[1], "fp8", f"compress_packed gpu m={m}")
        flips = int((dec[0] != dec[1]).sum())
        assert flips <= 0.01 * dec[1].numel(), f"{flips} of {dec[1].numel()} decoded values differ"
        start = start + T


@pytest.mark.parametrize("m", [4, 16])
def test_a_step_inside_a_block_rewrites_only_its_token_row(m):
    """The state pass writes only the rows of the chunk's tokens when no block boundary is crossed: every other row
    keeps what it holds (here a sentinel), and the new row equals the reference's; a block-completing step rewrites
    all rows."""
    D, R, B = 128, 64, 1
    c = 2 if m == 4 else 1
    ape, norm_w, inv_freq, st, g = _state(B, m, D, R, 8, torch.float32, 1)
    start = torch.tensor([1])
    kv, gate = torch.randn(B, 1, c * D, generator=g), torch.randn(B, 1, c * D, generator=g)
    ref = [t.clone() for t in st]
    REF(kv, gate, ape, norm_w, inv_freq, start, *ref, m, 1e-6, False)
    row = (c - 1) * m + 1  # position 1's row
    sentinel = [t.clone() for t in st]
    for t in sentinel[:2]:
        t[:, [i for i in range(c * m) if i != row]] = 7.0
    ck.compress_launch(kv, gate, ape, norm_w, inv_freq, start, *sentinel, m, 1e-6, False)
    for k in (0, 1):
        assert torch.equal(sentinel[k][:, row], ref[k][:, row])
        others = [i for i in range(c * m) if i != row]
        assert (sentinel[k][:, others] == 7.0).all(), "a row outside the chunk was rewritten"
    done = [t.clone() for t in st]  # completing step (position m - 1): the new block's rows are all rewritten
    for t in done[:2]:
        t[:] = 7.0
    ck.compress_launch(kv, gate, ape, norm_w, inv_freq, torch.tensor([m - 1]), *done, m, 1e-6, False)
    assert (done[1][:, (c - 1) * m:] == -math.inf).all()


def test_compressor_kernels_compile_for_sm90_without_spills():
    """scripts/ptxas_report.py compiles every compressor kernel (and the mHC Sinkhorn and FP8 linear ones) at V4-Flash widths for sm_90
    with triton's compiler and ptxas (no GPU needed): all compile, none spills."""
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "ptxas_report.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("_")]
    assert len(lines) == 11, res.stdout
    assert all("0 bytes spill stores" in ln and "registers" in ln for ln in lines), res.stdout

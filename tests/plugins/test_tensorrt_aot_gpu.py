"""AOT TensorRT plugins on the GPU (sm_90, no TensorRT): the binaries of plugins/tensorrt/aot.compile_plan launched
with TensorRT's argument list and the plans' grids (Triton's launcher for the CompiledKernel) against the fused ops'
reference bodies, and against the plugins/triton launchers' own launches. Run: TRITON_INTERPRET=0 pytest -m gpu."""

import json
import os

import pytest
import torch

from aot_cases import FLASH, TINY, _attrs, _drive, _launcher_outputs, _random_call
from v4compile.plugins.tensorrt import aot
from v4compile.plugins.tensorrt.specs import SPECS
from v4compile.targets import trt_ops

GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (sm_90) with TRITON_INTERPRET=0: runs the AOT-compiled PTX")
@pytest.mark.parametrize("op,d,dtype,chunks,starts", [
    ("csa_attention", TINY, torch.float32, [13, 1, 9, 1], [0, 4]),
    ("hca_attention", TINY, torch.float32, [21, 1, 12], [0, 16]),
    ("csa_attention", FLASH, torch.bfloat16, [1500, 1, 300], [0, 2048]),
    ("hca_attention", FLASH, torch.bfloat16, [1500, 1, 300], [0, 2048]),
])
def test_aot_compiled_kernels_on_the_gpu_match_reference(op, d, dtype, chunks, starts):
    """The binaries compile_plan produces, launched with TensorRT's argument list and the plans' grids (no
    TensorRT: triton's launcher for the CompiledKernel), against the reference bodies on the GPU."""
    strict = dtype == torch.float32
    with aot.compiled_launches():
        worst = _drive(op, chunks, starts, d=d, dtype=dtype, device="cuda", strict=strict)
    print(f"\nGPU {op} {'tiny' if d is TINY else 'flash'} {dtype}: {json.dumps(worst)}")
    assert worst["nonfinite"] == 0, worst
    if not strict:  # bf16: summation-order noise can flip near-tied picks; gate on the model-level table
        from v4compile.validate import TOLERANCES

        assert worst["overlap"] >= TOLERANCES["model_indexer_overlap"]["bf16"], worst
        assert worst["o"] < TOLERANCES["model_hidden"]["bf16"] and worst["caches"] < 1e-3, worst


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (sm_90) with TRITON_INTERPRET=0: runs the AOT-compiled PTX")
@pytest.mark.parametrize("op", ["csa_attention", "hca_attention"])
def test_aot_plans_equal_the_launchers_on_the_gpu(op):
    """V4-Flash shapes, bf16, prefill then decode, against the plugins/triton launchers' own launches: the entry
    kernels with the plans' grids / arguments under Triton's JIT are bit-equal; the AOT binaries (compiled without
    the JIT's integer specialisations) are equal up to rounding (measured: 5 of 1M CSA cache values one bf16 ulp
    apart, calc_diff 7e-11; attention output calc_diff 4e-9), picks and states exactly."""
    from v4compile.validate import calc_diff, nonfinite_mismatch

    g, spec = torch.Generator().manual_seed(5), SPECS[op]
    names = [n if n == "out" else n.removesuffix("_out") for n in spec.output_names]
    state = None
    for T in (1500, 1):
        a = _random_call(op, FLASH, torch.bfloat16, [0, 2048] if T > 1 else [1500, 3548], T, g, state)
        want = _launcher_outputs(op, a, FLASH)
        with aot.poisoned():
            jit = dict(zip(names, trt_ops.AOT_BODIES[op](*a, *_attrs(op, FLASH))))
        with aot.compiled_launches(), aot.poisoned():
            res = trt_ops.AOT_BODIES[op](*a, *_attrs(op, FLASH))
        compiled = dict(zip(names, res))
        for name, ref in want.items():
            assert torch.equal(jit[name], ref), f"{op} T={T}: {name} (jit entry) differs from the launcher's"
            got = compiled[name]
            if ref.dtype.is_floating_point and name not in ("kv_state", "score_state", "idx_kv_state",
                                                             "idx_score_state"):
                diff = calc_diff(got, ref)
                print(f"\nGPU {op} T={T} {name}: AOT binary vs launcher calc_diff {diff:.3g}, "
                      f"{int((got != ref).sum())} of {ref.numel()} values differ")
                assert diff < 1e-8 and nonfinite_mismatch(got, ref) == 0, (op, T, name, diff)
            else:
                assert torch.equal(got, ref), f"{op} T={T}: {name} (AOT binary) differs from the launcher's"
        state = list(res[spec.n_results:])

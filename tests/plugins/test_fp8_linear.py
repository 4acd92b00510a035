"""v4triton::fp8_linear against the v4::fp8_linear reference body (TRITON_INTERPRET on CPU)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from v4compile.model import ops as v4ops
from v4compile.plugins.triton import fp8_linear as fl
from v4compile.quant.formats import quant_fp8_block
from v4compile.validate import assert_kernel_close

REF = v4ops.BODIES["fp8_linear"]
pytestmark = pytest.mark.usefixtures("exact_interpreter_casts")  # e4m3 casts as the GPU rounds them (conftest.py)


def _weights(O, K, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(O, K, generator=g) * torch.logspace(-2, 1, O).unsqueeze(1)  # scales spread over the rows
    q, s = quant_fp8_block(w, (128, 128), scale_fmt="fp32")
    return q, s.float()


@pytest.mark.parametrize("lead,K,O,config", [((1,), 256, 200, None), ((2, 3), 128, 64, None),
                                             ((70,), 256, 136, None), ((70,), 256, 136, fl.LinearConfig(16, 32, 4, 2)),
                                             ((5,), 384, 256, fl.LinearConfig(64, 128, 4, 3))])
def test_fp8_linear_matches_the_reference(lead, K, O, config):
    w, s = _weights(O, K, K + O)
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(*lead, K, generator=g) * torch.logspace(-3, 2, K)).bfloat16()  # channels of many magnitudes
    want = REF(x, w, s)
    got = fl.fp8_linear_launch(x, w, s, config)
    assert got.shape == want.shape and got.dtype == x.dtype and torch.isfinite(got).all()
    assert_kernel_close(got, want, "fp8", f"fp8_linear {lead} K={K} O={O}")


def test_registered_op_and_non_contiguous_rows():
    w, s = _weights(64, 128, 1)
    x = torch.randn(128, 6, generator=torch.Generator().manual_seed(2)).bfloat16().t()  # [6, 128], stride (1, 6)
    assert_kernel_close(torch.ops.v4triton.fp8_linear(x, w, s), REF(x, w, s), "fp8", "fp8_linear op")


@pytest.mark.parametrize("change,match", [
    (dict(x=torch.zeros(2, 128)), "bf16 / fp16"),
    (dict(weight=torch.zeros(64, 128)), "float8_e4m3fn"),
    (dict(x=torch.zeros(2, 100).bfloat16(), weight=torch.zeros(64, 100).to(torch.float8_e4m3fn)), "multiple of 128"),
    (dict(scale=torch.ones(1, 2)), "scale must be float32"),
    (dict(scale=torch.ones(1, 1).to(torch.float8_e8m0fnu)), "scale must be float32"),
])
def test_input_errors(change, match):
    args = dict(x=torch.zeros(2, 128).bfloat16(), weight=torch.zeros(64, 128).to(torch.float8_e4m3fn),
                scale=torch.ones(1, 1))
    args.update(change)
    with pytest.raises(ValueError, match=match):
        fl.fp8_linear_launch(**args)
    assert not fl.supports_fp8_linear(*args.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs a CUDA GPU and TRITON_INTERPRET=0")
@pytest.mark.parametrize("M", [1, 8, 64, 4096])
def test_fp8_linear_gpu_at_flash_widths(M):
    """V4-Flash's wq_b shape (1024 -> 64 x 512) and a d x d one, decode and prefill rows, against the reference."""
    for O, K in ((32768, 1024), (4096, 4096)):
        g = torch.Generator(device="cuda").manual_seed(M)
        w, s = quant_fp8_block(torch.randn(O, K, device="cuda", generator=g) * 0.02, (128, 128), scale_fmt="fp32")
        x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
        assert_kernel_close(fl.fp8_linear_launch(x, w, s.float()), REF(x, w, s.float()), "fp8",
                            f"fp8_linear gpu M={M} {O}x{K}")


def test_flash_shapes_select_the_kernel_on_gpu_targets():
    """Decided on FakeTensors that claim a CUDA device: V4-Flash's wq_b (1024 -> 32768) at decode picks the kernel
    on h100 / h200 with float32 scales (GPU targets widen UE8M0); e8m0 scales, K % 128 != 0 and the cpu target
    fall back to the reference body."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    import v4compile.plugins.triton  # noqa: F401 - registers the kernels
    from v4compile.plugins.registry import lookup

    mode = FakeTensorMode()

    def fake(*shape, dtype):
        return FakeTensor(mode, torch.empty(shape, dtype=dtype, device="meta"), torch.device("cuda"))

    x, w, s = fake(4, 1, 1024, dtype=torch.bfloat16), fake(32768, 1024, dtype=torch.float8_e4m3fn), \
        fake(256, 8, dtype=torch.float32)
    for target in ("h100", "h200"):
        entry = lookup("v4::fp8_linear", target, x, w, s)
        assert entry is not None and entry.name == "v4triton::fp8_linear"
    assert lookup("v4::fp8_linear", "h200", x, w, fake(256, 8, dtype=torch.float8_e8m0fnu)) is None
    assert lookup("v4::fp8_linear", "h200", fake(1, 1000, dtype=torch.bfloat16),
                  fake(64, 1000, dtype=torch.float8_e4m3fn), fake(1, 8, dtype=torch.float32)) is None
    assert lookup("v4::fp8_linear", "cpu", x, w, s) is None

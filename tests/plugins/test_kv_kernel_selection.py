"""Kernel selection for the production-layout ops at V4-Flash shapes (decode, batch 4, 64K context), decided on
FakeTensors that claim a CUDA device (no GPU here, nothing runs): v4::sparse_attention_fp8 and
v4::indexer_scores_fp4 pick their Triton kernels on h100 / h200; shapes the kernels cannot take (the tiny
presets' 32 RoPE dims, CPU tensors, fp32 q) fall back to the reference bodies (lookup None)."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import v4compile.plugins.triton  # noqa: F401 - registers the kernels
from v4compile.model.config import ModelConfig
from v4compile.plugins.registry import lookup

FLASH = ModelConfig.preset("flash")
B, T, CTX = 4, 1, 1 << 16


@pytest.fixture(scope="module")
def fake():
    mode = FakeTensorMode()

    def make(*shape, dtype, device="cuda"):
        return FakeTensor(mode, torch.empty(shape, dtype=dtype, device="meta"), torch.device(device))

    return make


def attention_args(fake, head_dim=FLASH.head_dim, rope=FLASH.rope_head_dim, q_dtype=torch.bfloat16, device="cuda"):
    H, W, u8 = FLASH.n_heads, FLASH.window_size, torch.uint8
    row = head_dim + rope  # nope e4m3 bytes + 2 bytes per bf16 RoPE dim
    n2 = CTX // 4 + 1
    return (fake(B, T, H, head_dim, dtype=q_dtype, device=device),
            fake(B, W + T, row, dtype=u8, device=device), fake(B, W + T, 8, dtype=u8, device=device),
            fake(B, T, W, dtype=torch.int32, device=device),
            fake(B, n2, row, dtype=u8, device=device), fake(B, n2, 8, dtype=u8, device=device),
            fake(B, T, FLASH.index_topk, dtype=torch.int32, device=device),
            fake(H, dtype=torch.float32, device=device), head_dim ** -0.5)


def indexer_args(fake, q_dtype=torch.bfloat16, device="cuda"):
    Hi, Di, N = FLASH.index_n_heads, FLASH.index_head_dim, CTX // 4
    return (fake(B, T, Hi, Di, dtype=q_dtype, device=device), fake(B, T, Hi, dtype=torch.bfloat16, device=device),
            fake(B, N, Di // 2, dtype=torch.uint8, device=device),
            fake(B, N, Di // 32, dtype=torch.uint8, device=device),
            fake(B, T, dtype=torch.int64, device=device), 4)


@pytest.mark.parametrize("target", ["h100", "h200"])
def test_flash_shapes_select_the_triton_kernels(fake, target):
    assert FLASH.head_dim == 512 and FLASH.rope_head_dim == 64
    entry = lookup("v4::sparse_attention_fp8", target, *attention_args(fake))
    assert entry is not None and entry.name == "v4triton::sparse_attention_fp8"
    assert entry.fn is torch.ops.v4triton.sparse_attention_fp8.default
    entry = lookup("v4::indexer_scores_fp4", target, *indexer_args(fake))
    assert entry is not None and entry.name == "v4triton::indexer_scores_fp4"


def test_what_the_kernels_cannot_take_falls_back(fake):
    assert lookup("v4::sparse_attention_fp8", "h200", *attention_args(fake, head_dim=96, rope=32)) is None  # tiny
    assert lookup("v4::sparse_attention_fp8", "h200", *attention_args(fake, device="cpu")) is None
    assert lookup("v4::sparse_attention_fp8", "h200", *attention_args(fake, q_dtype=torch.float32)) is None
    assert lookup("v4::sparse_attention_fp8", "cpu", *attention_args(fake)) is None  # cpu decomposes every op
    assert lookup("v4::indexer_scores_fp4", "h200", *indexer_args(fake, q_dtype=torch.float16)) is None


def compress_packed_args(fake, ratio, rotate, D, rope=FLASH.rope_head_dim, scale_rows=None):
    """v4::compress_packed's arguments at decode (T = 1) for a cache of CTX positions."""
    c = 2 if ratio == 4 else 1
    f32, u8, n = torch.float32, torch.uint8, CTX // ratio + 1
    width, sw = (D // 2, D // 32) if rotate else (D + rope, 8)
    return (fake(B, T, c * D, dtype=f32), fake(B, T, c * D, dtype=f32), fake(ratio, c * D, dtype=f32),
            fake(D, dtype=torch.bfloat16), fake(rope // 2, dtype=f32), fake(B, dtype=torch.int64),
            fake(B, c * ratio, c * D, dtype=f32), fake(B, c * ratio, c * D, dtype=f32),
            fake(B, n, width, dtype=u8), fake(B, scale_rows or n, sw, dtype=u8), ratio, 1e-6, rotate)


@pytest.mark.parametrize("ratio,rotate,D", [(4, False, FLASH.head_dim), (4, True, FLASH.index_head_dim),
                                            (128, False, FLASH.head_dim)])
def test_compress_packed_selects_its_triton_kernel(fake, ratio, rotate, D):
    entry = lookup("v4::compress_packed", "h200", *compress_packed_args(fake, ratio, rotate, D))
    assert entry is not None and entry.name == "v4triton::compress_packed"
    assert entry.fn is torch.ops.v4triton.compress_packed.default
    assert lookup("v4::compress_packed", "h200", *compress_packed_args(fake, ratio, rotate, D, scale_rows=7)) is None
    assert lookup("v4::compress_packed", "cpu", *compress_packed_args(fake, ratio, rotate, D)) is None

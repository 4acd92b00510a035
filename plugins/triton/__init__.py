"""Triton kernels as torch.library.triton_op, each next to its launcher and torch reference.

Importing this package registers every kernel with plugins/registry (the GPU targets' lowering imports it).
"""

from v4compile.plugins.triton import (compressor, fp8_linear, indexer_topk, mhc, moe_gemm, moe_route,  # noqa: F401
                                     sparse_attention)

"""Number formats (e4m3, e2m1, UE8M0), block quantisation, repacking and quantisation passes.

The pass exports are lazy (PEP 562): the model imports quant.formats, and quant.passes imports the model (via
graph.capture), so importing the passes eagerly here would be an import cycle.
"""

from __future__ import annotations

_PASSES = ("quantize_moe_experts", "rewrite_moe_experts", "moe_quant_report", "MoEQuantReport", "TensorQuantReport")
_REPACK = ("repack_mxfp4_to_fp8", "quantize_bf16_to_fp8", "verify_repack", "LossyRepackError", "RepackReport",
           "QuantReport")

__all__ = [*_PASSES, *_REPACK]


def __getattr__(name: str):
    if name in _PASSES:
        from v4compile.quant import passes

        return getattr(passes, name)
    elif name in _REPACK:
        from v4compile.quant import repack

        return getattr(repack, name)
    else:
        raise AttributeError(f"module 'v4compile.quant' has no attribute {name!r}")

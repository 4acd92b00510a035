"""Fuse an RMSNorm into the FP8 linears that consume it: v4::rms_norm_fp8_linear per consumer.

Only where EVERY consumer of the norm is an FP8 linear (e.g. q_norm feeding wq_b and the indexer's wq_b):
the norm node then disappears and each kernel normalises and FP8-quantises its input in registers. A norm
that also feeds anything else (MoE router, float compressor projections) stays unfused.
"""

from __future__ import annotations

import logging

from torch import fx

from v4compile.graph.capture import Captured
from v4compile.graph.passes._common import v4
from v4compile.graph.pattern import Any, Match, P, rewrite, rules
from v4compile.model.config import ModelConfig

log = logging.getLogger(__name__)

_NORM = P(v4.rms_norm, Any("x"), Any("norm_weight"), Any("eps"), name="norm")
_PATTERN = P(v4.fp8_linear, _NORM, Any("weight"), Any("scale"))


def _norm_linear(m: Match) -> dict[str, fx.Node] | None:
    norm = m["norm"]
    if any(u.target is not v4.fp8_linear.default or u.args[0] is not norm or norm in u.args[1:] for u in norm.users):
        return None
    return {"root": m.call(v4.rms_norm_fp8_linear.default, m["x"], m["norm_weight"], m["eps"], m["weight"],
                           m["scale"])}


RULES = rules(
    "fuse_norm_into_linear_quant",
    (_PATTERN, _norm_linear),  # fp8_linear(rms_norm(x, w, eps), W, s) == rms_norm_fp8_linear(x, w, eps, W, s)
)


def fuse_norm_into_linear_quant(g: Captured, cfg: ModelConfig) -> Captured:
    """Rewrite fp8_linear(rms_norm(x)) into v4::rms_norm_fp8_linear where the norm feeds only FP8 linears."""
    n = rewrite(g.graph_module, RULES)
    log.info("fuse_norm_into_linear_quant: %d rms_norm_fp8_linear nodes", n)
    return g

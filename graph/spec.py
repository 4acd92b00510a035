"""What a legal intermediate graph is after each stage (STYLE.md item 4); `verify_graph` raises GraphSpecError.

Always: the FX graph lints; every call_function is an OpOverload (aten / v4) or a getitem / symbolic-int
helper; every node that returns a value carries meta['val']; each cache input of a main layer is written
by exactly one node and the MTP blocks' caches (not run by these entry points) by none. After each pass,
the ops it replaces are gone (cumulatively) and the fused ops number what the config says (in either cache
layout: csa_attention or csa_attention_fp8, and so on). After
quantize_moe_experts every v4::moe_experts node reads e4m3 expert weights with e8m0 / f32 block scales.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from v4compile.errors import ExportError
from v4compile.graph.capture import Captured
from v4compile.graph.passes._common import mutated_args, op_name, user_input

_SYM_HELPERS = {operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod,
                operator.neg, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge}

GONE_AFTER: dict[str, tuple[str, ...]] = {
    "fuse_mhc": ("v4.hc_mix", "v4.sinkhorn", "v4.hc_collapse"),
    "fuse_csa_attention": ("v4.indexer_scores", "v4.indexer_scores_fp4", "v4.topk_select"),
    "fuse_hca_attention": ("v4.compress", "v4.compress_packed", "v4.ring_write"),
}
"""Pass -> ops that may no longer appear once that pass has run (ring_write survives for window layers: see
_check_counts)."""


_FUSED_ATTENTION = (torch.ops.v4.csa_attention.default, torch.ops.v4.hca_attention.default,
                    torch.ops.v4.csa_attention_fp8.default, torch.ops.v4.hca_attention_fp8.default)
_LAYOUT_VARIANTS = {"v4.csa_attention": ("v4.csa_attention", "v4.csa_attention_fp8"),
                    "v4.hca_attention": ("v4.hca_attention", "v4.hca_attention_fp8"),
                    "v4.sparse_attention": ("v4.sparse_attention", "v4.sparse_attention_fp8"),
                    "v4.hc_pre": ("v4.hc_pre",)}
"""Op -> its spellings in the two cache layouts (counted together against the config)."""


class GraphSpecError(ExportError):
    """A graph that breaks the contract of the stage it is in (names the pass, node, op, dtype and shape)."""


def describe(n: fx.Node) -> str:
    v = n.meta.get("val")
    vals = v if isinstance(v, (tuple, list)) else (v,)
    what = ", ".join(f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__ for t in vals)
    return f"node {n.name} ({op_name(n.target) if n.op == 'call_function' else n.op}, {what})"


def verify_graph(g: Captured, after: str | None) -> None:
    """Check `g` against the stage reached after pass `after` (None: freshly captured)."""
    from v4compile.graph.passes import PASS_ORDER

    stage = "capture" if after is None else after
    done = [] if after is None else PASS_ORDER[:PASS_ORDER.index(after) + 1]
    gm = g.graph_module
    try:
        gm.graph.lint()
    except Exception as e:
        raise GraphSpecError(f"after {stage}: the graph does not lint: {e}") from e
    for n in gm.graph.nodes:
        _check_node(n, stage)
    _check_cache_writers(g, stage)
    for p in done:
        for n in gm.graph.nodes:
            if n.op == "call_function" and op_name(n.target) in GONE_AFTER.get(p, ()) \
                    and not _window_ring_write(n, g):
                raise GraphSpecError(f"after {stage}: {describe(n)} should have been fused by {p}")
    _check_counts(g, stage, done)
    if "quantize_moe_experts" in done:
        _check_fp8_experts(g, stage)


def _check_node(n: fx.Node, stage: str) -> None:
    if n.op != "call_function":
        return
    if not isinstance(n.target, torch._ops.OpOverload) and n.target not in _SYM_HELPERS:
        raise GraphSpecError(f"after {stage}: {n.name} calls {n.target!r}, not an aten / v4 op overload")
    schema = getattr(n.target, "_schema", None)
    returns = schema is None or len(schema.returns) > 0
    if returns and n.target is not operator.getitem and "val" not in n.meta:
        raise GraphSpecError(f"after {stage}: {describe(n)} has no meta['val'] (a pass forgot fake propagation)")
    if n.target in _FUSED_ATTENTION:
        q, out = n.args[0].meta["val"], n.meta["val"]
        out = out[0] if isinstance(out, (tuple, list)) else out  # csa_attention: (o, picks)
        if out.dtype != q.dtype or out.shape != q.shape:
            raise GraphSpecError(f"after {stage}: {describe(n)}: expected q's {q.dtype} {list(q.shape)}")


def _cache_inputs(g: Captured) -> dict[str, fx.Node]:
    sig = g.program.graph_signature
    return {name: user_input(g.graph_module, sig, 2 + i) for i, name in enumerate(g.cache_names)}


def _check_cache_writers(g: Captured, stage: str) -> None:
    writers: dict[fx.Node, list[fx.Node]] = {}
    for n in g.graph_module.graph.nodes:
        for a in mutated_args(n):
            writers.setdefault(a, []).append(n)
    for name, ph in _cache_inputs(g).items():
        block = int(name.split(".")[1])
        want = 1 if block < g.cfg.n_layers else 0
        got = writers.get(ph, [])
        if len(got) != want:
            who = ", ".join(describe(w) for w in got) or "no node"
            raise GraphSpecError(f"after {stage}: cache input {name} ({describe(ph)}) is written by {who}; "
                                 f"expected {want} writer(s)")


def _window_ring_write(n: fx.Node, g: Captured) -> bool:
    """ring_write of a window-only layer (no fused form yet): legal at every stage."""
    if n.target is not torch.ops.v4.ring_write.default:
        return False
    names = {ph: name for name, ph in _cache_inputs(g).items()}
    block = int(names.get(n.args[0], "blocks.-1.ring").split(".")[1])
    return block >= 0 and g.cfg.compress_ratios[block] == 0


def _check_counts(g: Captured, stage: str, done: list[str]) -> None:
    from v4compile.graph.passes._common import op_counts

    cfg, counts = g.cfg, op_counts(g.graph_module)
    kinds = [cfg.layer_kind(i) for i in range(cfg.n_layers)]
    want = {}
    if "fuse_csa_attention" in done:
        want["v4.csa_attention"] = kinds.count("csa")
    if "fuse_hca_attention" in done:
        want["v4.hca_attention"] = kinds.count("hca")
        want["v4.sparse_attention"] = kinds.count("window")
    if "fuse_mhc" in done:
        want["v4.hc_pre"] = 2 * cfg.n_layers
    for op, n in want.items():
        got = sum(counts[v] for v in _LAYOUT_VARIANTS[op])
        if got != n:
            raise GraphSpecError(f"after {stage}: {got} {' / '.join(_LAYOUT_VARIANTS[op])} nodes; the config has {n} "
                                 f"(layer kinds {kinds})")


_EXPERT_ARGS = (("w1", 3), ("w3", 5), ("w2", 7))  # v4::moe_experts argument index of each weight (scale next)


def _check_fp8_experts(g: Captured, stage: str) -> None:
    """No v4::moe_experts node may read BF16 / FP4 (or any non-e4m3) expert weights after quantize_moe_experts."""
    for n in g.graph_module.graph.nodes:
        if n.op != "call_function" or n.target is not torch.ops.v4.moe_experts.default:
            continue
        stack = n.meta.get("nn_module_stack") or {}
        layer = next(reversed(stack.values()))[0] if stack else "?"
        for name, i in _EXPERT_ARGS:
            w, s = n.args[i].meta.get("val"), n.args[i + 1].meta.get("val")
            if not isinstance(w, torch.Tensor) or w.dtype != torch.float8_e4m3fn or not isinstance(s, torch.Tensor) \
                    or s.dtype not in (torch.float8_e8m0fnu, torch.float32):
                raise GraphSpecError(f"after {stage}: {describe(n)} of {layer} reads {name} expert weights "
                                     f"{n.args[i].name} ({_what(w)}) with scale {_what(s)}; after quantize_moe_experts "
                                     "expert weights must be float8_e4m3fn with float8_e8m0fnu / float32 block scales")


def _what(t) -> str:
    return f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__

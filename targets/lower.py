"""Lowering a captured entry point for a target: every v4 op node gets an implementation, then the graph is
re-exported so that only aten ops (cpu) or aten + registry kernels (GPU targets) remain.

Each v4 node's target is swapped for a plain-Python callable (the op's reference body, a cpu rewrite, or a
registry kernel) and the unlifted module is exported again: tracing the bodies yields aten ops, and their
in-place cache writes become input mutations of the new program (so the AOTInductor model updates the caches
it is given). `ExportedProgram.run_decompositions({op: body})` does not work here (torch 2.13): bodies of
mutating ops are traced under functionalization and trip "expected an entirely functional graph".

cpu steps, in order: fold_weight_dequant (FP8/FP4 weights of the linears and experts dequantised once),
fold_constants (the rest of the weight-only math, e.g. compressor projections), swap v4 nodes for bodies,
export, drop_size_oblivious_asserts. GPU targets (registry policy) skip the two folds, widen UE8M0 scales to
float32 (widen_e8m0_constants) and compose fused ops without a kernel of their own from their parts' kernels.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.fx.experimental._config as fx_config
from torch import Tensor
from torch.export import Dim, ExportedProgram

from v4compile.errors import ExportError, UnsupportedOpError
from v4compile.graph.capture import Captured
from v4compile.graph.fused_ops import FUSED_BODIES
from v4compile.model import ops as v4ops
from v4compile.model.ops import BODIES
from v4compile.targets.base import Target
from v4compile.targets.const_fold import fold_constants
from v4compile.targets.cpu_fold import fold_weight_dequant

log = logging.getLogger(__name__)


def moe_experts_dense(x: Tensor, weights: Tensor, ids: Tensor, w1: Tensor, s1: Tensor, w3: Tensor, s3: Tensor,
                      w2: Tensor, s2: Tensor, swiglu_limit: float) -> Tensor:
    """v4::moe_experts without data-dependent shapes: every expert runs on every token, unrouted rows are
    masked out. Bit-identical to the reference body: activation quantisation is per row, experts are added
    in ascending order, and each token's routing weight for e is one nonzero term (ids are distinct)."""
    N, d = x.shape
    y = torch.zeros(N, d, dtype=torch.float32, device=x.device)
    xin = v4ops._expert_input(x, w1)
    for e in range(w1.shape[0]):
        hit = ids == e  # [N, k]
        w_e = torch.where(hit, weights.float(), 0.0).sum(-1, keepdim=True)
        h = v4ops.swiglu(v4ops._expert_mm(xin, w1[e], v4ops._at(s1, e), x.dtype),
                         v4ops._expert_mm(xin, w3[e], v4ops._at(s3, e), x.dtype), swiglu_limit)
        out = v4ops.expert_linear((h * w_e).to(x.dtype), w2[e], v4ops._at(s2, e)).float()
        y = y + torch.where(hit.any(-1, keepdim=True), out, 0.0)
    return y


CPU_OVERRIDES: dict[str, Callable] = {"moe_experts": moe_experts_dense}
"""Ops whose reference body has data-dependent shapes (cannot be exported with dynamic sizes)."""


def sinkhorn_loop(logits: Tensor, iters: int, eps: float) -> Tensor:
    """v4::sinkhorn with its iters - 1 row / column steps in one `while_loop` instead of unrolled: the same ops
    in the same order (eager results bit-identical to the reference body), but the cpu program holds one loop body
    instead of 19 copies, about 1 000 fewer graph nodes for the 4-layer demo model, which is what AOTInductor's
    time on the cpu target scales with. cpu only: on a GPU the loop condition would be read on the host.
    The loop carries [N, hc, hc] (leading dims flattened): with [B, T, hc, hc] the loop's stride checks assume
    B, T != 1 and the compiled program refused T = 1 at run time (measured)."""
    from torch._higher_order_ops.while_loop import while_loop

    lead, hc = logits.shape[:-2], logits.shape[-2:]
    m = torch.softmax(logits.float().reshape(-1, *hc), dim=-1) + eps
    m = m / (m.sum(-2, keepdim=True) + eps)

    def cond(i: Tensor, m: Tensor) -> Tensor:
        return i < iters - 1

    def body(i: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
        m = m / (m.sum(-1, keepdim=True) + eps)
        return i + 1, m / (m.sum(-2, keepdim=True) + eps)

    return while_loop(cond, body, (torch.zeros((), dtype=torch.int64, device=m.device), m))[1].reshape(*lead, *hc)


NESTED: dict[str, tuple[str, ...]] = {"hc_pre": ("sinkhorn",)}
"""Unfused ops whose reference bodies call primitives through model.ops BODIES: on registry targets those
primitives are resolved through the kernel registry while exporting (hc_pre's Sinkhorn gets v4triton::sinkhorn),
and the manifest lists the op as composed of them."""

CPU_LOOP_BODIES: dict[str, Callable] = {"sinkhorn": sinkhorn_loop}
"""Bodies the cpu target (decompose policy) traces instead of the reference's, also where another body calls
them through BODIES (hc_pre calls sinkhorn): same numerics, smaller graphs."""


@contextlib.contextmanager
def _bodies_replaced(replacements: dict[str, Callable]) -> Iterator[None]:
    saved = {name: BODIES[name] for name in replacements}
    BODIES.update(replacements)
    try:
        yield
    finally:
        BODIES.update(saved)


def reference_impl(name: str) -> Callable:
    """The export-friendly plain-torch implementation of v4 op `name` (no namespace)."""
    if name in CPU_OVERRIDES:
        return CPU_OVERRIDES[name]
    elif name in BODIES:
        return BODIES[name]
    elif name in FUSED_BODIES:
        return FUSED_BODIES[name]
    else:
        raise UnsupportedOpError(f"v4::{name} has no reference body to decompose")


@contextlib.contextmanager
def _whole_chunk_bodies() -> Iterator[None]:
    """The bodies split queries into memory-bounded chunks with a Python loop over range(T), which would
    specialise the symbolic length; traced graphs take the whole call as one chunk (Inductor plans memory).
    Safe: the chunks are independent query slices. Remove when ops._query_chunks is shape-symbolic."""
    saved = v4ops._query_chunks
    v4ops._query_chunks = lambda T, per_query: [(0, T)]
    try:
        yield
    finally:
        v4ops._query_chunks = saved


_SIZE_OBLIVIOUS = re.compile(r"expression Ne\((.+), [01]\) on node")


def drop_size_oblivious_asserts(program: ExportedProgram) -> int:
    """Remove the runtime asserts `Ne(size, 1)` / `Ne(size // m, 0)` that backed_size_oblivious records.

    They say "this graph took the path for sizes >= 2" in contiguity and broadcast checks; for the dims in
    question (batch, chunk length, complete blocks) that path computes the same values at size 1, which the
    cpu engine tests check against eager at B = 1, T = 1 and T < ratio. Returns the number removed.
    """
    g = program.graph
    dropped = 0
    for node in list(g.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten._assert_scalar.default:
            msg = node.args[1] if len(node.args) > 1 else ""
            if isinstance(msg, str) and _SIZE_OBLIVIOUS.search(msg):
                g.erase_node(node)
                dropped += 1
    g.eliminate_dead_code()
    program.graph_module.recompile()
    return dropped


def drop_export_noise(program: ExportedProgram) -> int:
    """Remove what export records for `.to()` calls and AOTInductor does not need: `_assert_tensor_metadata`
    checks (the dtype / device of a value in a fixed program) and `aten.to.dtype` nodes whose input already has
    that dtype (they return the input itself). The demo model's cpu prefill has ~1 270 of each; AOTInductor
    re-traces every node, so they cost compile time and nothing else. Returns the number removed."""
    g = program.graph
    dropped = 0
    for node in list(g.nodes):
        if node.op != "call_function":
            continue
        if node.target is torch.ops.aten._assert_tensor_metadata.default:
            g.erase_node(node)
            dropped += 1
        elif node.target is torch.ops.aten.to.dtype and len(node.args) == 2 and not node.kwargs:
            src, out = node.args[0], node.meta.get("val")
            src_val = src.meta.get("val") if isinstance(src, torch.fx.Node) else None
            mutated = any(u.op == "call_function" and isinstance(u.target, torch._ops.OpOverload)
                          and u.target._schema.is_mutable for u in node.users)
            if isinstance(out, Tensor) and isinstance(src_val, Tensor) and out.dtype == src_val.dtype \
                    and not mutated:
                node.replace_all_uses_with(src)
                g.erase_node(node)
                dropped += 1
    g.eliminate_dead_code()
    program.graph_module.recompile()
    return dropped


@dataclass
class Lowered:
    """One entry point after lowering: an aten (+ registry kernels) program and which impl each op got."""

    entry: str
    program: ExportedProgram
    kernels: dict[str, str]  # "v4::op" -> implementation name or "reference"


class _KernelTable(dict):
    """BODIES-like table for a fused op's body on a registry target: each primitive the body calls is looked
    up in the kernel registry with the arguments it is traced with (FakeTensors during export), falling back to
    the primitive's reference body; `chosen` records what every primitive got."""

    def __init__(self, target: Target) -> None:
        super().__init__()
        self.target, self.current = target, "?"
        self.chosen: dict[str, dict[str, set[str]]] = {}  # fused op -> primitive -> implementations

    def composed(self, name: str) -> Callable:
        """The fused op's body (or an unfused op's body that calls NESTED primitives), noting which op the
        primitives it calls belong to."""
        body = FUSED_BODIES.get(name) or BODIES[name]

        def fn(*args, **kwargs):
            self.current = name
            return body(*args, **kwargs)

        return fn

    def dispatch(self, name: str, fallback: Callable) -> Callable:
        """Primitive `name` through the registry, else `fallback`; records the choice under the current op."""
        from v4compile.plugins import registry

        def call(*args, **kwargs):
            entry = registry.lookup(f"v4::{name}", self.target.name, *args, **kwargs)
            fn, label = (entry.fn, entry.name) if entry is not None else (fallback, "reference")
            self.chosen.setdefault(self.current, {}).setdefault(name, set()).add(label)
            return fn(*args, **kwargs)

        return call

    def nested(self) -> dict[str, Callable]:
        """BODIES replacements for NESTED's primitives (the reference bodies captured now, as fallbacks)."""
        return {name: self.dispatch(name, BODIES[name]) for names in NESTED.values() for name in names}

    def __missing__(self, name: str) -> Callable:
        return self.dispatch(name, reference_impl(name))


@contextlib.contextmanager
def _fused_bodies_using(table: dict) -> Iterator[None]:
    """The fused ops' bodies (graph/fused_ops.py) call their primitives through the module-level BODIES table:
    while lowering for a registry target it is swapped for a _KernelTable, so tracing a fused body yields the
    registry kernels of its parts (e.g. csa_attention -> compress, indexer_scores, topk_select, sparse_attention
    kernels) instead of their reference bodies."""
    from v4compile.graph import fused_ops

    saved = fused_ops.BODIES
    fused_ops.BODIES = table
    try:
        yield
    finally:
        fused_ops.BODIES = saved


def widen_e8m0_constants(gm: torch.fx.GraphModule) -> int:
    """Replace every float8_e8m0fnu constant (UE8M0 weight scales) by the same values in float32.

    Exact: each e8m0 byte is a power of two 2^-127..2^127 (NaN stays NaN), all float32 values, and every op
    body and kernel accepts float32 scales; code that reads the raw bytes (`view(torch.uint8)`) gets a uint8
    copy instead. Needed for GPU targets: AOTInductor of torch 2.11 has no e8m0 dtype
    in its C++ runtime (`aoti_torch_dtype_float8_e8m0fnu` undeclared: measured on the H200). Returns how many."""
    widened = 0
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        *path, attr = str(node.target).split(".")
        owner = gm
        for part in path:
            owner = getattr(owner, part)
        value = getattr(owner, attr, None)
        if not isinstance(value, Tensor) or value.dtype != torch.float8_e8m0fnu:
            continue
        for user in list(node.users):  # model code that reads the raw bytes (view as uint8) gets a uint8 copy
            if user.op == "call_function" and user.target is torch.ops.aten.view.dtype and user.args[1] == torch.uint8:
                owner.register_buffer(f"{attr}_bytes", value.view(torch.uint8).clone())
                with gm.graph.inserting_before(user):
                    raw = gm.graph.get_attr(f"{node.target}_bytes")
                raw.meta = dict(user.meta)
                user.replace_all_uses_with(raw)
                gm.graph.erase_node(user)
        wide = value.float()
        if attr in owner._parameters:
            del owner._parameters[attr]
            owner.register_buffer(attr, wide)
        elif attr in owner._buffers:
            owner._buffers[attr] = wide
        else:
            setattr(owner, attr, wide)
        widened += 1
        for user in list(node.users):  # export's dtype assertion before `.float()` would now fail
            if user.op == "call_function" and user.target is torch.ops.aten._assert_tensor_metadata.default:
                gm.graph.erase_node(user)
    if widened:
        gm.recompile()
    return widened


def _choose(node: torch.fx.Node, target: Target, table: _KernelTable | None) -> tuple[Callable, str]:
    name = node.target._opname
    if target.kernel_policy == "decompose":
        return CPU_LOOP_BODIES.get(name) or reference_impl(name), "reference"
    elif target.kernel_policy == "registry":
        from v4compile.plugins import registry  # GPU targets only: the runtime and cpu path never import plugins

        _, op, args, kwargs = registry.node_call(node)
        entry = registry.lookup(op, target.name, *args, **kwargs)
        if entry is not None:
            return entry.fn, entry.name
        elif (name in FUSED_BODIES or name in NESTED) and table is not None:
            return table.composed(name), "composed"  # its parts resolved through `table` while exporting
        return reference_impl(name), "reference"
    else:
        raise UnsupportedOpError(f"target {target.name}: unknown kernel policy {target.kernel_policy!r}")


def _composed_names(kernels: dict[str, str], table: _KernelTable) -> None:
    """Replace each "composed" manifest entry by the implementations its parts got, e.g.
    "composed: compress=v4triton::compress, sparse_attention=v4triton::sparse_attention"."""
    for op, impl in kernels.items():
        if impl == "composed":
            parts = table.chosen.get(op.split("::")[-1], {})
            kernels[op] = "composed: " + ", ".join(f"{k}={'/'.join(sorted(v))}" for k, v in sorted(parts.items()))


def lower(g: Captured, target: Target, example: tuple[Tensor, ...], max_batch: int) -> Lowered:
    """Swap every v4 node for its implementation on `target` and re-export with dynamic batch (and length for
    prefill); `example` = (tokens, start_pos, *caches) sized so no dim is 0/1-specialised."""
    if target.kernel_policy == "registry":
        import v4compile.plugins.triton  # noqa: F401 - registers the Triton kernels
    try:
        gm = g.program.module(check_guards=False)
    except TypeError:  # torch < 2.13 has no check_guards argument
        gm = g.program.module()
    kernels: dict[str, str] = {}
    counts: Counter[str] = Counter()
    table = _KernelTable(target) if target.kernel_policy == "registry" else None
    if target.kernel_policy == "registry":
        counts["e8m0 scales widened to float32"] = widen_e8m0_constants(gm)
    if target.kernel_policy == "decompose":
        for op in fold_weight_dequant(gm):
            kernels[op] = "reference (weights dequantised at build)"
            counts[op] += 1
        counts["constant subgraphs folded"] = fold_constants(gm)
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "v4":
            op = f"v4::{node.target._opname}"
            node.target, kernels[op] = _choose(node, target, table)
            counts[op] += 1
    gm.recompile()
    b = Dim("batch", min=1, max=max_batch)
    tok = {0: b, 1: Dim("seq", min=1, max=g.max_len)} if g.entry != "decode" else {0: b}  # prefill, trace
    dynamic = (tok, {0: b}, *({0: b} for _ in g.cache_names))
    try:
        # backed_size_oblivious: contiguity checks must not specialise sizes that can be 1 (e.g. the number of
        # compressed blocks a short chunk can complete); deferred asserts: always-true divisibility guards of
        # reshapes sympy cannot prove become runtime checks instead of export errors.
        with torch.no_grad(), _whole_chunk_bodies(), fx_config.patch(backed_size_oblivious=True), \
                _fused_bodies_using(table if table is not None else BODIES), \
                _bodies_replaced(CPU_LOOP_BODIES if target.kernel_policy == "decompose" else
                                 table.nested() if table is not None else {}):
            program = torch.export.export(gm, example, dynamic_shapes=dynamic,
                                          prefer_deferred_runtime_asserts_over_guards=True)
    except Exception as e:  # torch raises many unrelated types here; surface one typed error
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"lowering the {g.entry} entry point for target {target.name} failed: "
                          f"{type(e).__name__}: {first}") from e
    left = sorted({str(n.target) for n in program.graph.nodes if n.op == "call_function"
                   and isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "v4"})
    if target.kernel_policy == "decompose" and left:
        raise UnsupportedOpError(f"target {target.name}: v4 ops left after decomposition: {', '.join(left)}")
    if table is not None:
        _composed_names(kernels, table)
    dropped = drop_size_oblivious_asserts(program)
    noise = drop_export_noise(program)
    log.info("lowered %s for %s: %s (%d size-oblivious asserts, %d metadata asserts / no-op casts dropped)",
             g.entry, target.name, dict(counts), dropped, noise)
    return Lowered(g.entry, program, kernels)

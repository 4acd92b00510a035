"""torch.export capture of the reference model's entry points (DESIGN.md sections 2 and 6).

Both entry points take `(tokens [B, T] int64, start_pos [B] int64, *cache tensors)` and return logits
f32 [B, T, V]; the caches (`Cache.named_tensors()` order, MTP blocks included) are graph inputs that the
graph updates in place. Prefill has a dynamic batch and length, decode one token per sequence and a
dynamic batch; "trace" is prefill that also returns the per-layer data `v4compile validate` compares
(`trace_outputs`: every layer's mHC streams, every CSA layer's indexer picks, every MoE layer's expert ids).
The cache capacity (`max_len`) is fixed per capture. start_pos is a tensor, so no graph
specialises on a position. torch.export's default (training) IR keeps each v4 op, mutating ones
included, as one node. On the meta device the capture runs on fake weights (structure checks only).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.export import Dim, ExportedProgram

from v4compile.errors import ExportError, InputError
from v4compile.graph import fused_ops  # noqa: F401 - registers the fused ops (needed to load fused graphs)
from v4compile.model.cache import Cache, LayerCache
from v4compile.model.config import ModelConfig
from v4compile.model.reference import ReferenceModel

log = logging.getLogger(__name__)

ENTRY_POINTS = ("prefill", "decode", "trace")


def trace_outputs(cfg: ModelConfig) -> list[str]:
    """Output names of the trace entry point, in order: logits, hidden.{i}, indexer.{csa i}, experts.{i}."""
    csa = [i for i in range(cfg.n_layers) if cfg.layer_kind(i) == "csa"]
    return (["logits"] + [f"hidden.{i}" for i in range(cfg.n_layers)] + [f"indexer.{i}" for i in csa]
            + [f"experts.{i}" for i in range(cfg.n_layers)])


class EntryPoint(nn.Module):
    """`(tokens, start_pos, *caches) -> logits`: the reference model with its cache passed as flat tensors."""

    def __init__(self, model: ReferenceModel, cache_names: list[str], max_len: int) -> None:
        super().__init__()
        self.model, self.cache_names, self.max_len = model, list(cache_names), max_len

    def forward(self, tokens: Tensor, start_pos: Tensor, *caches: Tensor) -> Tensor:
        return self.model(tokens, start_pos, self.cache_from(caches, tokens.shape[0]))

    def cache_from(self, caches: tuple[Tensor, ...], batch) -> Cache:
        """Rebuild the model's Cache object around the flat tensors (no copies)."""
        cfg = self.model.cfg
        per_block: list[dict[str, Tensor]] = [{} for _ in range(cfg.n_blocks)]
        for name, t in zip(self.cache_names, caches, strict=True):
            _, block, fld = name.split(".")
            per_block[int(block)][fld] = t
        layers = [LayerCache(ratio=cfg.compress_ratios[i], **fields) for i, fields in enumerate(per_block)]
        return Cache(layers=layers, batch=batch, max_len=self.max_len, dtype=self.model.act_dtype,
                     device=self.model.device)


class TraceEntryPoint(EntryPoint):
    """`(tokens, start_pos, *caches) -> (logits, *per-layer tensors)` in `trace_outputs(cfg)` order."""

    def forward(self, tokens: Tensor, start_pos: Tensor, *caches: Tensor) -> tuple[Tensor, ...]:
        trace: dict = {}
        logits = self.model(tokens, start_pos, self.cache_from(caches, tokens.shape[0]), trace=trace)
        out = [logits]
        for name in trace_outputs(self.model.cfg)[1:]:
            kind, i = name.split(".")
            out.append(trace[kind][int(i)])
        return tuple(out)


@dataclass
class Captured:
    """One exported entry point and what a caller needs to feed it."""

    entry: str  # "prefill" | "decode" | "trace"
    program: ExportedProgram
    cfg: ModelConfig
    cache_names: list[str]
    max_len: int

    @property
    def kv_layout(self) -> str:
        """The cache layout the entry point was captured with (model/cache.py), read off the cache names."""
        return "production" if any(n.endswith(".ring_scale") for n in self.cache_names) else "reference"

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        return self.program.graph_module

    def module(self) -> nn.Module:
        """A callable `(tokens, start_pos, *caches) -> logits` running the (possibly rewritten) graph."""
        return self.program.module()


def example_len(cfg: ModelConfig, max_len: int) -> int:
    """Example prefill length for lowering: past two blocks of the largest compress ratio, odd (so no
    divisibility guard is specialised), within max_len."""
    want = 2 * max([*cfg.compress_ratios, 2]) + 3
    return max(2, min(want, max_len - 1))


def example_inputs(model: ReferenceModel, entry: str, batch: int, seq: int, max_len: int,
                   kv_layout: str = "reference") -> tuple[Tensor, ...]:
    """Example (tokens, start_pos, *caches) for an entry point: zeros, on the model's device; caches in
    `kv_layout` (model/cache.py)."""
    dev = model.device
    T = _entry_len(entry, seq)
    cache = model.new_cache(batch, max_len, kv_layout)
    tokens = torch.zeros(batch, T, dtype=torch.int64, device=dev)
    start_pos = torch.zeros(batch, dtype=torch.int64, device=dev)
    return (tokens, start_pos, *cache.named_tensors().values())


def _entry_len(entry: str, seq: int) -> int:
    if entry in ("prefill", "trace"):
        return seq
    elif entry == "decode":
        return 1
    else:
        raise InputError(f"entry point {entry!r}; expected one of {ENTRY_POINTS}")


def capture(model: ReferenceModel, entry: str = "prefill", *, max_len: int | None = None, batch: int = 2,
            seq: int = 8, kv_layout: str = "reference") -> Captured:
    """torch.export `model`'s `entry` point with caches of capacity `max_len` (default cfg.max_seq_len) in
    `kv_layout` ("reference" or "production": the cache inputs' names, dtypes and shapes, model/cache.py).

    `batch` / `seq` size the example inputs only (both dims are dynamic where the entry allows; they must be
    >= 2 so export does not specialise them). Raises ExportError naming the module and the reason.
    """
    cfg = model.cfg
    max_len = cfg.max_seq_len if max_len is None else max_len
    if batch < 2 or (entry != "decode" and not 2 <= seq <= max_len):
        raise InputError(f"capture example sizes batch={batch}, seq={seq}: need batch >= 2 and 2 <= seq <= "
                         f"max_len={max_len} (size-1 dims would be specialised)")
    args = example_inputs(model, entry, batch, seq, max_len, kv_layout)
    names = list(model.new_cache(1, max_len, kv_layout).named_tensors())
    wrapper = (TraceEntryPoint if entry == "trace" else EntryPoint)(model, names, max_len)
    b = Dim("batch", min=1, max=max(cfg.max_batch_size, batch))
    tok_dims = {0: b, 1: Dim("seq", min=1, max=max_len)} if entry != "decode" else {0: b}
    dynamic = (tok_dims, {0: b}, tuple({0: b} for _ in names))
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            program = torch.export.export(wrapper, args, dynamic_shapes=dynamic)
    except Exception as e:  # torch raises many unrelated types here; surface one typed error
        raise ExportError(f"torch.export of {type(model).__name__}'s {entry} entry point (dim {cfg.dim}, "
                          f"{cfg.n_layers} layers) failed: {_reason(e)}") from e
    log.info("captured %s in %.1fs (%d nodes)", entry, time.perf_counter() - t0, len(program.graph.nodes))
    captured = Captured(entry, program, cfg, names, max_len)
    if entry == "trace":
        # the model's trace also computes values no output uses (indexer scores, router scores); erased now,
        # their extra users would block fusions (remove_dead_code keeps every node that writes an input)
        from v4compile.graph.passes.remove_dead_code import remove_dead_code

        remove_dead_code(captured, cfg)
    return captured


def _reason(e: Exception) -> str:
    """Exception type, first message line and, when torch names it, the user source line that failed."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    where = next((ln for ln in lines if ln.startswith("File ") or "code:" in ln), None)
    head = f"{type(e).__name__}: {lines[0] if lines else ''}"
    return f"{head} (at {where.removeprefix('# ')})" if where else head


def capture_preset(preset: str | ModelConfig, entry: str = "prefill", *, dtype: torch.dtype = torch.float32,
                   device: str = "cpu", seed: int = 0, max_len: int | None = None) -> tuple[ReferenceModel, Captured]:
    """Build the seeded reference model of a preset (or config) and capture one entry point."""
    cfg = ModelConfig.preset(preset) if isinstance(preset, str) else preset
    model = ReferenceModel(cfg, dtype=dtype, device=device, seed=seed).eval()
    return model, capture(model, entry, max_len=max_len)


def can_serialize(dtype: torch.dtype) -> bool:
    """Whether this torch's export serializer knows `dtype` (float8_e8m0fnu: torch >= 2.13, not 2.11)."""
    from torch._export.serde import serialize

    return dtype in getattr(serialize, "_TORCH_TO_SERIALIZE_DTYPE", {dtype: None})


def save_graph(captured: Captured, path: str | Path) -> Path:
    """Write the exported program (a .pt2 file) so a build can resume from it."""
    path = Path(path)
    odd = sorted({str(v.dtype) for n in captured.graph_module.graph.nodes
                  if isinstance(v := n.meta.get("val"), torch.Tensor) and not can_serialize(v.dtype)})
    if odd:
        raise ExportError(f"torch {torch.__version__} cannot serialize graphs holding {', '.join(odd)} tensors "
                          "(torch.export.save's dtype table lacks them; torch 2.13 has them)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial.pt2")  # torch.export.save wants a .pt2 name
    torch.export.save(captured.program, tmp)
    tmp.replace(path)
    return path


def load_graph(path: str | Path) -> ExportedProgram:
    """Read a program written by save_graph (the v4 primitive and fused ops are registered by this module)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no saved graph at {path}")
    try:
        return torch.export.load(path)
    except Exception as e:
        raise ExportError(f"loading the exported graph {path} failed: {type(e).__name__}: {e}") from e

"""The Python runtime: load an engine directory, own its caches, run prefill / decode / generate.

An engine carries its kernels (model.pt2 holds the AOTInductor models "prefill" and "decode"); this module
imports nothing of the compiler (graph, plugins). Calling convention (engine contract): inputs
`(tokens int64 [B, T], start_pos int64 [B], *caches in manifest order)`, output logits f32 [B, T, V];
the caches are updated in place. A Session owns one cache set for `batch` sequence slots.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from v4compile.errors import EngineError, InputError
from v4compile.model.config import ModelConfig
from v4compile.runtime import manifest as mf
from v4compile.runtime.sampling import sample
from v4compile.runtime.weights import bind_weights, read_weights

log = logging.getLogger(__name__)

INPUT_ALIGN = 16
"""Bytes: a CUDA AOTInductor model assumes each tensor input starts at this alignment, and CLONES an input that does
not (torch/_inductor/codegen/cpp_wrapper_gpu.py, "Copying to an aligned tensor"), so its in-place writes to that
input are lost. Production-layout caches pad their rows so that every slot view (Session.rows) starts aligned
(model/cache.py SLOT_ALIGN_ROWS, since session 10); a view that does not (an engine built before, e.g. a uint8
scale cache of N rows x 8 B per slot, N odd) is staged (_staged), and its decode runs without a CUDA graph."""


@functools.cache
def _share_libstdcxx() -> None:
    """Put the process's libstdc++ into the global symbol scope before an AOTInductor model is dlopen'ed.

    Measured on the H200 (torch 2.11.0+cu130, g++ 13.3): CUDA wrapper .so files carry a static copy of
    libstdc++ (4 725 exported std:: symbols, no NEEDED libstdc++.so.6), and inside a Python process, where
    torch's extension modules load libstdc++ with RTLD_LOCAL, their std::regex / locale code mixed the two
    copies and segfaulted in `parse_device_str` while the container was created (every CUDA package, a
    one-Linear toy too). With libstdc++.so.6 global (as in a C++ program that links it: v4run loaded the same
    engine) every reference binds to the one shared copy. Harmless where the wrapper links libstdc++ itself."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL("libstdc++.so.6", mode=os.RTLD_GLOBAL)  # already mapped by torch: promotes it
    except OSError as e:  # no shared libstdc++ at all: nothing to share
        log.debug("libstdc++.so.6 not loadable (%s)", e)


def load_model(package: Path, name: str, device: torch.device, constants: dict[str, Tensor] | None = None) -> Any:
    """Load the AOTInductor model `name` of one package, and only it (torch's load_package loads every model
    of the archive on each call), single-threaded (no per-call locking; required for CUDA-graph capture), and
    bind `constants` {fqn: tensor} to it as user-managed tensors (the caller keeps them alive; engines keep their
    weights outside the models, runtime/weights.py; None: the package's .so holds its own constants). EngineError
    naming the model when the loader refuses or a constant is missing."""
    from torch._inductor.package.package import AOTICompiledModel

    _share_libstdcxx()
    index = device.index if device.type == "cuda" and device.index is not None else -1
    try:
        loader = torch._C._aoti.AOTIModelPackageLoader(str(package), name, True, 1, index)
    except Exception as e:  # the loader raises RuntimeError with long C++ traces
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EngineError(f"{package}: cannot load model {name!r}: {first}") from e
    if constants is not None:
        bind_weights(loader, name, constants)
    return AOTICompiledModel(loader)


@dataclass
class Session:
    """Cache tensors for `batch` sequence slots (manifest order) and each slot's next position."""

    batch: int
    caches: list[Tensor]
    layout: list[dict[str, Any]]
    positions: list[int] = field(default_factory=list)

    def reset(self, slots: int | Sequence[int] | None = None) -> None:
        """Restore the init values of these slots (all when None) so a reused slot starts fresh."""
        rows = range(self.batch) if slots is None else [slots] if isinstance(slots, int) else list(slots)
        for b in rows:
            if not 0 <= b < self.batch:
                raise InputError(f"slot {b} outside [0, {self.batch})")
            for t, entry in zip(self.caches, self.layout):
                t[b].fill_(mf.init_value(entry))
            self.positions[b] = 0

    def rows(self, slots: Sequence[int]) -> list[Tensor]:
        """Cache views of consecutive slots (contiguous, so a model call writes through them)."""
        lo, hi = min(slots), max(slots) + 1
        if list(slots) != list(range(lo, hi)):
            raise InputError(f"slots {list(slots)} must be consecutive")
        return [t[lo:hi] for t in self.caches]


@contextlib.contextmanager
def _staged(caches: list[Tensor]) -> Iterator[list[Tensor]]:
    """`caches` where every tensor starts at INPUT_ALIGN: a view that does not is replaced by an aligned copy for
    the call and copied back into the view after it (the model's in-place writes land). Yields the list itself
    when nothing needs staging."""
    copies = {i: t.clone() for i, t in enumerate(caches) if t.data_ptr() % INPUT_ALIGN}
    if not copies:
        yield caches
        return
    yield [copies.get(i, t) for i, t in enumerate(caches)]
    for i, c in copies.items():
        caches[i].copy_(c)


class Engine:
    """A loaded engine: `prefill`, `decode` and `generate` over Sessions (see module doc)."""

    def __init__(self, root: Path, manifest: dict[str, Any], models: dict[str, Any], device: torch.device,
                 weights: dict[str, dict[str, Tensor]] | None = None) -> None:
        self.root, self.manifest, self.models, self.device = root, manifest, models, device
        self.weights = weights or {}  # {model: {fqn: tensor}}: bound user-managed, so they live as long as we do
        self.cfg = ModelConfig.from_dict(manifest["config"])
        cache = manifest["cache"]
        self.max_batch, self.max_len, self.layout = int(cache["max_batch"]), int(cache["max_len"]), cache["tensors"]
        self.kv_layout = mf.kv_layout_of(manifest)  # "production" / "reference" (model/cache.py); tensors say how
        self.vocab_size = self.cfg.vocab_size
        self._decode_graphs: dict[tuple, _DecodeGraph] = {}
        # how decode runs on a GPU: "cuda-graph" (captured per batch size and cache set, replayed), or
        # "uncaptured (<why>)" after a capture failed, or when V4COMPILE_CUDA_GRAPHS=0
        self.decode_mode = ""
        self.use_cuda_graphs(os.environ.get("V4COMPILE_CUDA_GRAPHS", "1") != "0")

    def use_cuda_graphs(self, enabled: bool) -> None:
        """Decode through captured CUDA graphs (the default on a GPU) or plain launches; drops captured graphs."""
        self.decode_mode = "cuda-graph" if enabled else "uncaptured (off)"
        self._decode_graphs = {}

    # ------------------------------------------------------------------ sessions

    def new_session(self, batch: int) -> Session:
        """Zero / -inf initialised caches (per the manifest) for `batch` sequence slots."""
        if not isinstance(batch, int) or not 1 <= batch <= self.max_batch:
            raise InputError(f"session batch {batch!r}; this engine serves 1..{self.max_batch} sequences")
        caches = [torch.full((batch, *e["shape"][1:]), mf.init_value(e), dtype=mf.dtype_of(e["dtype"]),
                             device=self.device) for e in self.layout]
        return Session(batch, caches, self.layout, [0] * batch)

    # ------------------------------------------------------------------ model calls

    def prefill(self, tokens: Tensor, start_pos: Tensor | int, session: Session,
                slots: Sequence[int] | None = None) -> Tensor:
        """tokens [B, T] continuing each sequence from start_pos[b] -> logits f32 [B, T, V] (caches updated).
        slots: the session's consecutive slots these B rows use (default all)."""
        return self._call("prefill", tokens, start_pos, session, slots)

    def decode(self, tokens: Tensor, start_pos: Tensor | int, session: Session,
               slots: Sequence[int] | None = None) -> Tensor:
        """One token per sequence: tokens [B] or [B, 1] at start_pos[b] -> logits f32 [B, 1, V]."""
        if not isinstance(tokens, Tensor):
            raise InputError(f"decode tokens: expected an int tensor [B] or [B, 1], got {type(tokens).__name__}")
        if tokens.dim() == 1:
            tokens = tokens.unsqueeze(1)
        if tokens.dim() != 2 or tokens.shape[1] != 1:
            raise InputError(f"decode tokens: expected [B] or [B, 1], got {list(tokens.shape)}")
        return self._call("decode", tokens, start_pos, session, slots)

    def trace(self, tokens: Tensor, start_pos: Tensor | int = 0, session: Session | None = None,
              slots: Sequence[int] | None = None) -> dict[str, Any]:
        """Prefill through the engine's "trace" program (built with `--trace`): {"logits": f32 [B, T, V],
        "hidden": {layer: [B, T, hc, d]}, "indexer": {csa layer: int32 [B, T, k]}, "experts": {layer: [B, T, k]}}
        - the keys of the reference model's `trace` dict. session None: a fresh one (start_pos 0)."""
        spec = self.manifest["entry_points"].get("trace")
        if spec is None:
            raise EngineError(f"engine {self.root} has no trace program (build it with --trace / "
                              "build(..., trace=True))")
        if "trace" not in self.models:  # loaded on first use: only validation runs it
            constants = _constants(self.weights, "trace")
            self.models["trace"] = load_model(self.root / mf.PACKAGE, "trace", self.device, constants)
        if session is None:
            if not isinstance(tokens, Tensor) or tokens.dim() != 2:
                raise InputError(f"tokens: expected an int tensor [B, T], got {getattr(tokens, 'shape', type(tokens))}")
            session = self.new_session(int(tokens.shape[0]))
        slots = list(range(session.batch)) if slots is None else list(slots)
        tokens, sp = self._check(tokens, start_pos, len(slots))
        caches = session.caches if len(slots) == session.batch else session.rows(slots)
        with _staged(caches) as caches:
            outs = self.models["trace"](tokens, sp, *caches)
        names = spec["outputs"]
        if len(outs) != len(names):
            raise EngineError(f"trace program returned {len(outs)} tensors; the manifest lists {len(names)}")
        for b, e in zip(slots, (sp + tokens.shape[1]).tolist()):
            session.positions[b] = e
        result: dict[str, Any] = {"logits": outs[0]}
        for name, t in zip(names[1:], outs[1:]):
            kind, layer = name.split(".")
            result.setdefault(kind, {})[int(layer)] = t
        return result

    def _call(self, entry: str, tokens: Tensor, start_pos: Tensor | int, session: Session,
              slots: Sequence[int] | None) -> Tensor:
        slots = list(range(session.batch)) if slots is None else list(slots)
        tokens, sp = self._check(tokens, start_pos, len(slots))
        caches = session.caches if len(slots) == session.batch else session.rows(slots)
        with _staged(caches) as staged:
            if entry == "decode" and self.device.type == "cuda" and staged is caches:
                out = self._cuda_decode(tokens, sp, caches)
            else:  # prefill, or a decode on staged copies (a graph would be captured on temporaries)
                out = self.models[entry](tokens, sp, *staged)
        out = out[0] if isinstance(out, (list, tuple)) else out
        end = (sp + tokens.shape[1]).tolist()
        for b, e in zip(slots, end):
            session.positions[b] = e
        return out

    def _check(self, tokens: Tensor, start_pos: Tensor | int, batch: int) -> tuple[Tensor, Tensor]:
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype.is_floating_point:
            what = f"{tokens.dtype} {list(tokens.shape)}" if isinstance(tokens, Tensor) else type(tokens).__name__
            raise InputError(f"tokens: expected an int tensor [B, T], got {what}")
        B, T = tokens.shape
        if B != batch or T == 0:
            raise InputError(f"tokens {list(tokens.shape)}: expected {batch} sequence(s) of >= 1 token")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.vocab_size:
            raise InputError(f"token id {lo if lo < 0 else hi} outside [0, {self.vocab_size})")
        sp = torch.full((B,), start_pos) if isinstance(start_pos, int) else torch.as_tensor(start_pos).reshape(-1)
        if sp.shape[0] != B or sp.dtype.is_floating_point:
            raise InputError(f"start_pos: expected {B} int positions, got {sp.dtype} {list(sp.shape)}")
        if int(sp.min()) < 0 or int(sp.max()) + T > self.max_len:
            raise InputError(f"start_pos {sp.tolist()} + {T} tokens exceeds this engine's max_len {self.max_len}")
        dev = self.device
        return tokens.to(dev, torch.int64).contiguous(), sp.to(dev, torch.int64).contiguous()

    def _cuda_decode(self, tokens: Tensor, sp: Tensor, caches: list[Tensor]) -> Tensor:
        if self.decode_mode != "cuda-graph":
            return self.models["decode"](tokens, sp, *caches)
        key = (tokens.shape[0], tuple(t.data_ptr() for t in caches))
        graph = self._decode_graphs.get(key)
        if graph is None:
            self._decode_graphs = {}  # one captured graph at a time (it pins the session's caches)
            try:
                graph = _DecodeGraph(self.models["decode"], caches, tokens.shape[0], self.device)
            except RuntimeError as e:  # capture refused (e.g. a host sync in the program): run it uncaptured
                self.decode_mode = f"uncaptured ({str(e).strip().splitlines()[0][:200]})"
                log.warning("CUDA-graph capture of the decode step failed; decoding without graphs: %s", e)
                return self.models["decode"](tokens, sp, *caches)
            self._decode_graphs = {key: graph}
        return graph(tokens, sp)

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: list[list[int]], max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, stop_tokens: Sequence[int] | None = None, seed: int = 0) -> list[list[int]]:
        """New tokens for each prompt (stop token included when hit). Each prompt is prefilled alone in its own
        slot (no pad token ever reaches a cache), then all sequences decode together at their own positions."""
        self._check_prompts(prompts, max_new_tokens)
        stops = set((self.cfg.eos_token_id,) if stop_tokens is None else stop_tokens)
        gen = torch.Generator().manual_seed(seed)
        session = self.new_session(len(prompts))
        last = []
        for b, p in enumerate(prompts):
            logits = self.prefill(torch.tensor([p], dtype=torch.int64), 0, session, slots=[b])
            last.append(logits[0, -1])
        out: list[list[int]] = [[] for _ in prompts]
        done = [max_new_tokens == 0] * len(prompts)
        logits = torch.stack(last)
        for step in range(max_new_tokens):
            nxt = sample(logits.float().cpu(), temperature, top_p, gen)
            for b, t in enumerate(nxt.tolist()):
                if not done[b]:
                    out[b].append(t)
                    done[b] = t in stops or len(out[b]) == max_new_tokens
            if all(done) or step == max_new_tokens - 1:
                break
            pos = torch.tensor([len(p) + step for p in prompts], dtype=torch.int64)
            logits = self.decode(nxt.unsqueeze(1), pos, session)[:, 0]
        return out

    def _check_prompts(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, (list, tuple)) and p for p in prompts):
            raise InputError("prompts: expected a non-empty list of non-empty token id lists")
        if len(prompts) > self.max_batch:
            raise InputError(f"{len(prompts)} prompts; this engine serves at most {self.max_batch} at once")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise InputError(f"max_new_tokens {max_new_tokens!r}; expected an int >= 0")
        for i, p in enumerate(prompts):
            bad = [t for t in p if not isinstance(t, int) or not 0 <= t < self.vocab_size]
            if bad:
                raise InputError(f"prompt {i}: token id {bad[0]!r} outside [0, {self.vocab_size})")
            if len(p) + max_new_tokens > self.max_len:
                raise InputError(f"prompt {i}: {len(p)} tokens + {max_new_tokens} new exceeds this engine's "
                                 f"max_len {self.max_len}")


class _DecodeGraph:
    """CUDA-graph capture of the decode model for one batch size and one set of cache tensors; replays copy
    tokens / positions into static buffers; the caches are restored after the warm-up and capture runs, also
    when capture fails. Not run on a GPU yet (no h200 engine loads: docs/perf/engines.md)."""

    def __init__(self, model: Any, caches: list[Tensor], batch: int, device: torch.device) -> None:
        self.tokens = torch.zeros(batch, 1, dtype=torch.int64, device=device)
        self.start_pos = torch.zeros(batch, dtype=torch.int64, device=device)
        self.caches = caches
        snapshot = [t.clone() for t in caches]  # warm-up and capture run the model: restore the caches after
        try:
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                model(self.tokens, self.start_pos, *caches)
            torch.cuda.current_stream(device).wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                out = model(self.tokens, self.start_pos, *caches)
            self.logits = out[0] if isinstance(out, (list, tuple)) else out
        finally:
            for t, s in zip(caches, snapshot):
                t.copy_(s)

    def __call__(self, tokens: Tensor, start_pos: Tensor) -> Tensor:
        self.tokens.copy_(tokens)
        self.start_pos.copy_(start_pos)
        self.graph.replay()
        return self.logits.clone()


def _constants(weights: dict[str, dict[str, Tensor]], model: str) -> dict[str, Tensor]:
    if model not in weights:
        raise EngineError(f"the manifest's weights section lists no model {model!r}")
    return weights[model]


def load_engine(path: str | Path, *, device: str | torch.device | None = None) -> Engine:
    """Open an engine directory: checks format version, sha256 of every file, arch and torch version
    (EngineError naming what differs), then loads the prefill and decode models."""
    root = Path(path)
    manifest = mf.read_manifest(root)
    mf.verify_files(root, manifest)
    mf.verify_arch(manifest, mf.machine_arch())
    mf.verify_torch(manifest)
    dev = torch.device(device if device is not None else ("cpu" if manifest["arch"] == "cpu" else "cuda"))
    weights = read_weights(root, manifest.get("weights"), dev)  # every stored tensor once, shared by the models
    models = {}
    shared = manifest["entry_points"].get("decode", {}).get("program") == "prefill"
    for name in ("prefill",) if shared else ("prefill", "decode"):
        models[name] = load_model(root / mf.PACKAGE, name, dev, _constants(weights, name))
    if shared:  # the cpu target packages one program under both names: load it once
        models["decode"] = models["prefill"]
    log.info("loaded engine %s (target %s, %s)", root, manifest["target"], manifest.get("precision"))
    return Engine(root, manifest, models, dev, weights)

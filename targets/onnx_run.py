"""Running a tensorrt-target model.onnx with onnxruntime (CPU): the check that the exported file, plugin nodes
resolved through their local functions, computes what the eager model computes.

OnnxModel follows the I/O contract of targets/onnx_export.py: caches are allocated from the manifest's cache
layout (Cache.named_tensors order, zeros or -inf), every call returns the logits and the updated caches, which
the session keeps and feeds to the next call.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from v4compile.errors import EngineError, InputError, TargetError
from v4compile.targets.onnx_export import output_name

_NP = {"float32": np.float32, "bfloat16": None, "int64": np.int64, "int32": np.int32}


class OnnxModel:
    """An onnxruntime session over model.onnx with the cache layout (manifest 'cache.tensors' entries)."""

    def __init__(self, path: str | Path, cache_layout: list[dict[str, Any]], threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise TargetError(f"onnxruntime is not installed ({e}); pip install onnxruntime") from e
        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.layout = cache_layout
        self.names = [e["name"] for e in cache_layout]
        have = [i.name for i in self.session.get_inputs()]
        if have != ["tokens", "start_pos", *self.names]:
            raise EngineError(f"{path}: inputs {have[:4]}... do not follow the tensorrt I/O contract "
                              f"(tokens, start_pos, {', '.join(self.names[:2])}, ...)")

    def new_caches(self, batch: int) -> list[np.ndarray]:
        """Fresh caches for `batch` sequences (zeros; -inf for compressor score states)."""
        out = []
        for e in self.layout:
            dt = _NP.get(e["dtype"])
            if dt is None:
                raise EngineError(f"cache {e['name']}: dtype {e['dtype']} has no numpy equivalent for onnxruntime")
            fill = -math.inf if e.get("init") == "neg_inf" else 0.0
            out.append(np.full([batch, *e["shape"][1:]], fill, dtype=dt))
        return out

    def __call__(self, tokens: Tensor, start_pos: Tensor | int, caches: list[np.ndarray]
                 ) -> tuple[Tensor, list[np.ndarray]]:
        """One call (prefill chunk or decode step): (logits [B, T, V], updated caches)."""
        tokens = torch.as_tensor(tokens, dtype=torch.int64)
        if tokens.dim() != 2:
            raise InputError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
        B = tokens.shape[0]
        sp = torch.full((B,), start_pos, dtype=torch.int64) if isinstance(start_pos, int) else start_pos.to(torch.int64)
        feed = {"tokens": tokens.numpy(), "start_pos": sp.numpy(), **dict(zip(self.names, caches, strict=True))}
        outs = self.session.run(["logits", *(output_name(n) for n in self.names)], feed)
        return torch.from_numpy(outs[0]), list(outs[1:])

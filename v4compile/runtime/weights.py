"""The engine's weights: every constant of its AOTInductor models, stored once in `weights.safetensors`.

Models are compiled with `aot_inductor.package_constants_in_so=False`, so model.pt2 holds code only and each
model's constants are bound at load time as user-managed tensors (`load_constants(..., user_managed=True)`):
prefill and decode read the same device memory, and an engine larger than a shared library can hold (the bench
preset: ~42 GB, computed) builds at all. The file is plain safetensors (one flat 1-D tensor per stored storage span);
the manifest's "weights" section says which stored tensor, viewed how, each model's constant is:

    "weights": {"file": "weights.safetensors",
                "models": {"prefill": {"<constant fqn>": ["<stored key>", shape, stride, offset], ...}, ...}}

A constant that two models share (same storage, or equal values under the same name) is stored once. The C++
runtime (runtime/cpp/v4engine.cpp) reads the same file and section. This module imports nothing of the compiler.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from v4compile.errors import EngineError

WEIGHTS_FILE = "weights.safetensors"

# safetensors dtype codes (https://github.com/huggingface/safetensors, format section)
_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
          torch.float8_e8m0fnu: "F8_E8M0"}


def _span(t: Tensor) -> Tensor:
    """Flat 1-D view of the storage elements t reads, from its first: t == _span(t).as_strided(shape, stride, 0)."""
    if any(s < 0 for s in t.stride()):
        raise ValueError(f"constant with a negative stride {t.stride()} cannot be stored")
    n = 0 if t.numel() == 0 else 1 + sum((size - 1) * st for size, st in zip(t.shape, t.stride()))
    return t.as_strided((n,), (1,), t.storage_offset())


def _same(a: Tensor, b: Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    if a.numel() == 0 or a.data_ptr() == b.data_ptr():
        return True
    if a.dtype.itemsize == 1 and a.dtype not in (torch.uint8, torch.int8, torch.bool):  # fp8: compare the bytes
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return bool(torch.equal(a, b))


def write_weights(per_model: dict[str, dict[str, Tensor]], path: Path) -> dict[str, Any]:
    """Write every model's constants ({model: {fqn: tensor}}) to `path` (safetensors, streamed tensor by tensor
    so a 42 GB set never sits in host memory at once); returns the manifest's "weights" section."""
    stored: dict[str, Tensor] = {}
    models: dict[str, dict[str, list]] = {}
    for model, consts in per_model.items():
        entries = models[model] = {}
        for fqn in sorted(consts):
            t = consts[fqn].detach()
            flat = _span(t)
            key = next((k for k in (fqn, f"{model}:{fqn}") if k not in stored or _same(stored[k], flat)), None)
            if key is None:
                raise ValueError(f"two constants of model {model!r} are both stored as {model}:{fqn!r}")
            stored.setdefault(key, flat)
            entries[fqn] = [key, list(t.shape), list(t.stride()), 0]
    header: dict[str, Any] = {}
    pos = 0
    for key, t in stored.items():
        if t.dtype not in _CODES:
            raise ValueError(f"constant {key!r} has dtype {t.dtype}, which safetensors cannot store")
        nbytes = t.numel() * t.element_size()
        header[key] = {"dtype": _CODES[t.dtype], "shape": [t.numel()], "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    header["__metadata__"] = {"format": "v4compile-weights"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for t in stored.values():
            if t.numel():
                f.write(memoryview(t.detach().contiguous().view(torch.uint8).cpu().numpy()))
    return {"file": path.name, "models": models}


def read_weights(root: Path, section: dict[str, Any] | None, device: torch.device) -> dict[str, dict[str, Tensor]]:
    """The manifest's "weights" section -> {model: {fqn: tensor on device}}; each stored tensor is read once and
    shared by every model that names it. EngineError when the file or a listed tensor is missing or malformed."""
    from safetensors import SafetensorError, safe_open

    if not isinstance(section, dict):
        raise EngineError(f"{root}: the manifest has no 'weights' section (format 2 engines keep their constants "
                          f"in {WEIGHTS_FILE})")
    try:
        path, models = root / section["file"], section["models"]
        if not isinstance(models, dict) or Path(section["file"]).name != section["file"]:
            raise TypeError
    except (KeyError, TypeError) as e:
        raise EngineError(f"{root}: manifest 'weights' section is malformed ({e!r})") from e
    out: dict[str, dict[str, Tensor]] = {}
    loaded: dict[str, Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            keys = set(f.keys())
            for model, entries in models.items():
                consts = out[model] = {}
                for fqn, (key, shape, stride, offset) in entries.items():
                    if key not in keys:
                        raise EngineError(f"{path.name} has no tensor {key!r} (constant {fqn} of model {model})")
                    if key not in loaded:
                        loaded[key] = f.get_tensor(key)
                    consts[fqn] = loaded[key].as_strided(shape, stride, offset)
    except (SafetensorError, OSError) as e:
        raise EngineError(f"{path}: cannot read the engine's weights ({e})") from e
    except (ValueError, RuntimeError) as e:  # an entry whose view does not fit its stored tensor
        raise EngineError(f"{path}: a constant view does not fit its stored tensor ({e})") from e
    return out


def bind_weights(model: Any, name: str, constants: dict[str, Tensor]) -> None:
    """Bind one loaded AOTInductor model's constants (user-managed: the caller keeps `constants` alive); an
    EngineError naming the constants the model needs and the file lacks."""
    loader = getattr(model, "loader", model)
    missing = sorted(set(loader.get_constant_fqns()) - set(constants))
    if missing:
        raise EngineError(f"model {name!r} needs {len(missing)} constants the weights file lacks: "
                          f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    loader.load_constants(constants, False, True, True)  # (map, use_inactive, check_full_update, user_managed)

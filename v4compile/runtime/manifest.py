"""The engine directory's manifest.json (DESIGN.md section 7, /work/briefs/engine_contract.md): writing it,
reading it, and the checks load_engine makes (format version, checksums, arch, torch version).

Cache tensors are listed in the entry points' input order with batch dim 0 written as -1 and an "init"
of "zeros" or "neg_inf" (compressor score states); both the Python and the C++ runtime allocate from it.
The cache section's "kv_layout" names the layout those tensors are in ("production": uint8 encodings,
"reference": act-dtype rows, model/cache.py); engines written before the key existed are "reference". The
tensor list alone is what allocation needs, so no format version change came with the key.
This module imports nothing of the compiler (graph, plugins): the runtime uses it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import torch

from v4compile.errors import EngineError, InputError
from v4compile.model.cache import Cache
from v4compile.model.config import ModelConfig
from v4compile.model.kv_bytes import LAYOUTS

FORMAT_VERSION = 2  # 2: constants in weights.safetensors, bound at load (1: inside each model's .so)
MANIFEST = "manifest.json"
PACKAGE = "model.pt2"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int64": torch.int64,
           "int32": torch.int32, "int8": torch.int8, "uint8": torch.uint8, "float8_e4m3fn": torch.float8_e4m3fn}


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def dtype_of(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise EngineError(f"manifest dtype {name!r}; this v4compile reads {', '.join(_DTYPES)}")
    return _DTYPES[name]


def cache_layout(cfg: ModelConfig, max_len: int, act_dtype: torch.dtype,
                 kv_layout: str = "reference") -> list[dict[str, Any]]:
    """[{name, shape (batch dim -1), dtype, init}] in the entry points' input order (Cache.named_tensors)."""
    cache = Cache.allocate(cfg, 1, max_len, act_dtype, device="meta", layout=kv_layout)
    out = []
    for name, t in cache.named_tensors().items():
        init = "neg_inf" if name.endswith("score_state") else "zeros"
        out.append({"name": name, "shape": [-1, *t.shape[1:]], "dtype": dtype_name(t.dtype), "init": init})
    return out


def kv_layout_of(manifest: dict[str, Any]) -> str:
    """The cache section's KV layout ("reference" when absent: engines built before production caches)."""
    layout = manifest["cache"].get("kv_layout", "reference")
    if layout not in LAYOUTS:
        raise EngineError(f"manifest cache kv_layout {layout!r}; this v4compile reads {', '.join(LAYOUTS)}")
    return layout


def init_value(entry: dict[str, Any]) -> float:
    init = entry.get("init", "zeros")
    if init == "zeros":
        return 0.0
    elif init == "neg_inf":
        return -math.inf
    else:
        raise EngineError(f"cache tensor {entry.get('name')!r}: init {init!r}; expected 'zeros' or 'neg_inf'")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under root except the manifest, keyed by POSIX relative path."""
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def write_manifest(root: Path, manifest: dict[str, Any], rehash: bool = True) -> dict[str, Any]:
    """Fill manifest['files'] from the directory's content (rehash=False: keep the manifest's own, for a rewrite
    after nothing but the manifest changed) and write manifest.json; returns the manifest written."""
    manifest = {**manifest, "files": file_hashes(root) if rehash or "files" not in manifest else manifest["files"]}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def read_manifest(root: str | Path) -> dict[str, Any]:
    """Parse manifest.json and check its format version (EngineError naming what is wrong)."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise EngineError(f"engine directory {root} does not exist")
    if not path.is_file():
        raise EngineError(f"{root} is not an engine: no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict):
        raise EngineError(f"{path}: expected a JSON object, found {type(manifest).__name__}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise EngineError(f"{path}: format version {version}, this v4compile reads {FORMAT_VERSION}")
    for key in ("target", "arch", "torch", "config", "cache", "files", "entry_points"):
        if key not in manifest:
            raise EngineError(f"{path}: missing key {key!r}")
    return manifest


def verify_files(root: Path, manifest: dict[str, Any]) -> None:
    """Every listed file exists and has its sha256; raises EngineError naming the first that does not."""
    for rel, digest in manifest["files"].items():
        p = root / rel
        if not p.is_file():
            raise EngineError(f"engine file {rel} is missing from {root}")
        got = sha256_file(p)
        if got != digest:
            raise EngineError(f"engine file {rel}: sha256 {got[:16]}... differs from the manifest's {digest[:16]}... "
                              "(modified or corrupt)")
    if PACKAGE not in manifest["files"]:
        raise EngineError(f"{root}: the manifest lists no {PACKAGE}")


def major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def verify_torch(manifest: dict[str, Any], have: str | None = None) -> None:
    have = have or torch.__version__
    built = str(manifest["torch"])
    if major_minor(built) != major_minor(have):
        raise EngineError(f"engine built with torch {built}, this process runs torch {have} "
                          "(major.minor must match)")


def machine_arch() -> str:
    """'sm_XY' of CUDA device 0, or 'cpu' when no CUDA device is visible."""
    if not torch.cuda.is_available():
        return "cpu"
    major, minor = torch.cuda.get_device_capability(0)
    return f"sm_{major}{minor}"


def verify_arch(manifest: dict[str, Any], have: str) -> None:
    """have: this machine's arch ('cpu' or 'sm_XY')."""
    want = manifest["arch"]
    if want == "cpu":
        return
    if have != want:
        machine = "a machine without a CUDA GPU" if have == "cpu" else f"a GPU of arch {have}"
        raise EngineError(f"engine built for arch {want} (target {manifest['target']}), loaded on {machine}")


def check_out_dir(out: str | Path, overwrite: bool) -> Path:
    """The engine directory to write; InputError when it exists and overwrite is off."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(f"output {out} already exists (pass overwrite=True / remove it)")
    return out


@contextlib.contextmanager
def atomic_engine_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary directory next to `out`; renamed to `out` when the block completes (an existing `out`
    goes only then), removed on any exception, Ctrl-C included: a build never leaves a half-written engine."""
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

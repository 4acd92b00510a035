"""The safetensors file format at the byte level: validate a shard's header, write a shard without copies.

Reading tensor data goes through `safetensors.safe_open` (memory-mapped; never pickle). The header is
parsed here first so that a truncated or corrupt file is reported by name before any tensor is read.
Writing is done here (not `safetensors.torch.save_file`) so that expert slices of a stacked tensor can
be written straight from memory: save_file refuses tensors sharing storage and copies every tensor to
`bytes` first, which would double a 5 GB shard. The layout is the standard one (8-byte little-endian
header length, JSON header padded with spaces to a multiple of 8, tensors back to back), verified by
reading our files with safetensors itself in the tests.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from v4compile.errors import CheckpointError

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
ST_NAMES: dict[torch.dtype, str] = {v: k for k, v in ST_DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor as a shard's header describes it."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(path: Path) -> dict[str, HeaderEntry]:
    """Parse and check a shard's header against the file size; CheckpointError naming the file otherwise."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: corrupt safetensors file ({size} bytes, no header)")
            n = struct.unpack("<Q", head)[0]
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: corrupt or truncated header (header length {n}, file {size} bytes)")
            raw = json.loads(f.read(n).decode("utf-8"))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    out: dict[str, HeaderEntry] = {}
    data_end = 0
    for name, meta in raw.items():
        if name == "__metadata__":
            continue
        out[name] = entry = _entry(path, name, meta)
        data_end = max(data_end, entry.end)
    if 8 + n + data_end > size:
        raise CheckpointError(f"{path}: truncated: the header needs {8 + n + data_end} bytes, the file has {size}")
    return out


def _entry(path: Path, name: str, meta: object) -> HeaderEntry:
    try:
        dtype = ST_DTYPES[meta["dtype"]]  # type: ignore[index]
        shape = tuple(int(s) for s in meta["shape"])  # type: ignore[index]
        begin, end = (int(o) for o in meta["data_offsets"])  # type: ignore[index]
    except KeyError as e:
        raise CheckpointError(f"{path}: corrupt header entry for {name!r}: unknown dtype or missing {e}") from None
    except (TypeError, ValueError):
        raise CheckpointError(f"{path}: corrupt header entry for {name!r}: {meta!r}") from None
    nbytes = math.prod(shape) * dtype.itemsize
    if begin < 0 or end - begin != nbytes or any(s < 0 for s in shape):
        raise CheckpointError(f"{path}: corrupt header entry for {name!r}: offsets [{begin}, {end}] "
                              f"do not hold {list(shape)} {ST_NAMES[dtype]} ({nbytes} bytes)")
    return HeaderEntry(dtype, shape, begin, end)


def write_shard(path: Path, tensors: list[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None) -> int:
    """Write tensors (any device, contiguous or not) as one safetensors file; returns the data bytes."""
    # widest dtypes first: every tensor then starts at a multiple of its own item size
    order = sorted(tensors, key=lambda nt: -nt[1].dtype.itemsize)
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, t in order:
        nbytes = t.numel() * t.dtype.itemsize
        header[name] = {"dtype": ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, t in order:
            if t.numel():
                f.write(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())
    return offset

"""The safetensors file layout, read and written without loading tensor data.

::

    [8 bytes: header length n, little-endian] [n bytes: JSON header, space-padded to 8]
    [data: each tensor's bytes at its header's data_offsets, relative to the data start]

The header is ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{...}}``. Writers that stream tensors one at a time (merged export, GGUF import) plan the
header up front with ``header_bytes``; readers that copy raw row slices (merged export)
find each tensor's bytes with ``read_header``. Loading tensors goes through the
``safetensors`` library (``chainfed.agent.runtime.checkpoint``).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chainfed.agent.errors import ModelLoadError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""safetensors dtype codes and their torch dtypes."""
DTYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}


def nbytes(code: str, shape: Iterable[int]) -> int:
    """Bytes of a tensor of dtype ``code`` and ``shape``."""
    return math.prod(shape) * torch.empty((), dtype=DTYPES[code]).element_size()


def header_bytes(
    planned: Iterable[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> bytes:
    """The length prefix and header of a file holding ``planned`` (name, dtype code,
    shape) tensors back to back in that order; the data section starts 8-byte aligned.
    ``metadata`` (string values) joins ``{"format": "pt"}`` in ``__metadata__``."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, code, shape in planned:
        size = nbytes(code, shape)
        header[name] = {
            "dtype": code,
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


def read_metadata(path: Path) -> dict[str, str]:
    """The header's ``__metadata__`` (``{}`` if none); ``ModelLoadError`` naming the file
    when the header cannot be read."""
    path = Path(path)
    try:
        metadata = _raw_header(path)[1].get("__metadata__", {})
        if not isinstance(metadata, dict):
            raise ValueError("__metadata__ is not an object")
    except (OSError, ValueError, AttributeError, struct.error) as exc:
        raise ModelLoadError(f"{path}: not a readable safetensors file ({exc})") from exc
    return {str(k): str(v) for k, v in metadata.items()}


def _raw_header(path: Path) -> tuple[int, Any]:
    """(header length, the header's parsed JSON); ``ValueError`` when the length the first
    8 bytes give runs past the end of the file or the header is not JSON."""
    with path.open("rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        if size > path.stat().st_size - 8:
            raise ValueError(f"header length {size} past the end of the file")
        return size, json.loads(handle.read(size))


def data_start(path: Path) -> int:
    """Offset of the data section: 8 + the header length the file's first 8 bytes give."""
    with Path(path).open("rb") as handle:
        return 8 + struct.unpack("<Q", handle.read(8))[0]


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies in a safetensors file (from the header, no data read)."""

    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    """Offset of its first byte in the file."""
    nbytes: int


def read_header(path: Path) -> dict[str, StoredTensor]:
    """Every tensor of a safetensors file, in offset order; ``ModelLoadError`` naming the
    file when its header cannot be read, names an unknown dtype, or its offsets do not
    fit the shapes or the file."""
    path = Path(path)
    try:
        size, header = _raw_header(path)
        header.pop("__metadata__", None)
        entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
        out = {name: _stored(path, 8 + size, name, entry) for name, entry in entries}
    except (OSError, ValueError, LookupError, TypeError, AttributeError, struct.error) as exc:
        raise ModelLoadError(f"{path}: not a readable safetensors file ({exc})") from exc
    return out


def _stored(path: Path, data_start: int, name: str, entry: dict[str, Any]) -> StoredTensor:
    if entry["dtype"] not in DTYPES:
        raise ValueError(f"tensor {name!r} has unsupported dtype {entry['dtype']}")
    shape = tuple(int(n) for n in entry["shape"])
    begin, end = (int(n) for n in entry["data_offsets"])
    if end - begin != nbytes(entry["dtype"], shape) or data_start + end > path.stat().st_size:
        raise ValueError(f"tensor {name!r}: data offsets {[begin, end]} do not fit")
    return StoredTensor(path, entry["dtype"], shape, data_start + begin, end - begin)

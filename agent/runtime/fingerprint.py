"""Content fingerprints that decide whether saved work (a prefix cache) is still valid."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

_CHUNK = 1 << 22


def digest_files(paths: Iterable[Path]) -> str:
    """Hash of the named files' names and full contents (order-independent)."""
    h = hashlib.blake2b(digest_size=16)
    for path in sorted(Path(p) for p in paths):
        h.update(path.name.encode())
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def digest_tensors(tensors: dict[str, torch.Tensor]) -> str:
    """Hash of names, dtypes, shapes and values of a tensor dict."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def digest_json(value: Any) -> str:
    """Hash of a JSON-serialisable value (keys sorted)."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

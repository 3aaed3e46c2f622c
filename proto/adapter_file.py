"""The trained result on disk: adapters + task head in one safetensors file.

Tensor names: ``layers.{i}.{module}.lora_a|lora_b`` for adapters, ``head.*`` for a
classification head. The safetensors metadata holds one JSON entry, ``chainfed``, with
everything needed to use the file again: task, labels, LoRA shape, pooling, label token
ids and the fingerprint of the base model it was trained on.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from chainfed.proto.errors import ChainFedError

METADATA_KEY = "chainfed"


class AdapterFileError(ChainFedError):
    """An adapter file is missing, corrupt, or not for this model/task."""


@dataclass
class AdapterFile:
    """Tensors plus the JSON description of how they were trained."""

    tensors: dict[str, torch.Tensor]
    info: dict[str, Any]

    def adapters(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.tensors.items() if k.startswith("layers.")}

    def head(self) -> dict[str, torch.Tensor]:
        return {
            k.removeprefix("head."): v for k, v in self.tensors.items() if k.startswith("head.")
        }


def save_adapter_file(path: Path, result: AdapterFile) -> Path:
    """Write atomically (temp file, fsync, rename): a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tensors = {k: v.detach().contiguous().cpu() for k, v in result.tensors.items()}
    save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(result.info, sort_keys=True)})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_adapter_file(path: Path) -> AdapterFile:
    """Read a file written by ``save_adapter_file``; clear errors for anything else."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"{path}: adapter file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name).clone() for name in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise AdapterFileError(f"{path}: not a readable safetensors file ({exc})") from exc
    if METADATA_KEY not in metadata:
        raise AdapterFileError(f"{path}: no '{METADATA_KEY}' metadata; not a ChainFed adapter file")
    try:
        info = json.loads(metadata[METADATA_KEY])
    except ValueError as exc:
        raise AdapterFileError(f"{path}: corrupt '{METADATA_KEY}' metadata: {exc}") from exc
    if not isinstance(info, dict):
        raise AdapterFileError(
            f"{path}: '{METADATA_KEY}' metadata is a JSON {type(info).__name__}, not an object"
        )
    return AdapterFile(tensors, info)

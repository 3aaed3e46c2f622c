"""``Checkpoint``: on-demand tensor reads from memory-mapped safetensors files.

A checkpoint is one ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. Opening it reads only the headers (names, shapes,
dtypes). ``load`` maps the file(s) holding the requested tensors, copies just those
tensors out and unmaps again, so reading layer after layer never keeps the pages of
earlier layers resident: the process holds what the caller keeps, nothing more.

::

    model.safetensors ──mmap──> [emb | block 0 | block 1 | ... | block L-1 | head]
                                          │ load(names of block 1)
                                          ▼
                                  {name: tensor} (copies; file unmapped after)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from chainfed.agent.errors import ModelLoadError
from chainfed.agent.runtime.safetensors_io import StoredTensor, read_header

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

TensorSpec = dict[str, tuple[str, tuple[int, ...]]]
"""Module parameter name -> (checkpoint tensor name, shape the config implies)."""


class Checkpoint:
    """Index of tensor name -> shard file for one model folder; reads tensors lazily."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)
        self._stored: dict[str, StoredTensor] = {}
        for path in self._shard_files():
            self._stored.update(read_header(path))

    def _shard_files(self) -> list[Path]:
        if not self.model_dir.is_dir():
            raise ModelLoadError(f"{self.model_dir}: model folder not found or not a directory")
        single = self.model_dir / SINGLE_FILE
        index = self.model_dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                files = sorted(set(weight_map.values()))
            except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
                raise ModelLoadError(f"{index}: unreadable shard index: {exc}") from exc
            missing = [f for f in files if not (self.model_dir / f).is_file()]
            if missing:
                raise ModelLoadError(f"{index}: lists shard files that are missing: {missing}")
            return [self.model_dir / f for f in files]
        if single.is_file():
            return [single]
        raise ModelLoadError(
            f"{self.model_dir}: no {SINGLE_FILE} and no {INDEX_FILE} (only safetensors "
            "checkpoints are read; convert GGUF files with `chainfed convert-gguf`)"
        )

    @property
    def files(self) -> list[Path]:
        """The safetensors files of this checkpoint, in name order."""
        return sorted({stored.path for stored in self._stored.values()})

    def names(self) -> list[str]:
        """All tensor names across shards."""
        return list(self._stored)

    def __contains__(self, name: str) -> bool:
        return name in self._stored

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape recorded in the header, without reading data."""
        self._require([name])
        return self._stored[name].shape

    def nbytes(self, names: Iterable[str]) -> int:
        """Bytes the named tensors take on disk."""
        return sum(self._stored[name].nbytes for name in names)

    def _require(self, names: Iterable[str]) -> None:
        missing = [n for n in names if n not in self._stored]
        if missing:
            raise ModelLoadError(
                f"{self.model_dir}: tensor(s) {missing} not found in {[str(f) for f in self.files]}"
            )

    def load(
        self,
        shapes: dict[str, Sequence[int]],
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> dict[str, torch.Tensor]:
        """Read the named tensors, checking each against its expected shape.

        ``shapes`` maps tensor name -> the shape the config implies. A missing tensor or
        a shape that disagrees raises ``ModelLoadError`` naming tensor and file.
        """
        self._require(shapes)
        for name, expected in shapes.items():
            if tuple(expected) != self._stored[name].shape:
                raise ModelLoadError(
                    f"{self._stored[name].path}: tensor {name!r} has shape "
                    f"{list(self._stored[name].shape)} but the config implies {list(expected)}"
                )
        by_file: dict[Path, list[str]] = {}
        for name in shapes:
            by_file.setdefault(self._stored[name].path, []).append(name)
        out: dict[str, torch.Tensor] = {}
        for path, names in by_file.items():
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for name in names:
                        out[name] = handle.get_tensor(name).to(device=device, dtype=dtype)
            except (SafetensorError, OSError, RuntimeError) as exc:
                raise ModelLoadError(f"{path}: cannot read tensors {names}: {exc}") from exc
        return out

    def load_rows(
        self,
        name: str,
        start: int,
        stop: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """Rows ``start:stop`` of a 2-D tensor, reading (and mapping) only those rows.

        For tensors too large to hold whole, such as a decoder's LM head read a
        vocabulary slice at a time; the file is unmapped again before returning.
        """
        self._require([name])
        rows = self._stored[name].shape[0]
        if not 0 <= start < stop <= rows:
            raise ValueError(f"rows {start}:{stop} out of range for {name!r} with {rows} rows")
        path = self._stored[name].path
        try:
            with safe_open(str(path), framework="pt") as handle:
                return handle.get_slice(name)[start:stop].to(device=device, dtype=dtype)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise ModelLoadError(
                f"{path}: cannot read rows {start}:{stop} of {name}: {exc}"
            ) from exc


def uninitialised_embedding(num: int, dim: int) -> nn.Embedding:
    """A frozen ``nn.Embedding`` whose weight is left uninitialised: the checkpoint's
    tensor always replaces it. Skipping ``nn.Embedding``'s random init matters on the
    ``meta`` device the model builds on: the first ``normal_`` there loads torch's Python
    decompositions, about 70 MiB of resident memory the process never gives back."""
    return nn.Embedding.from_pretrained(torch.empty(num, dim))

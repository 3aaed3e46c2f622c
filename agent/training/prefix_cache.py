"""``PrefixCache``: the hidden states entering the training window, kept on disk.

Layers below the window are frozen, so the states entering it are fixed for every
sample. They are computed once, stored memory-mapped, read in mini-batches, and moved
up by exactly one block forward when the window moves (DESIGN.md §3)::

    input ids ─embed─> h0 ─block 0─> h1 ─ ... ─block k-1─> hk  (disk: N × T × d)
                                                             │ advance(block k, its final adapter)
                                                             ▼
                                                            hk+1 (new file; old one deleted)

Guarantees:

* RAM does not grow with the number of samples N: the states live in a file and are
  read and written one mini-batch at a time. Building and advancing use plain sequential
  file reads and writes, not a mapping of the whole file: pages of a shared mapping that
  were touched stay in the process's RSS until it is unmapped, so a whole-file memmap
  would make RSS grow by the file size (twice, for source and destination).
  ``read`` maps the file only for the duration of one call.
* Crash safety: ``write_initial`` and ``advance`` write to a new, uniquely named file,
  fsync it, then atomically replace ``meta.json``; an interrupted build leaves the
  previous state valid (even when rebuilding the layer currently stored), and the
  partial file is removed by the next ``open``.
* Validity: ``meta.json`` records the fingerprint (model files, data, tokenisation) and
  the digest of every frozen adapter the states went through. ``PrefixCache.open``
  reuses a cache only when all of them match what the caller expects; anything else is
  discarded and rebuilt.

Notation: N samples, T sequence length, d hidden size.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from chainfed.proto.durable_file import write_text_durably

META = "meta.json"

_STORAGE = {
    torch.float32: (np.float32, None),
    torch.float16: (np.float16, None),
    torch.bfloat16: (np.int16, torch.bfloat16),  # numpy has no bf16: store the bits
}

LayerForward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(h (B, T, d), attention_mask (B, T)) -> h (B, T, d)."""


@dataclass
class CacheMeta:
    """What ``meta.json`` records about the states on disk."""

    fingerprint: str
    """Digest of model files, data and tokenisation settings."""
    num_samples: int
    seq_len: int
    hidden_size: int
    dtype: str
    layer: int = -1
    """Index of the hidden state stored: 0 = embedding output, i = output of block i-1;
    -1 while nothing complete is stored."""
    adapter_digests: list[str] = field(default_factory=list)
    """Digest of the frozen adapter applied at each block below ``layer``."""
    file: str = ""
    """Name of the states file for ``layer``."""


class PrefixCache:
    """Disk-backed (N, T, d) hidden states at one layer, streamed in mini-batches."""

    def __init__(self, directory: Path, meta: CacheMeta) -> None:
        self.directory = Path(directory)
        self.meta = meta
        self.block_forward_calls = 0
        """Samples × blocks run by ``advance`` in this process (the O(L) guarantee's count)."""

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        fingerprint: str,
        num_samples: int,
        seq_len: int,
        hidden_size: int,
        dtype: torch.dtype = torch.float32,
    ) -> PrefixCache:
        """Reuse the cache in ``directory`` if its fingerprint and shape match, else empty it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        wanted = CacheMeta(fingerprint, num_samples, seq_len, hidden_size, str(dtype))
        existing = _read_meta(directory / META)
        if existing is not None and (
            existing.fingerprint,
            existing.num_samples,
            existing.seq_len,
            existing.hidden_size,
            existing.dtype,
        ) == (fingerprint, num_samples, seq_len, hidden_size, str(dtype)):
            path = directory / existing.file
            if existing.file and path.is_file() and path.stat().st_size == _nbytes(existing):
                cache = cls(directory, existing)
                cache._remove_stale_files()
                return cache
        cache = cls(directory, wanted)
        cache._write_meta()
        cache._remove_stale_files()
        return cache

    @property
    def layer(self) -> int:
        return self.meta.layer

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.meta.dtype.removeprefix("torch."))

    def usable_for(self, layer: int, adapter_digests: Sequence[str]) -> bool:
        """True when the stored states can reach ``layer`` by advancing: stored layer is
        at most ``layer`` and every adapter they went through is the expected one."""
        return (
            0 <= self.meta.layer <= layer
            and list(adapter_digests[: self.meta.layer]) == self.meta.adapter_digests
        )

    @property
    def _row_shape(self) -> tuple[int, int]:
        return (self.meta.seq_len, self.meta.hidden_size)

    def _to_torch(self, block: np.ndarray) -> torch.Tensor:
        """Storage array -> tensor; ``block`` must own its (writable) memory."""
        _, view = _STORAGE[self.dtype]
        t = torch.from_numpy(block)
        return t.view(view) if view is not None else t

    def _to_numpy(self, t: torch.Tensor) -> np.ndarray:
        t = t.detach().to(self.dtype).cpu().contiguous()
        return t.view(torch.int16).numpy() if self.dtype == torch.bfloat16 else t.numpy()

    def read(self, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """States of the given samples, (len(indices), T, d), as a fresh tensor."""
        if self.meta.layer < 0:
            raise RuntimeError(f"{self.directory}: prefix cache is empty; build it first")
        np_dtype, _ = _STORAGE[self.dtype]
        shape = (self.meta.num_samples, *self._row_shape)
        array = np.memmap(self.directory / self.meta.file, dtype=np_dtype, mode="r", shape=shape)
        rows = np.asarray(array[np.asarray(indices)])  # advanced indexing copies the rows
        del array  # unmapped here: the touched pages leave the RSS
        return self._to_torch(rows)

    def batches(self, batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(start index, states) over all samples in order, ``batch_size`` at a time."""
        for start in range(0, self.meta.num_samples, batch_size):
            stop = min(start + batch_size, self.meta.num_samples)
            yield start, self.read(np.arange(start, stop))

    def write_initial(
        self,
        compute: Callable[[slice], torch.Tensor],
        *,
        layer: int,
        batch_size: int,
        adapter_digests: Sequence[str] = (),
    ) -> None:
        """Store hidden state ``layer`` (normally 0, the embeddings) computed per batch.

        ``compute(samples)`` returns the (B, T, d) states of ``samples`` (a slice).
        ``adapter_digests`` names the adapter of each block below ``layer`` (one per
        block, so none for layer 0), as ``usable_for`` will later expect them.
        """
        if len(adapter_digests) != layer:
            raise ValueError(
                f"layer {layer} needs {layer} adapter digests (one per block below it), "
                f"got {len(adapter_digests)}"
            )
        self._commit(
            lambda sl, _: compute(sl),
            layer=layer,
            digests=list(adapter_digests),
            batch_size=batch_size,
        )

    def advance(
        self,
        forward: LayerForward,
        attention_mask: torch.Tensor,
        *,
        adapter_digest: str,
        batch_size: int,
    ) -> None:
        """Run one block (with its final adapter) over every sample: layer k -> k+1."""
        if self.meta.layer < 0:
            raise RuntimeError(f"{self.directory}: prefix cache is empty; build it first")

        def step(sl: slice, states: torch.Tensor) -> torch.Tensor:
            self.block_forward_calls += states.shape[0]
            return forward(states, attention_mask[sl])

        self._commit(
            step,
            layer=self.meta.layer + 1,
            digests=[*self.meta.adapter_digests, adapter_digest],
            source=self.meta.file,
            batch_size=batch_size,
        )

    def _commit(
        self,
        step: Callable[[slice, torch.Tensor | None], torch.Tensor],
        *,
        layer: int,
        digests: list[str],
        batch_size: int,
        source: str | None = None,
    ) -> None:
        """Write ``step``'s output for every batch to a new file, then point meta.json at it.

        Batches are read from ``source`` (when given) and written to the new file with
        sequential file I/O, so only one batch is ever resident.
        """
        np_dtype, _ = _STORAGE[self.dtype]
        row_shape = self._row_shape
        name = f"states-{layer:03d}-{secrets.token_hex(4)}.bin"
        with ExitStack() as stack:
            src = stack.enter_context(open(self.directory / source, "rb")) if source else None
            out = stack.enter_context(open(self.directory / name, "wb"))
            stack.enter_context(torch.no_grad())
            for start in range(0, self.meta.num_samples, batch_size):
                sl = slice(start, min(start + batch_size, self.meta.num_samples))
                states = None
                if src is not None:
                    rows = np.empty((sl.stop - sl.start, *row_shape), dtype=np_dtype)
                    if src.readinto(memoryview(rows).cast("B")) != rows.nbytes:
                        raise RuntimeError(f"{self.directory / source}: file is truncated")
                    states = self._to_torch(rows)
                result = step(sl, states)
                expected = (sl.stop - sl.start, *row_shape)
                if tuple(result.shape) != expected:
                    raise ValueError(
                        f"states for samples {sl.start}..{sl.stop - 1} have shape "
                        f"{tuple(result.shape)}, expected {expected}"
                    )
                out.write(memoryview(self._to_numpy(result)).cast("B"))
            out.flush()
            os.fsync(out.fileno())
        self.meta.layer, self.meta.adapter_digests, self.meta.file = layer, digests, name
        self._write_meta()
        self._remove_stale_files()

    def _write_meta(self) -> None:
        write_text_durably(self.directory / META, json.dumps(asdict(self.meta), indent=2))

    def _remove_stale_files(self) -> None:
        for path in self.directory.glob("states-*.bin"):
            if path.name != self.meta.file:
                path.unlink()


def _nbytes(meta: CacheMeta) -> int:
    np_dtype, _ = _STORAGE[getattr(torch, meta.dtype.removeprefix("torch."))]
    return meta.num_samples * meta.seq_len * meta.hidden_size * np.dtype(np_dtype).itemsize


def _read_meta(path: Path) -> CacheMeta | None:
    try:
        return CacheMeta(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None

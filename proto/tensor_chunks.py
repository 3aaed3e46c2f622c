"""Tensors as size-bounded chunks, and their validated reassembly (DESIGN.md §5).

Both directions of the protocol move tensors the same way: ``tensors_to_chunks`` cuts
each tensor's raw bytes into ``TensorChunk`` pieces of at most ``max_chunk_bytes``, and
a ``ChunkAssembler`` on the other side rebuilds the tensors from chunks arriving in any
order. Plain Python and torch only; ``chainfed.proto.serde`` maps the dataclasses
here to and from protobuf.

Wire bytes of a tensor: its elements in C (row-major) order, little-endian, exactly the
memory of ``tensor.contiguous()`` on a little-endian host (big-endian hosts byte-swap).
bfloat16 travels as its 16-bit pattern (an int16 view). Supported dtypes: ``DTYPES``.

::

    tensor "w" (float32, (3, 1000) = 12000 bytes), max_chunk_bytes = 5000
    bytes   [0 ............ 5000)[5000 ........ 10000)[10000 .. 12000)
    chunks   offset=0             offset=5000          offset=10000      total_bytes=12000

The assembler is the receiving side's defence against a malformed or hostile peer.
Every violation raises ``ChunkError`` naming the tensor and the problem: unknown dtype,
``product(shape) × itemsize != total_bytes``, a name, dtype, shape or total that changes
between chunks of one tensor, a range outside ``[0, total_bytes)``, overlapping ranges,
bytes never received at ``finish()``, and declared sizes above ``max_total_bytes`` —
that last check runs on the declaration. No buffer is ever sized from a declaration:
memory grows with the bytes actually received.
"""

from __future__ import annotations

import bisect
import math
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
"""Default hard per-message limit of the protocol (gRPC's own default receive limit)."""

DEFAULT_MAX_TOTAL_BYTES = 1 << 30
"""Default cap on the bytes one assembler accepts over all its tensors (1 GiB)."""

DEFAULT_MAX_TENSORS = 65_536
"""Default cap on the number of tensors one assembler accepts."""

MAX_NAME_BYTES = 512
"""Longest tensor name, in UTF-8 bytes."""

MAX_RANK = 8
"""Most dimensions a tensor may have."""

MAX_TENSOR_BYTES = 2**63 - 1
"""Largest size a tensor may declare at all (it must fit the wire's 64-bit fields)."""

CHUNK_ENVELOPE_BYTES = 4096
"""Room reserved in every message for everything but a chunk's data.

The largest envelope is a ``TensorChunk`` inside an ``UpdatePart``: name (≤ 512 + 3),
dtype (≤ 11), shape (≤ 8 × 10 + 2), offset and total (≤ 11 each), the data field's tag
and length (≤ 6) and the oneof wrapper (≤ 6) — under 700 bytes. 4 KiB leaves margin for
fields added later.
"""


class ChunkError(ValueError):
    """A chunk or manifest violates the tensor transfer rules; the message says how."""


@dataclass(frozen=True)
class _DType:
    torch_dtype: torch.dtype
    wire: np.dtype
    """Little-endian numpy dtype of the wire bytes (int16 for bfloat16)."""

    @property
    def itemsize(self) -> int:
        return self.wire.itemsize


DTYPES: dict[str, _DType] = {
    "float32": _DType(torch.float32, np.dtype("<f4")),
    "float16": _DType(torch.float16, np.dtype("<f2")),
    "bfloat16": _DType(torch.bfloat16, np.dtype("<i2")),
    "float64": _DType(torch.float64, np.dtype("<f8")),
    "int64": _DType(torch.int64, np.dtype("<i8")),
    "int32": _DType(torch.int32, np.dtype("<i4")),
    "int16": _DType(torch.int16, np.dtype("<i2")),
    "int8": _DType(torch.int8, np.dtype("i1")),
    "uint8": _DType(torch.uint8, np.dtype("u1")),
}
"""Wire dtype name -> torch dtype and wire layout."""

_DTYPE_NAMES = {spec.torch_dtype: name for name, spec in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """Wire name of a torch dtype (``torch.bfloat16`` -> ``"bfloat16"``)."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ChunkError(f"dtype {dtype} cannot be sent; supported: {', '.join(DTYPES)}") from None


def chunk_data_budget(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> int:
    """Largest ``max_chunk_bytes`` whose chunks fit a ``max_message_bytes`` message."""
    budget = max_message_bytes - CHUNK_ENVELOPE_BYTES
    if budget < 1:
        raise ValueError(
            f"max_message_bytes must exceed the {CHUNK_ENVELOPE_BYTES}-byte chunk envelope; "
            f"got {max_message_bytes}"
        )
    return budget


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of one tensor: a manifest entry. Validated on creation."""

    name: str
    """Unique within its manifest; 1..MAX_NAME_BYTES UTF-8 bytes."""
    dtype: str
    """A key of ``DTYPES``."""
    shape: tuple[int, ...]
    """Dimensions, outermost first; ``()`` for a scalar."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(self.shape))
        _check_name(self.name)
        if self.dtype not in DTYPES:
            raise ChunkError(
                f"tensor {self.name!r}: unknown dtype {self.dtype!r}; "
                f"supported: {', '.join(DTYPES)}"
            )
        if len(self.shape) > MAX_RANK:
            raise ChunkError(
                f"tensor {self.name!r}: {len(self.shape)} dimensions, at most {MAX_RANK}"
            )
        if any(not isinstance(d, int) or d < 0 for d in self.shape):
            raise ChunkError(f"tensor {self.name!r}: bad shape {self.shape}")
        if self.total_bytes > MAX_TENSOR_BYTES:
            raise ChunkError(
                f"tensor {self.name!r}: {self.describe()} is {self.total_bytes} bytes, "
                f"more than any tensor can be ({MAX_TENSOR_BYTES})"
            )

    @property
    def total_bytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize

    def describe(self) -> str:
        return f"{self.dtype}{list(self.shape)}"

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorSpec:
        return cls(name, dtype_name(tensor.dtype), tuple(tensor.shape))


@dataclass(frozen=True)
class TensorChunk:
    """The bytes ``[offset, offset + len(data))`` of tensor ``name`` (of ``total_bytes``)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    total_bytes: int
    data: bytes = field(repr=False)

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.dtype, self.shape)


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not name:
        raise ChunkError(f"tensor name must be a non-empty string; got {name!r}")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise ChunkError(f"tensor name {name[:40]!r}... is longer than {MAX_NAME_BYTES} bytes")


def manifest_of(tensors: Mapping[str, torch.Tensor]) -> list[TensorSpec]:
    """The manifest (in dict order) that ``tensors_to_chunks(tensors)`` will send."""
    return [TensorSpec.of(name, t) for name, t in tensors.items()]


def _wire_bytes(tensor: torch.Tensor, spec: _DType) -> np.ndarray:
    """(total_bytes,) uint8 view of the tensor's little-endian bytes; copies only if needed."""
    t = tensor.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    arr = t.numpy().astype(spec.wire, copy=False)  # byte-swaps only on big-endian hosts
    return arr.reshape(-1).view(np.uint8)


def tensors_to_chunks(
    tensors: Mapping[str, torch.Tensor], max_chunk_bytes: int
) -> Iterator[TensorChunk]:
    """Cut every tensor into chunks of at most ``max_chunk_bytes`` data bytes, lazily.

    Tensors go in dict order, each as consecutive ranges; a 0-byte tensor yields one
    empty chunk so that its name and shape still arrive. Only one chunk's bytes are
    copied at a time.
    """
    if max_chunk_bytes < 1:
        raise ValueError(f"max_chunk_bytes must be >= 1, got {max_chunk_bytes}")
    for name, tensor in tensors.items():
        spec = TensorSpec.of(name, tensor)
        raw = _wire_bytes(tensor, DTYPES[spec.dtype])
        total = spec.total_bytes
        for offset in range(0, max(total, 1), max_chunk_bytes):
            data = raw[offset : offset + max_chunk_bytes].tobytes()
            yield TensorChunk(name, spec.dtype, spec.shape, offset, total, data)


class _Pending:
    """One tensor being received: its spec and the byte runs received so far.

    Each maximal run of contiguous bytes received is one ``bytearray`` (``runs``, keyed
    by its start; ``starts`` sorted). A chunk that continues a run extends it in place,
    one that closes the gap between two runs joins them, any other starts a new run. So
    memory follows the bytes that arrived, never the declared ``total_bytes``, and
    chunks sent in order grow a single run that becomes the tensor's storage uncopied.
    """

    def __init__(self, spec: TensorSpec) -> None:
        self.spec = spec
        self.starts: list[int] = []
        self.runs: dict[int, bytearray] = {}
        self.seen = False

    def _end(self, j: int) -> int:
        start = self.starts[j]
        return start + len(self.runs[start])

    def add(self, offset: int, data: bytes) -> None:
        name, total, end = self.spec.name, self.spec.total_bytes, offset + len(data)
        if total == 0:
            if self.seen:
                raise ChunkError(f"tensor {name!r}: duplicate chunk of a 0-byte tensor")
            if offset != 0 or data:
                raise ChunkError(
                    f"tensor {name!r}: a 0-byte tensor takes one empty chunk at offset 0"
                )
            self.seen = True
            return
        if not data:
            raise ChunkError(f"tensor {name!r}: empty chunk at offset {offset}")
        if offset < 0 or end > total:
            raise ChunkError(f"tensor {name!r}: chunk [{offset}, {end}) lies outside [0, {total})")
        i = bisect.bisect_right(self.starts, offset)  # runs before this chunk: starts[:i]
        for j in (i - 1, i):
            if 0 <= j < len(self.starts) and self.starts[j] < end and offset < self._end(j):
                raise ChunkError(
                    f"tensor {name!r}: chunk [{offset}, {end}) overlaps bytes "
                    f"[{self.starts[j]}, {self._end(j)}) already received"
                )
        if i > 0 and self._end(i - 1) == offset:  # continues the previous run
            start = self.starts[i - 1]
            self.runs[start] += data
        else:
            start = offset
            self.starts.insert(i, start)
            self.runs[start] = bytearray(data)
            i += 1
        if i < len(self.starts) and self.starts[i] == end:  # reaches the next run: join
            self.runs[start] += self.runs.pop(self.starts.pop(i))
        self.seen = True

    def first_gap(self) -> tuple[int, int] | None:
        total = self.spec.total_bytes
        if total == 0:
            return None if self.seen else (0, 0)
        cursor = 0
        for j, start in enumerate(self.starts):
            if start > cursor:
                return cursor, start
            cursor = self._end(j)
        return None if cursor == total else (cursor, total)

    def tensor(self) -> torch.Tensor:
        """The finished tensor; call only once ``first_gap()`` is None (one run left)."""
        dtype = DTYPES[self.spec.dtype]
        buffer = self.runs.get(0, bytearray())
        arr = np.frombuffer(buffer, dtype=dtype.wire)
        if sys.byteorder != "little":
            arr = arr.astype(dtype.wire.newbyteorder("="))
        t = torch.from_numpy(arr)
        if dtype.torch_dtype == torch.bfloat16:
            t = t.view(torch.bfloat16)
        return t.reshape(self.spec.shape)


class ChunkAssembler:
    """Rebuilds tensors from chunks received in any order, validating every one.

    With ``expected`` (the manifest a Task or an UpdateHeader announced), only the
    listed tensors are accepted, each with exactly the announced dtype and shape, and
    ``finish()`` requires all of them; the manifest's total is checked against
    ``max_total_bytes`` at construction. Without it, the first chunk of each name
    declares the tensor and later chunks must agree with it.

    Memory: nothing is allocated from a declared size. Received bytes are kept in runs
    of contiguous bytes that grow as chunks arrive (at most twice the bytes received
    while two runs are joined); an in-order tensor is one run, which the finished
    tensor shares (no copy).
    """

    def __init__(
        self,
        expected: Iterable[TensorSpec] | None = None,
        *,
        max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
        max_tensors: int = DEFAULT_MAX_TENSORS,
    ) -> None:
        self.max_total_bytes = max_total_bytes
        self.max_tensors = max_tensors
        self._pending: dict[str, _Pending] = {}
        self._declared_bytes = 0
        self._finished = False
        self._manifest = expected is not None
        for spec in expected or ():
            if spec.name in self._pending:
                raise ChunkError(f"manifest lists tensor {spec.name!r} twice")
            self._declare(spec)

    @property
    def declared_bytes(self) -> int:
        """Bytes of every tensor declared so far (the manifest's, or seen in chunks)."""
        return self._declared_bytes

    def _declare(self, spec: TensorSpec) -> _Pending:
        if len(self._pending) >= self.max_tensors:
            raise ChunkError(f"more than {self.max_tensors} tensors (at {spec.name!r})")
        if self._declared_bytes + spec.total_bytes > self.max_total_bytes:
            raise ChunkError(
                f"tensor {spec.name!r} ({spec.describe()}, {spec.total_bytes} bytes) would "
                f"bring the declared total to {self._declared_bytes + spec.total_bytes} "
                f"bytes, over the cap of {self.max_total_bytes}"
            )
        self._declared_bytes += spec.total_bytes
        pending = self._pending[spec.name] = _Pending(spec)
        return pending

    def add(self, chunk: TensorChunk) -> None:
        """Validate one chunk and copy its bytes into place."""
        if self._finished:
            raise ChunkError(f"chunk of {chunk.name!r} after finish()")
        spec = chunk.spec  # validates name, dtype, shape
        if chunk.total_bytes != spec.total_bytes:
            raise ChunkError(
                f"tensor {spec.name!r}: declares total_bytes={chunk.total_bytes} but "
                f"{spec.describe()} is {spec.total_bytes} bytes"
            )
        pending = self._pending.get(spec.name)
        if pending is None:
            if self._manifest:
                raise ChunkError(f"tensor {spec.name!r} is not in the manifest")
            pending = self._declare(spec)
        elif pending.spec != spec:
            raise ChunkError(
                f"tensor {spec.name!r}: chunk says {spec.describe()}, "
                f"earlier {'manifest' if self._manifest else 'chunks'} said "
                f"{pending.spec.describe()}"
            )
        pending.add(chunk.offset, chunk.data)

    def finish(self) -> dict[str, torch.Tensor]:
        """The tensors, in manifest (or first-seen) order; every byte must have arrived."""
        for pending in self._pending.values():
            gap = pending.first_gap()
            if gap is not None:
                what = (
                    "never arrived" if not pending.seen else f"bytes [{gap[0]}, {gap[1]}) missing"
                )
                raise ChunkError(f"tensor {pending.spec.name!r} incomplete: {what}")
        self._finished = True
        return {name: pending.tensor() for name, pending in self._pending.items()}


def chunks_to_tensors(
    chunks: Iterable[TensorChunk],
    expected: Iterable[TensorSpec] | None = None,
    *,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
) -> dict[str, torch.Tensor]:
    """Assemble a whole chunk stream at once (see ``ChunkAssembler``)."""
    assembler = ChunkAssembler(expected, max_total_bytes=max_total_bytes)
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.finish()

"""Fuzzing the streamed-upload reassembler with hostile chunk sequences.

A valid upload of a few small tensors is cut into chunks, then mutated: chunks dropped
(gaps), repeated (duplicates), shifted (overlaps, ranges outside the tensor), given a
wrong total, dtype, shape or name, emptied, or made to declare an enormous tensor
(up to 2**62 bytes). The assembler must either rebuild exactly the bytes it was sent
or raise ``ChunkError`` with a message; and, whatever was declared, the memory it
allocates follows the bytes that arrived, never the declared size (tracemalloc peak
at most twice the bytes received, plus a small constant).
"""

from __future__ import annotations

import resource
import tracemalloc
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from chainfed.proto.tensor_chunks import (
    DTYPES,
    ChunkAssembler,
    ChunkError,
    TensorChunk,
    TensorSpec,
    manifest_of,
    tensors_to_chunks,
)

FUZZ = settings(  # the "fuzz" profile of tests/conftest.py
    settings.get_profile("fuzz"), suppress_health_check=[HealthCheck.too_slow]
)

SLACK_BYTES = 256 * 1024
"""Allocation allowed beyond twice the bytes received (bookkeeping, error messages)."""

MUTATIONS = (
    "drop",
    "duplicate",
    "shift",
    "far_offset",
    "total",
    "dtype",
    "shape",
    "huge",
    "name",
    "empty",
    "truncate",
    "swap",
)


@st.composite
def uploads(draw) -> tuple[dict[str, torch.Tensor], int]:
    """1-3 small tensors of any wire dtype, and the chunk size to cut them with."""
    count = draw(st.integers(1, 3))
    tensors = {}
    for k in range(count):
        dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))].torch_dtype
        shape = tuple(draw(st.lists(st.integers(0, 6), min_size=0, max_size=3)))
        seed = draw(st.integers(0, 2**16))
        values = torch.randint(-100, 100, shape, generator=torch.Generator().manual_seed(seed))
        tensors[f"layers.{k}.q_proj.lora_a"] = values.to(dtype)
    return tensors, draw(st.integers(1, 64))


@st.composite
def mutated(draw, chunks: list[TensorChunk]) -> tuple[list[TensorChunk], list[str]]:
    """``chunks`` reordered, with 0-4 mutations applied; returns them and the mutations."""
    chunks = list(draw(st.permutations(chunks)))
    applied = []
    for _ in range(draw(st.integers(0, 4))):
        if not chunks:
            break
        how = draw(st.sampled_from(MUTATIONS))
        k = draw(st.integers(0, len(chunks) - 1))
        c = chunks[k]
        if how == "drop":
            del chunks[k]
        elif how == "duplicate":
            chunks.insert(draw(st.integers(0, len(chunks))), c)
        elif how == "shift":
            chunks[k] = replace(c, offset=max(0, c.offset + draw(st.integers(-8, 8))))
        elif how == "far_offset":
            chunks[k] = replace(
                c, offset=draw(st.integers(min(c.total_bytes, 2**64 - 1), 2**64 - 1))
            )
        elif how == "total":
            chunks[k] = replace(c, total_bytes=draw(st.integers(0, 2**64 - 1)))
        elif how == "dtype":
            dtype = draw(st.sampled_from([*sorted(DTYPES), "float8", "", "FLOAT32"]))
            chunks[k] = replace(c, dtype=dtype)
        elif how == "shape":
            shape = tuple(draw(st.lists(st.integers(0, 2**20), max_size=9)))
            chunks[k] = replace(c, shape=shape)
        elif how == "huge":  # a consistent declaration of an enormous tensor
            dims = tuple(draw(st.lists(st.integers(1, 2**16), min_size=1, max_size=4)))
            dims = (*dims, draw(st.integers(2**20, 2**40)))
            total = int(np.prod(dims, dtype=object)) * DTYPES[c.dtype].itemsize
            chunks[k] = replace(c, shape=dims, total_bytes=total)
        elif how == "name":
            chunks[k] = replace(c, name=draw(st.sampled_from(["", "other", "x" * 600])))
        elif how == "empty":
            chunks[k] = replace(c, data=b"")
        elif how == "truncate":
            chunks[k] = replace(c, data=c.data[: draw(st.integers(0, len(c.data)))])
        elif how == "swap" and len(chunks) > 1:
            j = draw(st.integers(0, len(chunks) - 1))
            chunks[k], chunks[j] = (
                replace(c, offset=chunks[j].offset),
                replace(chunks[j], offset=c.offset),
            )
        applied.append(how)
    return chunks, applied


def _painted(chunks: list[TensorChunk], total: int) -> bytes:
    """The bytes a correct assembler must return: every chunk written at its offset."""
    buffer = bytearray(total)
    for c in chunks:
        buffer[c.offset : c.offset + len(c.data)] = c.data
    return bytes(buffer)


def _feed(assembler_args, chunks: list[TensorChunk]) -> dict[str, torch.Tensor] | ChunkError:
    try:
        assembler = ChunkAssembler(*assembler_args)
        for chunk in chunks:
            assembler.add(chunk)
        return assembler.finish()
    except ChunkError as exc:
        assert str(exc)
        return exc


def _raw(tensor: torch.Tensor) -> bytes:
    t = tensor.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _check(tensors: dict[str, torch.Tensor], chunks: list[TensorChunk], applied, manifest):
    received = sum(len(c.data) for c in chunks)
    tracemalloc.start()
    try:
        outcome = _feed((manifest,), chunks)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= 2 * received + SLACK_BYTES, (peak, received, applied)
    if not applied:  # any order of an intact upload is fine
        assert not isinstance(outcome, ChunkError), outcome
        assert {n: _raw(t) for n, t in outcome.items()} == {n: _raw(t) for n, t in tensors.items()}
    if isinstance(outcome, ChunkError):
        return
    # Accepted: each tensor is exactly the bytes its chunks carried, tiling [0, total).
    if manifest is not None:
        assert list(outcome) == list(tensors)
    for name, got in outcome.items():
        mine = [c for c in chunks if c.name == name]
        spec = TensorSpec.of(name, got)
        assert sum(len(c.data) for c in mine) == spec.total_bytes or spec.total_bytes == 0
        assert _raw(got) == _painted(mine, spec.total_bytes)


@FUZZ
@given(upload=uploads(), data=st.data(), with_manifest=st.booleans())
def test_mutated_chunk_streams_rebuild_exactly_or_fail_cleanly(upload, data, with_manifest):
    tensors, chunk_bytes = upload
    chunks, applied = data.draw(mutated(list(tensors_to_chunks(tensors, chunk_bytes))))
    _check(tensors, chunks, applied, manifest_of(tensors) if with_manifest else None)


@FUZZ
@given(
    dims=st.lists(st.integers(0, 2**32), min_size=1, max_size=8),
    dtype=st.sampled_from(sorted(DTYPES)),
    offset=st.integers(0, 2**64 - 1),
    data=st.binary(min_size=1, max_size=4096),
    in_manifest=st.booleans(),
)
@example(dims=[2**58], dtype="float32", offset=0, data=b"\0" * 4096, in_manifest=False)  # 2**60 B
@example(dims=[1 << 28], dtype="float32", offset=0, data=b"\0" * 4096, in_manifest=True)  # 1 GiB
@example(dims=[1 << 27], dtype="float32", offset=(1 << 29) - 1, data=b"\1", in_manifest=False)
def test_a_declared_size_allocates_nothing_before_its_bytes_arrive(
    dims, dtype, offset, data, in_manifest
):
    """Any declaration up to the cap (1 GiB by default) and beyond it, one chunk of data."""
    total = int(np.prod(dims, dtype=object)) * DTYPES[dtype].itemsize
    chunk = TensorChunk("w", dtype, tuple(dims), offset, total, data)
    tracemalloc.start()
    try:
        try:
            spec = TensorSpec("w", dtype, tuple(dims))
            assembler = ChunkAssembler([spec] if in_manifest else None)
            assembler.add(chunk)
        except ChunkError as exc:
            assert str(exc)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= 2 * len(data) + SLACK_BYTES, (peak, total)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


@pytest.mark.parametrize("declared_log2", [29, 30, 60])
def test_enormous_declarations_do_not_grow_rss(declared_log2: int):
    """512 MiB, 1 GiB (the default cap) and 2**60 bytes declared, 64 KiB sent, 4 times."""
    numel = (1 << declared_log2) // 4
    before = _rss_bytes()
    kept = []
    for k in range(4):
        assembler = ChunkAssembler()
        chunk = TensorChunk(f"w{k}", "float32", (numel,), 4096, numel * 4, b"\7" * (64 << 10))
        try:
            assembler.add(chunk)
        except ChunkError as exc:
            assert "over the cap" in str(exc) and declared_log2 > 30
        kept.append(assembler)  # keep every assembler alive while measuring
    growth = _rss_bytes() - before
    assert growth < 32 << 20, f"RSS grew by {growth >> 20} MiB"

"""Chunking round trips, every ChunkError, and the per-message size bound."""

import random
import tracemalloc

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chainfed.proto import chainfed_pb2 as pb
from chainfed.proto.serde import tensor_chunk_to_proto
from chainfed.proto.tensor_chunks import (
    CHUNK_ENVELOPE_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    DTYPES,
    MAX_NAME_BYTES,
    MAX_RANK,
    ChunkAssembler,
    ChunkError,
    TensorChunk,
    TensorSpec,
    chunk_data_budget,
    chunks_to_tensors,
    manifest_of,
    tensors_to_chunks,
)


def _random_tensor(dtype: torch.dtype, shape: tuple[int, ...], gen: torch.Generator):
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=gen, dtype=torch.int64).to(dtype)


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor.detach()), name


def _chunk(name="w", dtype="float32", shape=(4,), offset=0, total=None, data=b"\0" * 16):
    if total is None:
        total = TensorSpec(name, dtype, shape).total_bytes
    return TensorChunk(name, dtype, tuple(shape), offset, total, data)


# ---------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------

tensor_dicts = st.dictionaries(
    keys=st.text(alphabet="abcdefghij.0123456789_", min_size=1, max_size=12),
    values=st.tuples(
        st.sampled_from(sorted(DTYPES)),
        st.lists(st.integers(0, 7), min_size=0, max_size=3).map(tuple),
    ),
    max_size=6,
)


@settings(max_examples=150, deadline=None)
@given(
    specs=tensor_dicts,
    max_chunk_bytes=st.integers(1, 64),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip_any_dtypes_chunk_sizes_and_order(specs, max_chunk_bytes, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        name: _random_tensor(DTYPES[dtype].torch_dtype, shape, gen)
        for name, (dtype, shape) in specs.items()
    }
    chunks = list(tensors_to_chunks(tensors, max_chunk_bytes))
    random.Random(seed).shuffle(chunks)

    free = chunks_to_tensors(chunks)
    announced = chunks_to_tensors(chunks, manifest_of(tensors))

    assert all(len(c.data) <= max_chunk_bytes for c in chunks)
    assert sorted(free) == sorted(tensors)
    _assert_same({name: free[name] for name in tensors}, tensors)
    _assert_same(announced, tensors)  # manifest order


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("delta", [-1, 0, 1])
@pytest.mark.parametrize("multiple", [1, 2, 3])
def test_sizes_straddling_the_chunk_limit(dtype: str, delta: int, multiple: int) -> None:
    limit = 48  # a multiple of every itemsize
    itemsize = DTYPES[dtype].itemsize
    numel = (multiple * limit) // itemsize + delta
    gen = torch.Generator().manual_seed(numel)
    tensors = {"t": _random_tensor(DTYPES[dtype].torch_dtype, (numel,), gen)}

    chunks = list(tensors_to_chunks(tensors, limit))
    got = chunks_to_tensors(reversed(chunks))

    assert len(chunks) == -(-numel * itemsize // limit)
    assert [c.offset for c in chunks] == list(range(0, numel * itemsize, limit))
    _assert_same(got, tensors)


def test_chunk_boundaries_inside_elements_and_odd_layouts() -> None:
    base = torch.randn(6, 5, dtype=torch.float32, requires_grad=True)
    tensors = {
        "transposed": base.t(),  # non-contiguous view
        "grad": base * 2,  # requires grad
        "scalar": torch.tensor(3.5, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 4, dtype=torch.float16),
    }

    chunks = list(tensors_to_chunks(tensors, 3))  # 3 bytes: splits every element
    random.Random(0).shuffle(chunks)

    _assert_same(chunks_to_tensors(chunks, manifest_of(tensors)), tensors)
    assert [c for c in chunks if c.name == "empty"] == [
        TensorChunk("empty", "float16", (0, 4), 0, 0, b"")
    ]


def test_wire_bytes_are_little_endian_and_bf16_is_its_bit_pattern() -> None:
    tensors = {
        "f32": torch.tensor([1.0], dtype=torch.float32),
        "bf16": torch.tensor([1.0, -2.0], dtype=torch.bfloat16),
        "i64": torch.tensor([258], dtype=torch.int64),
    }

    data = {c.name: c.data for c in tensors_to_chunks(tensors, 1024)}

    assert data["f32"] == bytes.fromhex("0000803f")
    assert data["bf16"] == bytes.fromhex("803f00c0")
    assert data["i64"] == bytes.fromhex("0201000000000000")


def test_chunks_are_produced_lazily() -> None:
    stream = tensors_to_chunks({"big": torch.zeros(1 << 20)}, 1024)  # 4 MiB

    first = next(stream)

    assert (first.offset, len(first.data), first.total_bytes) == (0, 1024, 4 << 20)


@pytest.mark.parametrize("dtype", [torch.bool, torch.complex64, torch.uint16])
def test_unsupported_dtypes_cannot_be_sent(dtype: torch.dtype) -> None:
    with pytest.raises(ChunkError, match="cannot be sent"):
        list(tensors_to_chunks({"x": torch.zeros(2, dtype=dtype)}, 8))


def test_chunk_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_chunk_bytes"):
        list(tensors_to_chunks({"x": torch.zeros(2)}, 0))
    with pytest.raises(ValueError, match="envelope"):
        chunk_data_budget(CHUNK_ENVELOPE_BYTES)


# ---------------------------------------------------------------------------------
# ChunkError cases
# ---------------------------------------------------------------------------------


def _chunks_of(numel: int = 12, limit: int = 16) -> list[TensorChunk]:
    return list(tensors_to_chunks({"w": torch.arange(numel, dtype=torch.float32)}, limit))


def test_gap_is_reported_at_finish() -> None:
    chunks = _chunks_of()  # [0,16) [16,32) [32,48)
    assembler = ChunkAssembler()
    for chunk in (chunks[0], chunks[2]):
        assembler.add(chunk)

    with pytest.raises(ChunkError, match=r"'w' incomplete: bytes \[16, 32\) missing"):
        assembler.finish()


def test_missing_tail_and_missing_tensor_are_reported() -> None:
    chunks = _chunks_of()
    tail = ChunkAssembler()
    tail.add(chunks[0])
    with pytest.raises(ChunkError, match=r"bytes \[16, 48\) missing"):
        tail.finish()

    announced = ChunkAssembler([TensorSpec("w", "float32", (12,)), TensorSpec("b", "int8", ())])
    for chunk in chunks:
        announced.add(chunk)
    with pytest.raises(ChunkError, match="'b' incomplete: never arrived"):
        announced.finish()


def test_duplicate_and_overlapping_chunks_are_rejected() -> None:
    chunks = _chunks_of()
    assembler = ChunkAssembler()
    for chunk in chunks[:2]:
        assembler.add(chunk)

    with pytest.raises(ChunkError, match=r"\[16, 32\) overlaps bytes \[0, 32\)"):
        assembler.add(chunks[1])
    with pytest.raises(ChunkError, match=r"\[8, 40\) overlaps"):
        assembler.add(_chunk(shape=(12,), offset=8, data=b"\1" * 32))
    with pytest.raises(ChunkError, match=r"\[31, 33\) overlaps"):
        assembler.add(_chunk(shape=(12,), offset=31, data=b"\1" * 2))
    assembler.add(chunks[2])  # the rejected chunks left nothing behind
    _assert_same(assembler.finish(), {"w": torch.arange(12, dtype=torch.float32)})


def test_overlap_with_a_later_range_is_rejected() -> None:
    assembler = ChunkAssembler()
    assembler.add(_chunk(shape=(12,), offset=32, data=b"\0" * 16))

    with pytest.raises(ChunkError, match=r"\[24, 40\) overlaps bytes \[32, 48\)"):
        assembler.add(_chunk(shape=(12,), offset=24, data=b"\0" * 16))


def test_range_outside_the_tensor_is_rejected() -> None:
    with pytest.raises(ChunkError, match=r"\[40, 56\) lies outside \[0, 48\)"):
        ChunkAssembler().add(_chunk(shape=(12,), offset=40, data=b"\0" * 16))
    with pytest.raises(ChunkError, match=r"lies outside"):
        ChunkAssembler().add(_chunk(shape=(12,), offset=-4, data=b"\0" * 4))


@pytest.mark.parametrize("total", [0, 15, 17, 2**40])
def test_total_bytes_must_match_shape_and_dtype(total: int) -> None:
    with pytest.raises(ChunkError, match=r"declares total_bytes=\d+ but float32\[4\] is 16"):
        ChunkAssembler().add(_chunk(total=total))


@pytest.mark.parametrize("dtype", ["complex64", "bool", "float8", "", "FLOAT32"])
def test_unknown_dtype_is_rejected(dtype: str) -> None:
    with pytest.raises(ChunkError, match="unknown dtype"):
        ChunkAssembler().add(TensorChunk("w", dtype, (4,), 0, 16, b"\0" * 16))


def test_shape_dtype_and_total_must_stay_consistent_across_chunks() -> None:
    assembler = ChunkAssembler()
    assembler.add(_chunk(shape=(2, 4), data=b"\0" * 16))

    with pytest.raises(ChunkError, match=r"chunk says float32\[4, 2\], earlier chunks said"):
        assembler.add(_chunk(shape=(4, 2), offset=16, data=b"\0" * 16))
    with pytest.raises(ChunkError, match=r"chunk says int32\[2, 4\]"):
        assembler.add(_chunk(dtype="int32", shape=(2, 4), offset=16, data=b"\0" * 16))
    with pytest.raises(ChunkError, match=r"float32\[2, 8\]"):
        assembler.add(_chunk(shape=(2, 8), offset=16, data=b"\0" * 16))


def test_manifest_fixes_names_and_shapes() -> None:
    assembler = ChunkAssembler([TensorSpec("w", "float32", (4,))])

    with pytest.raises(ChunkError, match="'x' is not in the manifest"):
        assembler.add(_chunk(name="x"))
    with pytest.raises(ChunkError, match=r"chunk says float32\[2, 2\], earlier manifest said"):
        assembler.add(_chunk(shape=(2, 2)))
    with pytest.raises(ChunkError, match="lists tensor 'w' twice"):
        ChunkAssembler([TensorSpec("w", "float32", (4,)), TensorSpec("w", "int8", (1,))])


@pytest.mark.parametrize(
    ("name", "shape", "message"),
    [
        ("", (4,), "non-empty string"),
        ("x" * (MAX_NAME_BYTES + 1), (4,), "longer than"),
        ("é" * (MAX_NAME_BYTES // 2 + 1), (4,), "longer than"),  # counted in UTF-8 bytes
        ("w", (1,) * (MAX_RANK + 1), "at most 8"),
        ("w", (4, -1), "bad shape"),
    ],
)
def test_bad_names_and_shapes_are_rejected(name: str, shape: tuple, message: str) -> None:
    with pytest.raises(ChunkError, match=message):
        ChunkAssembler().add(TensorChunk(name, "float32", shape, 0, 16, b"\0" * 16))


def test_zero_byte_tensor_rules() -> None:
    assembler = ChunkAssembler()
    with pytest.raises(ChunkError, match="one empty chunk at offset 0"):
        assembler.add(_chunk(shape=(0,), data=b"\0"))
    assembler.add(_chunk(shape=(0,), data=b""))
    with pytest.raises(ChunkError, match="duplicate chunk of a 0-byte tensor"):
        assembler.add(_chunk(shape=(0,), data=b""))
    with pytest.raises(ChunkError, match="empty chunk at offset 4"):
        assembler.add(_chunk(name="v", offset=4, data=b""))


def test_no_chunks_after_finish() -> None:
    assembler = ChunkAssembler()
    assembler.add(_chunk())
    assembler.finish()

    with pytest.raises(ChunkError, match="after finish"):
        assembler.add(_chunk(name="late"))


def test_tensor_count_cap() -> None:
    assembler = ChunkAssembler(max_tensors=2)
    assembler.add(_chunk(name="a"))
    assembler.add(_chunk(name="b"))

    with pytest.raises(ChunkError, match="more than 2 tensors"):
        assembler.add(_chunk(name="c"))


# ---------------------------------------------------------------------------------
# Declared sizes: rejected before anything is allocated
# ---------------------------------------------------------------------------------


def _peak_python_allocation(action) -> int:
    tracemalloc.start()
    try:
        action()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


def test_huge_declared_chunk_is_rejected_without_allocating() -> None:
    huge = TensorChunk("w", "float32", (1 << 40,), 0, 4 << 40, b"\0" * 4)  # 4 TiB declared
    assembler = ChunkAssembler(max_total_bytes=1 << 20)

    def add() -> None:
        with pytest.raises(ChunkError, match=r"over the cap of 1048576"):
            assembler.add(huge)

    assert _peak_python_allocation(add) < 256 * 1024
    assert assembler.declared_bytes == 0


def test_huge_declared_manifest_is_rejected_at_construction() -> None:
    manifest = [TensorSpec("a", "float32", (1 << 20,)), TensorSpec("b", "bfloat16", (1 << 45,))]

    def construct() -> None:
        with pytest.raises(ChunkError, match="'b'.*over the cap"):
            ChunkAssembler(manifest, max_total_bytes=64 << 20)

    assert _peak_python_allocation(construct) < 256 * 1024


def test_cap_counts_all_tensors_together() -> None:
    assembler = ChunkAssembler(max_total_bytes=40)
    assembler.add(_chunk(name="a"))  # 16 bytes
    assembler.add(_chunk(name="b"))  # 32

    with pytest.raises(ChunkError, match="declared total to 48 bytes, over the cap of 40"):
        assembler.add(_chunk(name="c"))


def test_reassembly_holds_about_the_payload_once() -> None:
    """In-order chunks extend one run in place: the peak is the payload plus the bytearray's
    growth slack, not a copy per chunk."""
    assembler = ChunkAssembler()
    chunks = list(tensors_to_chunks({"w": torch.ones(1 << 18)}, 1 << 16))  # 1 MiB, 16 chunks

    def add_all() -> None:
        for chunk in chunks:
            assembler.add(chunk)

    peak = _peak_python_allocation(add_all)

    assert (1 << 20) <= peak < (1 << 20) + (256 << 10)
    assert torch.equal(assembler.finish()["w"], torch.ones(1 << 18))


# ---------------------------------------------------------------------------------
# Every message the chunker builds fits the per-message limit
# ---------------------------------------------------------------------------------


def test_chunker_messages_fit_the_default_limit() -> None:
    name = "é" * (MAX_NAME_BYTES // 2)  # the longest name, 512 UTF-8 bytes
    tensors = {
        name: torch.zeros((2,) * (MAX_RANK - 1) + (40_000,), dtype=torch.float32),  # 20 MB
        "head.weight": torch.zeros(3, 384, dtype=torch.bfloat16),
    }
    limit = DEFAULT_MAX_MESSAGE_BYTES

    sizes = []
    for chunk in tensors_to_chunks(tensors, chunk_data_budget(limit)):
        message = tensor_chunk_to_proto(chunk)  # FetchTensors stream message
        sizes.append(message.ByteSize())
        assert pb.UpdatePart(chunk=message).ByteSize() <= limit  # SubmitUpdate stream message

    assert len(sizes) == 6
    assert max(sizes) <= limit
    assert max(sizes) > limit - CHUNK_ENVELOPE_BYTES  # chunks are as large as allowed


@pytest.mark.parametrize("limit", [DEFAULT_MAX_MESSAGE_BYTES, 64 * 1024, CHUNK_ENVELOPE_BYTES + 1])
def test_worst_case_envelope_fits(limit: int) -> None:
    top = 2**64 - 1
    message = pb.UpdatePart(
        chunk=pb.TensorChunk(
            name="é" * (MAX_NAME_BYTES // 2),
            dtype=max(pb.DType.values()),
            shape=[top] * MAX_RANK,
            offset=top,
            total_bytes=top,
            data=b"\xff" * chunk_data_budget(limit),
        )
    )

    assert message.ByteSize() <= limit
    assert len(message.SerializeToString()) <= limit

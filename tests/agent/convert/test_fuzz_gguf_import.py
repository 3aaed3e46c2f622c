"""Fuzzing the GGUF importer: random bytes and mutated copies of a 5 KB GGUF file.

A one-layer LLaMA GGUF (hidden 8, F32 weights, an 8-token byte-level BPE vocabulary)
is written once with the ``gguf`` package. Each example converts random bytes (with and
without the GGUF magic) or a copy with a few bytes flipped, inserted, deleted or
overwritten with extreme integers, mostly in the metadata / tensor-info region where
lengths, counts, types, shapes and offsets live. ``convert_gguf`` either converts or
raises ``ModelLoadError`` naming the file, and a failed conversion leaves no output
folder and no staging folder behind.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from chainfed.agent.convert.gguf_import import convert_gguf
from chainfed.agent.errors import ModelLoadError

FUZZ = settings.get_profile("fuzz")  # tests/conftest.py


V = gguf.GGUFValueType
TOKENS = ["a", "b", "c", "Ġ", "Ġa", "ab", "<s>", "</s>"]
METADATA = {
    "llama.block_count": (1, V.UINT32),
    "llama.context_length": (64, V.UINT32),
    "llama.embedding_length": (8, V.UINT32),
    "llama.feed_forward_length": (16, V.UINT32),
    "llama.attention.head_count": (2, V.UINT32),
    "llama.attention.head_count_kv": (1, V.UINT32),
    "llama.rope.dimension_count": (4, V.UINT32),
    "llama.rope.freq_base": (10000.0, V.FLOAT32),
    "llama.attention.layer_norm_rms_epsilon": (1e-6, V.FLOAT32),
    "tokenizer.ggml.model": ("gpt2", V.STRING),
    "tokenizer.ggml.pre": ("default", V.STRING),
    "tokenizer.ggml.tokens": (TOKENS, V.ARRAY, V.STRING),
    "tokenizer.ggml.token_type": ([1] * 6 + [3, 3], V.ARRAY, V.INT32),
    "tokenizer.ggml.merges": (["a b", "Ġ a"], V.ARRAY, V.STRING),
    "tokenizer.ggml.bos_token_id": (6, V.UINT32),
    "tokenizer.ggml.eos_token_id": (7, V.UINT32),
}
"""Key -> (value, type[, element type]): a one-layer LLaMA with hidden size 8."""


def write_new(path: Path, data: bytes) -> None:
    """Write ``data`` as a new file: rewriting a file in place makes ext4 flush it to
    disk (auto_da_alloc), about 3 ms an example; a fresh inode costs microseconds."""
    path.unlink(missing_ok=True)
    path.write_bytes(data)


def tiny_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)

    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    return {
        "token_embd.weight": rand(len(TOKENS), 8),
        "output_norm.weight": rand(8),
        "blk.0.attn_norm.weight": rand(8),
        "blk.0.attn_q.weight": rand(8, 8),
        "blk.0.attn_k.weight": rand(4, 8),
        "blk.0.attn_v.weight": rand(4, 8),
        "blk.0.attn_output.weight": rand(8, 8),
        "blk.0.ffn_norm.weight": rand(8),
        "blk.0.ffn_gate.weight": rand(16, 8),
        "blk.0.ffn_up.weight": rand(16, 8),
        "blk.0.ffn_down.weight": rand(8, 16),
    }


def write_gguf(path: Path, metadata: dict, tensors: dict[str, np.ndarray]) -> int:
    """Write the file; returns where its tensor data starts (after metadata and infos)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, (value, *types) in metadata.items():
        writer.add_key_value(key, value, *types)
    for name, weight in tensors.items():
        writer.add_tensor(name, weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return min(int(t.data_offset) for t in gguf.GGUFReader(path).tensors)


class Kit:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.valid_path = root / "valid.gguf"
        self.data_start = write_gguf(self.valid_path, METADATA, tiny_tensors())
        self.valid = self.valid_path.read_bytes()
        self.path = root / "work" / "fuzzed.gguf"
        self.path.parent.mkdir()
        self.out = root / "work" / "out"

    def check(self, data: bytes) -> None:
        shutil.rmtree(self.out, ignore_errors=True)
        write_new(self.path, data)
        try:
            convert_gguf(self.path, self.out, progress=False)
            event("converted")
        except ModelLoadError as exc:
            assert str(self.path) in str(exc), str(exc)
            assert not self.out.exists()
            event(str(exc).removeprefix(f"{self.path}: ")[:30])
        assert sorted(p.name for p in self.path.parent.iterdir()) in (
            ["fuzzed.gguf"],
            ["fuzzed.gguf", "out"],
        )


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> Kit:
    return Kit(tmp_path_factory.mktemp("fuzz-gguf"))


EXTREMES = [0, 1, 2**31 - 1, 2**32 - 1, 2**63 - 1, 2**64 - 1]


@st.composite
def mutations(draw, data: bytes, data_start: int) -> bytes:
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        in_header = draw(st.integers(0, 9)) < 8
        where = draw(st.integers(4, data_start if in_header else len(out)))
        how = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "u32", "u64"]))
        if how == "flip" and where < len(out):
            out[where] ^= 1 << draw(st.integers(0, 7))
        elif how == "insert":
            out[where:where] = draw(st.binary(min_size=1, max_size=8))
        elif how == "delete":
            del out[where : where + draw(st.integers(1, 8))]
        elif how == "truncate":
            del out[where:]
        elif how in ("u32", "u64"):
            value = draw(st.sampled_from(EXTREMES)) & (2**32 - 1 if how == "u32" else 2**64 - 1)
            packed = struct.pack("<I" if how == "u32" else "<Q", value)
            out[where : where + len(packed)] = packed
    return bytes(out)


VALUES = st.one_of(
    st.tuples(st.integers(0, 2**32 - 1), st.just(V.UINT32)),
    st.tuples(st.sampled_from([0, 1, 3, 7, 8, 1000, 2**31 - 1]), st.just(V.UINT32)),
    st.tuples(st.integers(-(2**31), -1), st.just(V.INT32)),
    st.tuples(st.sampled_from([2**40, 2**64 - 1]), st.just(V.UINT64)),
    st.tuples(st.floats(width=32), st.just(V.FLOAT32)),
    st.tuples(st.booleans(), st.just(V.BOOL)),
    st.tuples(st.text(max_size=12), st.just(V.STRING)),
    st.tuples(
        st.lists(st.integers(-5, 2**31 - 1), min_size=1, max_size=10),
        st.just(V.ARRAY),
        st.just(V.INT32),
    ),
    st.tuples(
        st.lists(st.text(max_size=6), min_size=1, max_size=10), st.just(V.ARRAY), st.just(V.STRING)
    ),
)


TENSOR_EDITS = st.lists(
    st.tuples(
        st.sampled_from(sorted(tiny_tensors())),
        st.sampled_from(["drop", "shape", "f16", "extra"]),
        st.lists(st.integers(1, 20), min_size=1, max_size=3),
    ),
    max_size=2,
)


@st.composite
def edited_metadata(draw) -> dict:
    """METADATA with 1-3 keys given other values or types, or removed."""
    metadata = dict(METADATA)
    for key in draw(st.lists(st.sampled_from(sorted(METADATA)), min_size=1, max_size=3)):
        if draw(st.integers(0, 5)) == 0:
            metadata.pop(key, None)
        else:
            metadata[key] = draw(VALUES)
    return metadata


def edited_tensors(edits: list[tuple[str, str, list[int]]]) -> dict[str, np.ndarray]:
    tensors = tiny_tensors()
    for name, how, shape in edits:
        if how == "drop":
            tensors.pop(name, None)
        elif how == "shape" and name in tensors:
            tensors[name] = np.zeros(shape, np.float32)
        elif how == "f16" and name in tensors:
            tensors[name] = tensors[name].astype(np.float16)
        elif how == "extra":
            tensors[f"blk.{shape[0]}.{name.split('.')[-2]}.weight"] = np.zeros((2, 8), np.float32)
    return tensors


@FUZZ
@given(metadata=edited_metadata(), tensor_edits=TENSOR_EDITS)
@example(metadata={**METADATA, "llama.attention.head_count": (0, V.UINT32)}, tensor_edits=[])
@example(metadata={**METADATA, "llama.block_count": (2**32 - 1, V.UINT32)}, tensor_edits=[])
@example(metadata={**METADATA, "tokenizer.ggml.tokens": ("abc", V.STRING)}, tensor_edits=[])
@example(metadata={**METADATA, "tokenizer.ggml.pre": ([0], V.ARRAY, V.INT32)}, tensor_edits=[])
@example(metadata={**METADATA, "llama.rope.freq_base": ("x", V.STRING)}, tensor_edits=[])
@example(
    metadata={**METADATA, "tokenizer.ggml.merges": (["x y"], V.ARRAY, V.STRING)}, tensor_edits=[]
)
def test_edited_metadata_and_tensors(kit, metadata, tensor_edits):
    tensors = edited_tensors(tensor_edits)
    if tensors:  # the writer needs one
        staged = kit.root / "staged.gguf"
        staged.unlink(missing_ok=True)  # see write_new
        write_gguf(staged, metadata, tensors)
        kit.check(staged.read_bytes())


@FUZZ
@given(data=st.binary(max_size=600), magic=st.booleans())
@example(data=struct.pack("<IQQ", 3, 0, 2**63), magic=True)  # 2**63 metadata entries
@example(data=struct.pack("<IQQ", 3, 2**63, 0), magic=True)  # 2**63 tensors
def test_random_bytes_as_gguf(kit, data, magic):
    kit.check(b"GGUF" + data if magic else data)


@FUZZ
@given(data=st.data())
def test_mutated_gguf(kit, data):
    kit.check(data.draw(mutations(kit.valid, kit.data_start)))


def test_the_valid_file_converts(kit, tmp_path):
    out = convert_gguf(kit.valid_path, tmp_path / "out", progress=False)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()

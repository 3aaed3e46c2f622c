"""Fuzzing the safetensors model loader: random and mutated ``model.safetensors`` files.

A 4 KB one-layer LLaMA checkpoint is written once; each example replaces its
``model.safetensors`` with random bytes, a byte-mutated copy, or a copy whose JSON
header was edited (dtypes, shapes, offsets, names, metadata) and re-prefixed with its
true length, so the Rust parser's validation is reached, not just its length check.
Opening the folder and loading every tensor either succeeds or raises
``ModelLoadError`` naming the file.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from chainfed.agent.errors import ModelLoadError
from chainfed.agent.runtime.model import StreamingModel

FUZZ = settings.get_profile("fuzz")  # tests/conftest.py


def write_new(path: Path, data: bytes) -> None:
    """Write ``data`` as a new file: rewriting a file in place makes ext4 flush it to
    disk (auto_da_alloc), about 3 ms an example; a fresh inode costs microseconds."""
    path.unlink(missing_ok=True)
    path.write_bytes(data)


@pytest.fixture(scope="module")
def folders(tiny_models) -> tuple[Path, bytes]:
    """(the folder whose checkpoint each example replaces, the valid checkpoint's bytes)."""
    original = tiny_models.checkpoint("llama-d8")
    return original, (original / "model.safetensors").read_bytes()


def load_everything(model_dir: Path) -> None:
    model = StreamingModel(model_dir)
    model.load_embeddings()
    for i in range(model.num_layers):
        model.load_block(i)
    model.load_lm_head()


def assert_loads_or_names_the_file(model_dir: Path, data: bytes) -> None:
    path = model_dir / "model.safetensors"
    write_new(path, data)
    try:
        load_everything(model_dir)
    except ModelLoadError as exc:
        assert str(path) in str(exc) or str(model_dir) in str(exc), str(exc)


def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: object, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=8,
)
DTYPES = [
    "F32",
    "F16",
    "BF16",
    "F64",
    "I64",
    "I32",
    "I16",
    "I8",
    "U8",
    "BOOL",
    "F8_E4M3",
    "U64",
    "X",
]


@st.composite
def header_edits(draw, data: bytes) -> bytes:
    """The valid file with 1-3 edits of its JSON header, length prefix kept truthful."""
    header, body = split(data)
    names = sorted(k for k in header if k != "__metadata__")
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(names))
        entry = header.get(name)
        how = draw(
            st.sampled_from(
                ["dtype", "shape", "offsets", "entry", "delete", "rename", "meta", "body"]
            )
        )
        if how == "dtype" and isinstance(entry, dict):
            entry["dtype"] = draw(st.sampled_from(DTYPES))
        elif how == "shape" and isinstance(entry, dict):
            entry["shape"] = draw(st.lists(st.integers(-2, 2**64), max_size=5))
        elif how == "offsets" and isinstance(entry, dict):
            entry["data_offsets"] = draw(st.lists(st.integers(-2, 2**64), max_size=3))
        elif how == "entry":
            header[name] = draw(JSON_VALUES)
        elif how == "delete":
            header.pop(name, None)
        elif how == "rename":
            header[draw(st.text(max_size=20))] = header.pop(name, None)
        elif how == "meta":
            header["__metadata__"] = draw(JSON_VALUES)
        elif how == "body":
            body = body[: draw(st.integers(0, len(body)))]
    return join(header, body)


@FUZZ
@given(data=st.binary(max_size=512), prefix=st.booleans())
@example(data=b"", prefix=False)
@example(data=b"{}", prefix=True)
@example(data=struct.pack("<Q", 2**63) + b"{}", prefix=False)  # header length of 8 EiB
def test_random_bytes_as_safetensors(folders, data, prefix):
    """Random bytes, optionally behind a length prefix that matches them."""
    model_dir, _ = folders
    assert_loads_or_names_the_file(
        model_dir, struct.pack("<Q", len(data)) + data if prefix else data
    )


@FUZZ
@given(data=st.data())
def test_byte_mutated_safetensors(folders, byte_mutations, data):
    model_dir, valid = folders
    assert_loads_or_names_the_file(model_dir, data.draw(byte_mutations(valid)))


@FUZZ
@given(data=st.data())
def test_header_edited_safetensors(folders, data):
    model_dir, valid = folders
    assert_loads_or_names_the_file(model_dir, data.draw(header_edits(valid)))


def test_the_unmutated_folder_loads(folders, tmp_path):
    model_dir, valid = folders
    copy = Path(shutil.copytree(model_dir, tmp_path / "copy"))
    (copy / "model.safetensors").write_bytes(valid)
    load_everything(copy)

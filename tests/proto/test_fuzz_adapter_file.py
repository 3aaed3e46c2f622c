"""Fuzzing adapter files: random bytes, mutated bytes and edited ``chainfed`` metadata.

A valid 3 KB adapter file for a one-layer LLaMA (rank-2 adapters on every linear layer
plus a 3-class head) is written once. Each example replaces it with random bytes, a
byte-mutated copy, or a copy whose ``chainfed`` metadata JSON had keys replaced by
arbitrary JSON values. ``load_adapter_file`` and ``export.load_result`` (which checks the
file against the model) either succeed or raise ``AdapterFileError`` naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from chainfed.agent.convert.export import load_result
from chainfed.agent.runtime.lora import LoRAConfig
from chainfed.agent.runtime.model import StreamingModel
from chainfed.proto.adapter_file import (
    METADATA_KEY,
    AdapterFile,
    AdapterFileError,
    load_adapter_file,
    save_adapter_file,
)

FUZZ = settings.get_profile("fuzz")  # tests/conftest.py
INFO = {
    "task": "classify",
    "labels": ["neg", "neu", "pos"],
    "label_token_ids": None,
    "lora": LoRAConfig(rank=2, alpha=4.0, targets="all").to_dict(),
    "mode": "chain",
    "model_digest": "0" * 64,
    "pooling": "last",
    "max_len": 32,
}


def write_new(path: Path, data: bytes) -> None:
    """Write ``data`` as a new file: rewriting a file in place makes ext4 flush it to
    disk (auto_da_alloc), about 3 ms an example; a fresh inode costs microseconds."""
    path.unlink(missing_ok=True)
    path.write_bytes(data)


class Kit:
    def __init__(self, root: Path, model_dir: Path) -> None:
        self.model = StreamingModel(model_dir)
        g = torch.Generator().manual_seed(0)
        tensors = {}
        for name, (_, shape) in self.model.block_tensor_spec(0).items():
            if name.endswith(".weight") and len(shape) == 2:
                module, (out_f, in_f) = name.removesuffix(".weight"), shape
                tensors[f"layers.0.{module}.lora_a"] = torch.randn(2, in_f, generator=g)
                tensors[f"layers.0.{module}.lora_b"] = torch.randn(out_f, 2, generator=g)
        tensors["head.weight"] = torch.randn(3, 8, generator=g)
        tensors["head.bias"] = torch.randn(3, generator=g)
        self.tensors = tensors
        self.path = root / "adapters.safetensors"
        self.valid = save_adapter_file(root / "valid.safetensors", AdapterFile(tensors, INFO))
        self.valid_bytes = self.valid.read_bytes()

    def check(self, data: bytes | None = None) -> None:
        """Load ``self.path`` (first overwritten with ``data``); only AdapterFileError."""
        if data is not None:
            write_new(self.path, data)
        for load in (load_adapter_file, lambda p: load_result(self.model, p, check_model=False)):
            try:
                load(self.path)
            except AdapterFileError as exc:
                assert str(self.path) in str(exc), str(exc)


@pytest.fixture(scope="module")
def kit(tmp_path_factory, tiny_models) -> Kit:
    return Kit(tmp_path_factory.mktemp("fuzz-adapter"), tiny_models.checkpoint("llama-d8"))


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(["classify", "lm", "all", "attention", "mean", "last"]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(["rank", "alpha", "targets", "x"]), inner, max_size=4)
    ),
    max_leaves=8,
)


@FUZZ
@given(data=st.binary(max_size=512))
@example(data=b"")
def test_random_bytes_as_adapter_file(kit, data):
    kit.check(data)


@FUZZ
@given(data=st.data())
def test_byte_mutated_adapter_file(kit, byte_mutations, data):
    kit.check(data.draw(byte_mutations(kit.valid_bytes)))


@FUZZ
@given(
    edits=st.dictionaries(st.sampled_from(sorted(INFO)), JSON_VALUES, min_size=1, max_size=3),
    replace_all=st.one_of(st.none(), JSON_VALUES),
)
@example(edits={"labels": 5}, replace_all=None)  # was TypeError: 'int' object is not iterable
@example(edits={"task": "classify"}, replace_all=[1, 2])  # was AttributeError: list.get
@example(edits={"lora": {"rank": "2"}}, replace_all=None)
def test_edited_metadata(kit, edits, replace_all):
    """The valid tensors under metadata with some keys (or all of it) replaced."""
    info = {**INFO, **edits} if replace_all is None else replace_all
    kit.path.unlink(missing_ok=True)  # see write_new
    save_file(kit.tensors, str(kit.path), metadata={METADATA_KEY: json.dumps(info)})
    kit.check()


def test_the_valid_file_loads(kit):
    result = load_result(kit.model, kit.valid, check_model=False)
    assert result.labels == INFO["labels"] and set(result.head) == {"weight", "bias"}
    with safe_open(str(kit.valid), framework="pt") as f:
        assert json.loads(f.metadata()[METADATA_KEY]) == INFO

"""int8 frozen weights in the streaming model: blocks, the cache next to the model (built
once, reused, rebuilt for other model files, refused when corrupt), the option's values."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch

from chainfed.agent.app.options import SimulationConfig, SimulationError, device_argv
from chainfed.agent.convert.synthetic_checkpoint import write_random_checkpoint
from chainfed.agent.errors import ModelLoadError
from chainfed.agent.runtime import int8_cache
from chainfed.agent.runtime.int8_cache import CACHE_FILE
from chainfed.agent.runtime.lora import LoRAConfig, add_lora, target_names
from chainfed.agent.runtime.model import StreamingModel
from chainfed.agent.runtime.precision import Precision, PrecisionError
from chainfed.kernels import Int8Linear, LoRALinear, dequantize_int8, quantize_int8


def block_input(model: StreamingModel, seed: int = 0) -> tuple[torch.Tensor, object]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    return model.load_embeddings()(ids, mask), model.attention_context(mask)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_int8_block_is_the_float_block_with_dequantised_weights(tiny_models, family) -> None:
    """Every linear of an int8 block is an ``Int8Linear`` holding ``quantize_int8`` of the
    checkpoint's weight; the block computes what the float block computes with those
    weights dequantised, and stays within the quantisation error of the float block."""
    model_dir = tiny_models.checkpoint(family)
    floating = StreamingModel(model_dir)
    quantised = StreamingModel(model_dir, weights="int8")
    h, ctx = block_input(floating)
    for layer in range(floating.num_layers):
        block_f, block_q = floating.load_block(layer), quantised.load_block(layer)
        names = target_names(block_f, "all")
        assert names == target_names(block_q, "all") and len(names) >= 6
        for name in names:
            linear_f, linear_q = getattr(block_f, name), getattr(block_q, name)
            assert isinstance(linear_q, Int8Linear) and linear_q.weight.dtype == torch.int8
            q, s = quantize_int8(linear_f.weight)
            assert torch.equal(linear_q.weight, q) and torch.equal(linear_q.weight_scale, s)
            with torch.no_grad():
                linear_f.weight.copy_(dequantize_int8(q, s, torch.float32))
        with torch.no_grad():
            want, got = block_f(h, ctx), block_q(h, ctx)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        h = got


def test_int8_block_output_is_close_to_float(tiny_models) -> None:
    model_dir = tiny_models.checkpoint("llama")
    h, ctx = block_input(StreamingModel(model_dir))
    with torch.no_grad():
        want = StreamingModel(model_dir).load_block(0)(h, ctx)
        got = StreamingModel(model_dir, weights="int8").load_block(0)(h, ctx)
    assert ((got - want).norm() / want.norm()) < 1e-2


def test_lora_wraps_int8_linears_and_trains_only_the_adapter(tiny_models) -> None:
    model = StreamingModel(tiny_models.checkpoint("bert"), weights="int8")
    block = model.load_block(1)
    wrapped = add_lora(block, 1, LoRAConfig(rank=2, alpha=4.0))
    assert set(wrapped) == {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"}
    assert all(
        isinstance(m, LoRALinear) and isinstance(m.base, Int8Linear) for m in wrapped.values()
    )
    h, ctx = block_input(model)
    block(h.requires_grad_(), ctx).square().mean().backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()
    for module in wrapped.values():
        assert module.lora_a.grad is not None and module.lora_b.grad is not None
        assert module.base.bias.grad is None and module.base.weight.grad is None


def test_cache_is_built_once_next_to_the_model_and_reused(tiny_models, monkeypatch) -> None:
    model_dir = tiny_models.checkpoint("bert")
    first = StreamingModel(model_dir, weights="int8").load_block(2)
    path = model_dir / CACHE_FILE
    assert path.is_file()
    stat = path.stat()

    def refuse(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise AssertionError("quantised again")

    monkeypatch.setattr(int8_cache, "quantize_int8", refuse)
    again = StreamingModel(model_dir, weights="int8").load_block(2)
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == (stat.st_mtime_ns, stat.st_ino)
    for name in target_names(first, "all"):
        assert torch.equal(getattr(again, name).weight, getattr(first, name).weight)
    assert [p.name for p in model_dir.iterdir() if p.name.endswith(".tmp")] == []
    StreamingModel(model_dir).load_block(2)  # float weights never open the cache


def test_cache_of_other_model_files_is_rebuilt(tiny_models) -> None:
    model_dir = tiny_models.checkpoint("bert")
    StreamingModel(model_dir, weights="int8").load_block(0)
    config = json.loads((model_dir / "config.json").read_text())
    write_random_checkpoint(config, model_dir, seed=1)  # same shapes, other weights
    rebuilt = StreamingModel(model_dir, weights="int8").load_block(0)
    q, _ = quantize_int8(StreamingModel(model_dir).load_block(0).q_proj.weight)
    assert torch.equal(rebuilt.q_proj.weight, q)


def _flip_data_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))


def _rewrite_metadata(path: Path, **changes: str) -> None:
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    header["__metadata__"].update(changes)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (size - len(blob))
    assert len(blob) == size
    path.write_bytes(raw[:8] + blob + raw[8 + size :])


def _drop_last_tensor(path: Path) -> None:
    """A well-formed file, digest included, that lacks the last scale tensor."""
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    data = raw[8 + size : 8 + size + header.pop(last)["data_offsets"][0]]
    header["__metadata__"]["data_digest"] = hashlib.blake2b(data, digest_size=16).hexdigest()
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [
        (_flip_data_byte, "do not hash to the digest"),
        (lambda p: p.write_bytes(p.read_bytes()[:100]), "past the end of the file"),
        (lambda p: p.write_bytes(b"\xff" * 64), "past the end of the file"),
        (lambda p: _rewrite_metadata(p, chainfed_int8="9"), "format version '9'"),
        (lambda p: _rewrite_metadata(p, data_digest="f" * 32), "do not hash to the digest"),
        (_drop_last_tensor, "is None, expected F32"),
    ],
    ids=["flipped-byte", "truncated", "garbage", "version", "digest", "missing-tensor"],
)
def test_corrupt_cache_is_refused_with_a_clear_error(tiny_models, corrupt, reason) -> None:
    model_dir = tiny_models.checkpoint("llama")
    StreamingModel(model_dir, weights="int8").load_block(0)
    corrupt(model_dir / CACHE_FILE)
    with pytest.raises(ModelLoadError, match="corrupt int8 weight cache") as info:
        StreamingModel(model_dir, weights="int8").load_block(0)
    assert reason in str(info.value) and CACHE_FILE in str(info.value)
    (model_dir / CACHE_FILE).unlink()  # what the message says to do
    StreamingModel(model_dir, weights="int8").load_block(0)


def test_weights_values_are_checked_everywhere(tiny_models) -> None:
    with pytest.raises(PrecisionError, match="unknown weights 'int4': use float or int8"):
        StreamingModel(tiny_models.checkpoint("bert"), weights="int4")
    with pytest.raises(PrecisionError, match="unknown weights"):
        Precision.resolve("cpu", "float32", "nf4")
    with pytest.raises(SimulationError, match="unknown weights 'int4'"):
        SimulationConfig(weights="int4")
    assert Precision.resolve("cpu", None, "int8").describe() == "cpu float32, int8 frozen weights"
    assert Precision.resolve("cpu").weights == "float"
    assert device_argv(None, None) == []
    assert device_argv("cpu", "float32", weights="int8") == [
        "--device", "cpu", "--dtype", "float32", "--weights", "int8"
    ]  # fmt: skip


def test_a_checkpoint_holding_some_blocks_quantises_those(tiny_models) -> None:
    """The memory benchmark's slice: the config has 4 layers, the checkpoint 2 blocks."""
    model_dir = tiny_models.checkpoint("bert", num_hidden_layers=2)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 4}))
    model = StreamingModel(model_dir, weights="int8")
    assert isinstance(model.load_block(1).q_proj, Int8Linear)
    assert model.int8_weights().layers == {0, 1}
    with pytest.raises(ModelLoadError, match="not found"):
        model.load_block(2)

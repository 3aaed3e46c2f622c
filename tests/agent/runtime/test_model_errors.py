"""Bad model folders raise ``ModelLoadError`` naming the path and the problem."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from chainfed.agent.convert.synthetic_checkpoint import write_random_checkpoint
from chainfed.agent.errors import ModelLoadError
from chainfed.agent.runtime.model import StreamingModel, hidden_states

TINY_LLAMA = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 50,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


@pytest.fixture
def tiny_dir(tmp_path):
    return write_random_checkpoint(TINY_LLAMA, tmp_path / "tiny")


def test_tiny_checkpoint_streams(tiny_dir):
    states = hidden_states(tiny_dir, torch.tensor([[1, 2, 3]]))
    assert len(states) == 3 and all(torch.isfinite(s).all() for s in states)
    head = StreamingModel(tiny_dir).load_lm_head()
    assert head(states[-1]).shape == (1, 3, 50)


def test_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match=f"{tmp_path / 'nope'}.*not found"):
        StreamingModel(tmp_path / "nope")


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json not found"):
        StreamingModel(tmp_path)


def test_unreadable_config(tiny_dir):
    (tiny_dir / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot read config.json"):
        StreamingModel(tiny_dir)


def test_unsupported_architecture_lists_supported(tiny_dir):
    config = dict(TINY_LLAMA, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (tiny_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as info:
        StreamingModel(tiny_dir)
    message = str(info.value)
    assert "gpt2" in message and "GPT2LMHeadModel" in message
    for supported in ("bert", "roberta", "llama", "mistral", "qwen2"):
        assert supported in message


def test_missing_checkpoint(tiny_dir):
    (tiny_dir / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no model.safetensors"):
        StreamingModel(tiny_dir)


def test_missing_tensor_names_tensor_and_file(tiny_dir):
    path = tiny_dir / "model.safetensors"
    model = StreamingModel(tiny_dir)
    tensors = model.checkpoint.load(
        {n: model.checkpoint.shape(n) for n in model.checkpoint.names()}
    )
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(path))
    model = StreamingModel(tiny_dir)
    model.load_block(0)
    with pytest.raises(ModelLoadError) as info:
        model.load_block(1)
    assert "model.layers.1.mlp.up_proj.weight" in str(info.value)
    assert str(path) in str(info.value)


def test_shape_mismatch_against_config(tiny_dir):
    config = dict(TINY_LLAMA, intermediate_size=96)
    (tiny_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as info:
        StreamingModel(tiny_dir).load_block(0)
    message = str(info.value)
    assert "model.layers.0.self_attn" in message or "mlp" in message
    assert "[64, 32]" in message and "[96, 32]" in message


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(tiny_dir, damage):
    path = tiny_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07" * 300)
    with pytest.raises(ModelLoadError, match=f"{path}.*not a readable safetensors file"):
        StreamingModel(tiny_dir)


def test_shard_index_naming_missing_shard(tmp_path):
    model_dir = write_random_checkpoint(TINY_LLAMA, tmp_path / "m", max_shard_bytes=20_000)
    shards = sorted(model_dir.glob("model-*.safetensors"))
    assert len(shards) > 1
    states = hidden_states(model_dir, torch.tensor([[4, 5]]))
    assert len(states) == 3
    shards[-1].unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        StreamingModel(model_dir)


def test_bad_tokenizer(tiny_dir, minilm_path):
    with pytest.raises(ModelLoadError, match="tokenizer.json not found"):
        StreamingModel(tiny_dir).tokenizer()
    (tiny_dir / "tokenizer.json").write_text("[1, 2")
    with pytest.raises(ModelLoadError, match="cannot read tokenizer"):
        StreamingModel(tiny_dir).tokenizer()
    shutil.copy(minilm_path / "tokenizer.json", tiny_dir / "tokenizer.json")
    assert StreamingModel(tiny_dir).tokenizer().encode("hi").ids

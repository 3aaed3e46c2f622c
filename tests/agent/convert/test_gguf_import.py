"""GGUF import: the converted SmolLM2 folder against transformers' own GGUF loader, plus errors.

transformers is the reference only (never imported by the agent). Loading the GGUF through it
takes ~15 s on CPU, so the tokenizer and the model are loaded once per module.

Like with like for the tokenizer: ``tokenizers.Tokenizer.encode`` adds special tokens by default
and ``transformers`` tokenizers do too (``add_special_tokens=True``), so the ids are compared that
way and again with special tokens off. SmolLM2's GGUF says ``add_bos_token = False``, so neither
side adds a BOS; the chat markers in the text are matched as special added tokens by both.
"""

import json
import os
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from chainfed.agent.convert import gguf_tokenizer
from chainfed.agent.convert.assets import smollm2_gguf
from chainfed.agent.convert.gguf_import import MARKER_FILE, convert_gguf
from chainfed.agent.errors import ModelLoadError

TEXTS = [
    "Hello world",
    " leading space and trailing space ",
    "naïve café, résumé — déjà vu; Ærøskøbing, São Paulo",
    "Emoji: 😀👍🏽🚀 and a family 👨‍👩‍👧‍👦 zwj sequence",
    "中文分词测试：我爱自然语言处理。日本語のテキスト、한국어 문장",
    "Русский текст и ελληνικά γράμματα",
    "multiple     spaces\tand\t\ttabs\nand\n\n\nnewlines\r\nCRLF",
    "   \n\t  \n",
    "def f(x):\n    return x**2  # square\n\nprint(f(12345))",
    "for (int i = 0; i < 10; ++i) { sum += a[i] * 3.14159; }",
    "Numbers: 0 7 42 1234567890 3.14 -2.5e-10 1,000,000 2024-06-01",
    "\n\n1. first item\n2. second item\n   10. indented",
    "x = [1,   2,    3]",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are helpful.<|im_end|><|endoftext|>",
    "text<|im_end|>glued<|im_start|>markers",
    "I'm sure they'll've done it; it's what we'd do. DON'T SHOUT",
    "URLs https://example.com/a?b=c&d=%20e and emails a.b@c.org",
    "Mixed\u00a0nbsp\u2003em-space\u200bzero-width and combining e\u0301",
    "@airline thanks for nothing!!! #fail :( 2h delay... ✈️",
]


@pytest.fixture(scope="module")
def transformers_mod():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_tokenizer(transformers_mod):
    path = smollm2_gguf()
    return transformers_mod.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def hf_model(transformers_mod):
    path = smollm2_gguf()
    return transformers_mod.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )


@pytest.fixture(scope="module")
def our_tokenizer(smollm2_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- the folder


def test_smollm2_folder_layout(smollm2_dir: Path):
    names = {path.name for path in smollm2_dir.iterdir()}
    assert names == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        MARKER_FILE,
    }
    config = _read_json(smollm2_dir / "config.json")
    expected = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "rms_norm_eps": 1e-05,
        "rope_theta": 100000.0,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "torch_dtype": "float32",
        "hidden_act": "silu",
        "attention_bias": False,
    }
    assert {key: config[key] for key in expected} == expected
    assert "rope_scaling" not in config
    assert _read_json(smollm2_dir / "generation_config.json") == {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    }
    tokenizer_config = _read_json(smollm2_dir / "tokenizer_config.json")
    reader = gguf.GGUFReader(smollm2_gguf())
    assert (
        tokenizer_config["chat_template"] == reader.get_field("tokenizer.chat_template").contents()
    )
    assert tokenizer_config["bos_token"] == "<|im_start|>"
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    assert tokenizer_config["add_bos_token"] is False


def test_conversion_time_and_progress_bar(tmp_path: Path, capsys):
    started = time.perf_counter()
    out = convert_gguf(smollm2_gguf(), tmp_path / "smollm2", progress=True)
    elapsed = time.perf_counter() - started
    print(f"SmolLM2-135M Q4_1 GGUF -> HF folder in {elapsed:.1f} s")
    assert out == tmp_path / "smollm2"
    assert "272/272" in capsys.readouterr().err  # one tick per tensor
    assert elapsed < 60
    assert [path.name for path in tmp_path.iterdir()] == ["smollm2"]  # no staging left behind


# ----------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("text", TEXTS, ids=[f"text{i:02d}" for i in range(len(TEXTS))])
def test_tokenizer_ids_match_transformers(text: str, our_tokenizer: Tokenizer, hf_tokenizer):
    with_specials = our_tokenizer.encode(text).ids
    assert with_specials == hf_tokenizer(text, add_special_tokens=True)["input_ids"]
    without = our_tokenizer.encode(text, add_special_tokens=False).ids
    assert without == hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert our_tokenizer.decode(with_specials, skip_special_tokens=False) == text


def test_chat_markers_are_single_special_tokens(our_tokenizer: Tokenizer):
    ids = our_tokenizer.encode("<|im_start|>user\nHi<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2
    assert our_tokenizer.decode(ids) == "user\nHi"  # special tokens are skipped by default


def test_tokenizer_json_matches_transformers_backend(smollm2_dir: Path, hf_tokenizer):
    ours = _read_json(smollm2_dir / "tokenizer.json")
    theirs = json.loads(hf_tokenizer.backend_tokenizer.to_str())
    for part in ("normalizer", "pre_tokenizer", "post_processor", "decoder", "added_tokens"):
        assert ours[part] == theirs[part], part
    assert ours["model"] == theirs["model"]  # type, vocab and merges


def test_converted_folder_loads_in_transformers(smollm2_dir: Path, hf_tokenizer, transformers_mod):
    folder_tokenizer = transformers_mod.AutoTokenizer.from_pretrained(smollm2_dir)
    for text in TEXTS:
        assert folder_tokenizer(text)["input_ids"] == hf_tokenizer(text)["input_ids"]
    messages = [{"role": "user", "content": "Hi there"}]
    rendered = folder_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert rendered == hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert rendered.endswith("<|im_start|>assistant\n")


def test_pre_tokenizer_table_agrees_with_transformers(transformers_mod):
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    for name, regex in gguf_tokenizer._PRE_TOKENIZER_SPLITS.items():
        assert GGUF_PRE_TOKENIZER_SPLITS.get(name) == regex, name


# ----------------------------------------------------------------------------- weights, config


def test_weights_match_transformers(smollm2_dir: Path, hf_model):
    reference = hf_model.state_dict()
    with safe_open(smollm2_dir / "model.safetensors", framework="pt") as tensors:
        names = set(tensors.keys())
        # tied: transformers lists lm_head.weight as the embedding itself; the file omits it
        assert names == set(reference) - {"lm_head.weight"}
        assert reference["lm_head.weight"] is reference["model.embed_tokens.weight"] or torch.equal(
            reference["lm_head.weight"], reference["model.embed_tokens.weight"]
        )
        for name in sorted(names):
            ours = tensors.get_tensor(name)
            assert ours.dtype == torch.float32, name
            torch.testing.assert_close(ours, reference[name], rtol=0, atol=1e-6, msg=name)


def test_config_matches_transformers(smollm2_dir: Path, hf_model, transformers_mod):
    ours = transformers_mod.AutoConfig.from_pretrained(smollm2_dir)
    theirs = hf_model.config
    for field in (
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "hidden_act",
        "attention_bias",
        "mlp_bias",
        "rope_parameters",
    ):
        assert getattr(ours, field) == getattr(theirs, field), field
    # GGUF stores eps as float32; we write 1e-05, transformers 9.999999747378752e-06: same float32
    assert np.float32(ours.rms_norm_eps) == np.float32(theirs.rms_norm_eps)


def test_converted_folder_gives_transformers_logits(smollm2_dir: Path, hf_model, hf_tokenizer):
    """End to end: the folder loaded as a plain HF checkpoint computes what the GGUF load does."""
    from transformers import LlamaForCausalLM

    folder_model = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    ids = torch.tensor([hf_tokenizer("<|im_start|>user\nWhat is 2+2?<|im_end|>")["input_ids"]])
    with torch.no_grad():
        expected = hf_model(ids).logits
        actual = folder_model(ids).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- tiny synthetic GGUF


def _llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to Q/K rows (the forward direction)."""
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _write_tiny_gguf(
    path: Path,
    *,
    arch: str = "llama",
    tokenizer_model: str = "gpt2",
    drop: str | None = None,
) -> dict[str, np.ndarray]:
    """A 2-layer LLaMA GGUF with F32 weights; returns the HF-layout weights it encodes."""
    hidden, inter, n_heads, n_kv, head_dim, layers = 32, 48, 4, 2, 8, 2
    rng = np.random.default_rng(0)
    tokens = [chr(c) for c in range(ord("!"), ord("~") + 1)] + ["Ġ", "Ġt", "<|endoftext|>"]
    vocab = len(tokens)

    def rand(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    hf = {"model.embed_tokens.weight": rand(vocab, hidden), "model.norm.weight": rand(hidden)}
    gguf_tensors = {"token_embd.weight": hf["model.embed_tokens.weight"]}
    gguf_tensors["output_norm.weight"] = hf["model.norm.weight"]
    for i in range(layers):
        prefix = f"model.layers.{i}."
        block = {
            "attn_norm": ("input_layernorm", rand(hidden)),
            "attn_q": ("self_attn.q_proj", rand(n_heads * head_dim, hidden)),
            "attn_k": ("self_attn.k_proj", rand(n_kv * head_dim, hidden)),
            "attn_v": ("self_attn.v_proj", rand(n_kv * head_dim, hidden)),
            "attn_output": ("self_attn.o_proj", rand(hidden, n_heads * head_dim)),
            "ffn_norm": ("post_attention_layernorm", rand(hidden)),
            "ffn_gate": ("mlp.gate_proj", rand(inter, hidden)),
            "ffn_up": ("mlp.up_proj", rand(inter, hidden)),
            "ffn_down": ("mlp.down_proj", rand(hidden, inter)),
        }
        for gguf_name, (hf_name, weight) in block.items():
            hf[f"{prefix}{hf_name}.weight"] = weight
            if gguf_name == "attn_q":
                weight = _llama_cpp_permute(weight, n_heads)
            elif gguf_name == "attn_k":
                weight = _llama_cpp_permute(weight, n_kv)
            gguf_tensors[f"blk.{i}.{gguf_name}.weight"] = weight
    if drop is not None:
        del gguf_tensors[drop]

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(layers)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (vocab - 1) + [3])
    writer.add_token_merges(["Ġ t"])
    writer.add_bos_token_id(vocab - 1)
    writer.add_eos_token_id(vocab - 1)
    for name, weight in gguf_tensors.items():
        writer.add_tensor(name, weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


def test_tiny_gguf_round_trips_to_hf_weights(tmp_path: Path):
    """Undoing llama.cpp's Q/K permutation recovers the HF weights exactly (no transformers)."""
    hf = _write_tiny_gguf(tmp_path / "tiny.gguf")
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "tiny", progress=False)
    with safe_open(out / "model.safetensors", framework="np") as tensors:
        assert set(tensors.keys()) == set(hf)
        for name, weight in hf.items():
            np.testing.assert_array_equal(tensors.get_tensor(name), weight, err_msg=name)
    config = _read_json(out / "config.json")
    assert (config["num_key_value_heads"], config["head_dim"]) == (2, 8)
    assert config["rms_norm_eps"] == 1e-06
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tokenizer.encode("a t<|endoftext|>").tokens == ["a", "Ġt", "<|endoftext|>"]


def test_previous_conversion_is_replaced(tmp_path: Path):
    _write_tiny_gguf(tmp_path / "tiny.gguf")
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "tiny", progress=False)
    (out / "stale.txt").write_text("from an older conversion")
    convert_gguf(tmp_path / "tiny.gguf", out, progress=False)
    assert not (out / "stale.txt").exists()
    assert (out / "config.json").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tiny", "tiny.gguf"]


def test_empty_existing_out_dir_is_used(tmp_path: Path):
    _write_tiny_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "out").mkdir()
    convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- errors


def test_missing_file(tmp_path: Path):
    path = tmp_path / "nope.gguf"
    with pytest.raises(ModelLoadError, match="not found") as error:
        convert_gguf(path, tmp_path / "out", progress=False)
    assert str(path) in str(error.value)
    assert not (tmp_path / "out").exists()


def test_random_bytes(tmp_path: Path):
    path = tmp_path / "random.gguf"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelLoadError, match="not a GGUF file") as error:
        convert_gguf(path, tmp_path / "out", progress=False)
    assert str(path) in str(error.value)


@pytest.mark.parametrize(
    "keep", [2, 1000, 2_000_000, -10], ids=["magic", "kv", "tensor-info", "data"]
)
def test_truncated_copy(tmp_path: Path, keep: int):
    source = smollm2_gguf()
    with source.open("rb") as handle:
        head = handle.read(keep if keep >= 0 else source.stat().st_size + keep)
    path = tmp_path / "truncated.gguf"
    path.write_bytes(head)
    with pytest.raises(ModelLoadError) as error:
        convert_gguf(path, tmp_path / "out", progress=False)
    assert str(path) in str(error.value)
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture(tmp_path: Path):
    path = tmp_path / "gpt2.gguf"
    _write_tiny_gguf(path, arch="gpt2")
    with pytest.raises(ModelLoadError, match=r"architecture 'gpt2'.*supported: llama") as error:
        convert_gguf(path, tmp_path / "out", progress=False)
    assert str(path) in str(error.value)


def test_sentencepiece_tokenizer_is_refused(tmp_path: Path):
    path = tmp_path / "spm.gguf"
    _write_tiny_gguf(path, tokenizer_model="llama")
    with pytest.raises(ModelLoadError, match="tokenizer.ggml.model 'llama'"):
        convert_gguf(path, tmp_path / "out", progress=False)


def test_missing_tensor_leaves_nothing_behind(tmp_path: Path):
    path = tmp_path / "broken.gguf"
    _write_tiny_gguf(path, drop="blk.1.ffn_up.weight")
    with pytest.raises(ModelLoadError, match="model.layers.1.mlp.up_proj.weight"):
        convert_gguf(path, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.gguf"]


def test_refuses_foreign_non_empty_out_dir(tmp_path: Path):
    _write_tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ModelLoadError, match="refusing to overwrite") as error:
        convert_gguf(tmp_path / "tiny.gguf", out, progress=False)
    assert str(out) in str(error.value)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]

"""Our streamed blocks against transformers on real weights: all-MiniLM-L6-v2 and SmolLM2."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from chainfed.agent.convert.assets import smollm2_gguf
from chainfed.agent.runtime.generate import generate
from chainfed.agent.runtime.model import StreamingModel, hidden_states

TEXTS = [
    "Hello world",
    "A much longer sentence about airlines, delays and self-driving cars today!",
    "a short one here",
]


@pytest.fixture(scope="module")
def minilm_reference(minilm_path):
    """A padded batch of ``TEXTS`` and transformers' hidden states of all-MiniLM-L6-v2."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert batch["attention_mask"].sum(1).unique().numel() == 3, "lengths must differ"
    reference = AutoModel.from_pretrained(minilm_path, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = reference(**batch, output_hidden_states=True).hidden_states
    return batch, theirs


def _real_token_diffs(model_dir: Path, batch, theirs) -> list[float]:
    """Max abs difference of our streamed hidden states from ``theirs``, per layer, over
    real-token positions only: at padding positions the two implementations legitimately
    differ (masked keys leave those rows' attention free), and nothing downstream reads
    them."""
    ours = hidden_states(model_dir, batch["input_ids"], batch["attention_mask"])
    assert len(ours) == len(theirs)
    real = batch["attention_mask"].bool()
    return [(a - b)[real].abs().max().item() for a, b in zip(ours, theirs, strict=True)]


def test_minilm_hidden_states_match_transformers(minilm_path, minilm_reference):
    batch, theirs = minilm_reference
    diffs = _real_token_diffs(minilm_path, batch, theirs)
    assert len(diffs) == 7
    for layer, diff in enumerate(diffs):
        assert diff < 1e-4, f"hidden state {layer}: max abs diff {diff:.2e}"


@pytest.mark.parametrize("defect", ["norm epsilon 1e-5", "one attention bias off by 1e-3"])
def test_minilm_parity_check_catches_a_wrong_model(minilm_path, minilm_reference, tmp_path, defect):
    """The real-token comparison stays discriminating: a folder whose LayerNorm epsilon
    (1e-12 in the real config) or one bias value is wrong fails the 1e-4 bound."""
    for item in minilm_path.iterdir():
        if item.is_file() and item.name not in ("config.json", "model.safetensors"):
            (tmp_path / item.name).symlink_to(item)
    config = json.loads((minilm_path / "config.json").read_text())
    weights = load_file(minilm_path / "model.safetensors")
    if defect.startswith("norm"):
        config["layer_norm_eps"] = 1e-5
    else:
        name = next(k for k in weights if k.endswith("layer.0.attention.output.dense.bias"))
        weights[name] = weights[name].clone()
        weights[name][0] += 1e-3
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(weights, tmp_path / "model.safetensors")

    batch, theirs = minilm_reference
    assert max(_real_token_diffs(tmp_path, batch, theirs)) > 1e-4


def test_our_tokenizer_matches_transformers_for_minilm(minilm_path):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(minilm_path)
    ours = StreamingModel(minilm_path).tokenizer()
    for text in TEXTS + ["Ünïcödé  and\ttabs", "@united thanks for NOTHING #fail"]:
        assert ours.encode(text).ids == reference(text)["input_ids"]


@pytest.fixture(scope="module")
def hf_smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    return tokenizer, model


def _right_padded(tokenizer, texts, pad_id):
    rows = [tokenizer.encode(t).ids for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def test_smollm2_hidden_states_and_logits_match_transformers(smollm2_dir, hf_smollm2):
    _, reference = hf_smollm2
    model = StreamingModel(smollm2_dir)
    ids, mask = _right_padded(model.tokenizer(), TEXTS, pad_id=2)
    assert mask.sum(1).unique().numel() == 3

    ours = hidden_states(smollm2_dir, ids, mask)
    with torch.no_grad():
        out = reference(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    # transformers applies the final norm to its last hidden state; ours is the raw block output.
    theirs = out.hidden_states
    assert len(ours) == len(theirs) == 31
    for layer, (a, b) in enumerate(zip(ours[:-1], theirs[:-1], strict=True)):
        diff = (a - b).abs().max().item()
        assert diff < 1e-4, f"hidden state {layer}: max abs diff {diff:.2e}"
    head = model.load_lm_head()
    assert (head.norm(ours[-1]) - theirs[-1]).abs().max().item() < 1e-4
    with torch.no_grad():
        logits = head(ours[-1])
    diff = (logits - out.logits).abs().max().item()
    assert diff < 1e-4, f"logits: max abs diff {diff:.2e}"


def test_smollm2_greedy_generation_matches_transformers(smollm2_dir, hf_smollm2):
    tokenizer, reference = hf_smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = StreamingModel(smollm2_dir).tokenizer().encode(prompt).ids
    assert prompt_ids == tokenizer(prompt, add_special_tokens=False)["input_ids"]

    eos = reference.generation_config.eos_token_id
    stop_ids = set(eos) if isinstance(eos, list) else {eos}
    ours = generate(StreamingModel(smollm2_dir), prompt_ids, max_new_tokens=16, stop_ids=stop_ids)
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt_ids]), max_new_tokens=16, do_sample=False)
    theirs = out[0, len(prompt_ids) :].tolist()
    assert len(theirs) > 4
    assert ours == theirs, (tokenizer.decode(ours), tokenizer.decode(theirs))
    assert "Paris" in tokenizer.decode(ours)

"""``chainfed generate`` / ``chainfed classify``: quick checks of a trained result.

Generation with adapters is held to transformers + PEFT (the exported adapters) token for
token, the chat template to transformers' ``apply_chat_template``; classification prints
our runtime's probabilities, truncated as in training.
"""

import sys
from pathlib import Path

import pytest
import torch

from chainfed.agent.app.check_command import (
    AdaptedModel,
    chat_template,
    classify_logits,
    prompt_ids,
    render_chat,
    stop_ids,
)
from chainfed.agent.cli import main
from chainfed.agent.convert.export import export_peft
from chainfed.agent.errors import ChainFedError
from chainfed.agent.runtime.generate import generate
from chainfed.agent.runtime.lora import LoRAConfig
from chainfed.agent.runtime.model import StreamingModel
from chainfed.proto.adapter_file import AdapterFile, save_adapter_file

LABELS = ["negative", "neutral", "positive"]
PROMPT = "What is the capital of France?"


def random_result(model_dir: Path, path: Path, *, task: str, layers: list[int], **info) -> Path:
    """An adapter file with random non-zero adapters (rank 4, alpha 8) on every linear of
    ``layers``, plus a random 3-class head for classify."""
    model = StreamingModel(model_dir)
    g = torch.Generator().manual_seed(7)
    tensors = {}
    for layer in layers:
        for name, (_, shape) in model.block_tensor_spec(layer).items():
            if name.endswith(".weight") and len(shape) == 2:
                prefix = f"layers.{layer}.{name.removesuffix('.weight')}."
                tensors[prefix + "lora_a"] = (torch.rand(4, shape[1], generator=g) - 0.5) / 10
                tensors[prefix + "lora_b"] = torch.randn(shape[0], 4, generator=g) * 0.02
    if task == "classify":
        tensors["head.weight"] = torch.randn(3, model.config.hidden_size, generator=g)
        tensors["head.bias"] = torch.zeros(3)
    meta = {
        "task": task,
        "labels": LABELS if task == "classify" else [],
        "lora": LoRAConfig(rank=4, alpha=8.0).to_dict(),
        "model_digest": model.fingerprint,
        **info,
    }
    return save_adapter_file(path, AdapterFile(tensors, meta))


def parse_classify(out: str) -> list[tuple[str, dict[str, float]]]:
    rows = []
    for line in out.strip().splitlines():
        label, probs = line.split("\t")
        rows.append((label, {k: float(v) for k, v in (p.split("=") for p in probs.split())}))
    return rows


# --------------------------------------------------------------------------- classify


@pytest.fixture(scope="module")
def minilm_result(minilm_path, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("qc") / "classify.safetensors"
    return random_result(minilm_path, path, task="classify", layers=[4, 5], max_len=10)


def test_classify_prints_label_and_probabilities_of_our_runtime(minilm_path, minilm_result, capsys):
    texts = ["I love this airline", "worst delay ever"]
    argv = ["classify", "--model", str(minilm_path), "--adapters", str(minilm_result), *texts]
    assert main(argv) == 0
    rows = parse_classify(capsys.readouterr().out)

    model = AdaptedModel(minilm_path, minilm_result)
    assert len(rows) == len(texts)
    for text, (label, probs) in zip(texts, rows, strict=True):
        ids = torch.tensor([model.tokenizer().encode(text).ids])
        expected = classify_logits(model, ids, torch.ones_like(ids)).softmax(-1)[0]
        assert list(probs) == LABELS
        assert torch.allclose(torch.tensor(list(probs.values())), expected, atol=1e-4)
        assert label == LABELS[int(expected.argmax())]


def test_classify_truncates_at_the_training_max_len(minilm_path, minilm_result, capsys):
    # max_len 10 = [CLS] + 8 word pieces + [SEP]: what follows the 8th piece is never seen
    same_start = "one two three four five six seven eight"
    argv = ["classify", "--model", str(minilm_path), "--adapters", str(minilm_result)]
    assert main([*argv, same_start + " great", same_start + " awful", same_start]) == 0
    (_, a), (_, b), (_, c) = parse_classify(capsys.readouterr().out)
    assert a == b == c


def test_classify_and_generate_refuse_what_they_cannot_check(
    minilm_path, minilm_result, smollm2_dir, tmp_path, capsys
):
    lm = random_result(smollm2_dir, tmp_path / "lm.safetensors", task="lm", layers=[1])
    assert main(["classify", "--model", str(smollm2_dir), "--adapters", str(lm), "hi"]) == 2
    assert (
        "task 'lm' result, not 'classify'; check it with chainfed generate"
        in capsys.readouterr().err
    )
    assert (
        main(["generate", "--model", str(minilm_path), "--adapters", str(minilm_result), "hi"]) == 2
    )
    assert "encoder" in capsys.readouterr().err
    assert (
        main(["classify", "--model", str(smollm2_dir), "--adapters", str(minilm_result), "x"]) == 2
    )
    assert "different model" in capsys.readouterr().err


# --------------------------------------------------------------------------- generate


def test_chat_template_renders_like_transformers(smollm2_dir):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(smollm2_dir)
    messages = [{"role": "user", "content": PROMPT}]
    expected = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    template = chat_template(smollm2_dir)
    assert template is not None
    assert render_chat(smollm2_dir, template, PROMPT) == expected

    model = StreamingModel(smollm2_dir)
    ids = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert prompt_ids(model, PROMPT, use_chat_template=True) == list(ids)
    assert prompt_ids(model, PROMPT, use_chat_template=False) == reference(PROMPT)["input_ids"]


def test_a_model_without_chat_template_gets_the_raw_prompt(minilm_path):
    assert chat_template(minilm_path) is None
    model = StreamingModel(minilm_path)
    assert prompt_ids(model, "hi", use_chat_template=True) == model.tokenizer().encode("hi").ids


def test_missing_jinja2_is_a_clear_error(smollm2_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "jinja2", None)
    with pytest.raises(ChainFedError, match=r"jinja2.*--no-chat-template"):
        render_chat(smollm2_dir, chat_template(smollm2_dir), PROMPT)


def test_generate_with_adapters_matches_transformers_peft_greedy(smollm2_dir, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapters = random_result(smollm2_dir, tmp_path / "lm.safetensors", task="lm", layers=[2, 20])
    exported = export_peft(smollm2_dir, adapters, tmp_path / "peft")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, exported).eval()
    ids = prompt_ids(StreamingModel(smollm2_dir), PROMPT, use_chat_template=True)
    with torch.no_grad():
        out = reference.generate(input_ids=torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    theirs = out[0, len(ids) :].tolist()

    argv = ["generate", "--model", str(smollm2_dir), "--adapters", str(adapters)]
    assert main([*argv, "--max-new-tokens", "8", PROMPT]) == 0
    printed = capsys.readouterr().out
    assert printed == tokenizer.decode(theirs, skip_special_tokens=True) + "\n"
    assert len(theirs) > 4

    model = AdaptedModel(smollm2_dir, adapters)
    assert stop_ids(smollm2_dir) == {2}
    sampled = [
        generate(model, ids, max_new_tokens=3, stop_ids={2}, temperature=0.8, seed=5)
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1], "a seed fixes the sample"
    assert 1 <= len(sampled[0]) <= 3

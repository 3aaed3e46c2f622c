"""Our streamed BERT blocks against transformers on the real all-MiniLM-L6-v2 weights."""

import torch

from chainfed.agent.model import StreamingModel, hidden_states

TEXTS = [
    "Hello world",
    "A much longer sentence about airlines, delays and self-driving cars today!",
    "a short one here",
]


def test_minilm_hidden_states_match_transformers(minilm_path):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert batch["attention_mask"].sum(1).unique().numel() == 3, "lengths must differ"

    ours = hidden_states(minilm_path, batch["input_ids"], batch["attention_mask"])
    reference = AutoModel.from_pretrained(minilm_path, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = reference(**batch, output_hidden_states=True).hidden_states

    assert len(ours) == len(theirs) == 7
    for layer, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        diff = (a - b).abs().max().item()
        assert diff < 1e-4, f"hidden state {layer}: max abs diff {diff:.2e}"


def test_our_tokenizer_matches_transformers_for_minilm(minilm_path):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(minilm_path)
    ours = StreamingModel(minilm_path).tokenizer()
    for text in TEXTS + ["Ünïcödé  and\ttabs", "@united thanks for NOTHING #fail"]:
        assert ours.encode(text).ids == reference(text)["input_ids"]

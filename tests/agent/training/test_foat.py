"""FOAT (DESIGN.md §3): per-layer linear CKA against the family's reference (the
embedding output on encoders, block 0's RMS-normalised output on decoders), and the start
layer it picks. ``linear_cka`` itself is checked against its definition in test_cka.py.

Prepare: tiny random bert and llama checkpoints (d=32, 4 layers), right-padded batches.
Execute: ``probe_cka`` and, for reference, ``hidden_states`` + ``linear_cka`` by hand.
Assert: the scores agree; ``choose_start_layer`` and the trainer start where they should.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chainfed.agent.runtime.lora import LoRAConfig
from chainfed.agent.runtime.model import StreamingModel, hidden_states
from chainfed.agent.training.chain import ChainConfig, ChainTrainer, EncodedSplit
from chainfed.agent.training.cka import linear_cka, masked_token_rows
from chainfed.agent.training.foat import probe_cka
from chainfed.agent.training.objectives import ClassifyObjective
from chainfed.proto.chain_rules import choose_start_layer

D, VOCAB, L, T = 32, 100, 4, 12


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dirs(tiny_models) -> dict[str, Path]:
    return {
        family: tiny_models.checkpoint(family, hidden_size=D, num_hidden_layers=L, vocab_size=VOCAB)
        for family in ("bert", "llama")
    }


def make_split(n: int, seed: int) -> EncodedSplit:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, T + 1, (n,), generator=generator)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()  # (n, T), right padded
    ids = torch.randint(1, VOCAB, (n, T), generator=generator) * mask
    return EncodedSplit(ids, mask, torch.randint(0, 3, (n,), generator=generator))


def test_probe_cka_on_an_encoder_compares_each_block_output_with_the_embeddings(model_dirs):
    split = make_split(16, seed=1)  # ~100 real tokens > d = 32
    ids, mask = split.input_ids, split.attention_mask

    scores = probe_cka(StreamingModel(model_dirs["bert"]), ids, mask)

    states = hidden_states(model_dirs["bert"], ids, mask)  # embeddings, block 0 .. L-1
    reference = masked_token_rows(states[0], mask)
    by_hand = [linear_cka(masked_token_rows(h, mask), reference) for h in states[1:]]
    assert len(scores) == L
    assert scores == pytest.approx(by_hand, abs=1e-12)
    assert all(0.0 <= s <= 1.0 + 1e-12 for s in scores)


def test_probe_cka_on_a_decoder_compares_rms_normalised_tokens_with_block_0s_output(model_dirs):
    split = make_split(16, seed=1)
    ids, mask = split.input_ids, split.attention_mask

    scores = probe_cka(StreamingModel(model_dirs["llama"]), ids, mask)

    states = hidden_states(model_dirs["llama"], ids, mask)
    token_rows = [masked_token_rows(h, mask) for h in states[1:]]
    normalised = [x / x.square().mean(dim=-1, keepdim=True).sqrt() for x in token_rows]
    by_hand = [linear_cka(x, normalised[0]) for x in normalised]
    assert len(scores) == L
    assert scores[0] == pytest.approx(1.0, abs=1e-12)
    assert scores == pytest.approx(by_hand, abs=1e-6)
    assert all(0.0 <= s <= 1.0 + 1e-12 for s in scores)


def test_one_token_with_a_massive_activation_does_not_own_a_decoders_scores(model_dirs):
    """Scaling one token's residual state (as massive activations do) changes nothing a
    pre-norm block reads, so it must not change the scores; the raw CKA collapses."""
    split = make_split(16, seed=1)
    ids, mask = split.input_ids, split.attention_mask
    model = StreamingModel(model_dirs["llama"])
    states = hidden_states(model_dirs["llama"], ids, mask)
    scaled = [h.clone() for h in states[1:]]
    for h in scaled:
        h[0, 0] *= 1000.0

    def normalised(h: torch.Tensor) -> torch.Tensor:
        x = masked_token_rows(h, mask)
        return x / x.square().mean(dim=-1, keepdim=True).sqrt()

    reference = normalised(scaled[0])
    assert [linear_cka(normalised(h), reference) for h in scaled] == pytest.approx(
        probe_cka(model, ids, mask), abs=1e-6
    )

    def raw(hs: list[torch.Tensor]) -> list[float]:
        return [linear_cka(masked_token_rows(h, mask), masked_token_rows(hs[0], mask)) for h in hs]

    assert max(abs(a - b) for a, b in zip(raw(scaled), raw(states[1:]), strict=True)) > 0.05


def test_probe_cka_ignores_padding(model_dirs):
    """Padding rows are not compared: extra padded columns leave the scores unchanged
    (up to float32 rounding of the longer attention)."""
    split = make_split(8, seed=2)
    ids, mask = split.input_ids, split.attention_mask
    padded_ids = torch.cat([ids, torch.zeros(8, 5, dtype=ids.dtype)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(8, 5, dtype=mask.dtype)], dim=1)
    model = StreamingModel(model_dirs["llama"])  # causal: real tokens never see padding
    assert probe_cka(model, padded_ids, padded_mask) == pytest.approx(
        probe_cka(model, ids, mask), abs=1e-6
    )


@pytest.mark.parametrize(
    "scores, threshold, expected",
    [
        ([0.95, 0.9, 0.7, 0.6], 0.8, 2),
        ([0.7, 0.9, 0.6, 0.5], 0.8, 0),
        ([0.95, 0.85, 0.9, 0.3], 0.8, 3),
        ([0.9, 0.8, 0.7], 0.8, 2),  # equal to the threshold is not below it
        ([0.95, 0.9, 0.85, 0.81], 0.8, 3),  # none below: the last layer
        ([0.5], 0.8, 0),
        ([0.9], 0.8, 0),
    ],
)
def test_choose_start_layer_picks_the_first_below_threshold(scores, threshold, expected):
    assert choose_start_layer(scores, threshold) == expected


def test_choose_start_layer_default_threshold_is_the_design_default():
    assert choose_start_layer([0.85, 0.79, 0.5]) == 1
    assert ChainConfig().foat_threshold == 0.8


def run_with_foat(model_dir: Path, tmp_path: Path, threshold: float) -> ChainTrainer:
    config = ChainConfig(
        start_layer=None,
        foat_threshold=threshold,
        foat_samples=10,
        window=2,
        gpo="none",
        micro_batch=4,
        steps_per_round=1,
        max_rounds=1,
        lora=LoRAConfig(rank=2),
    )
    objective = ClassifyObjective(D, 3, "mean", seed=0)
    trainer = ChainTrainer(
        StreamingModel(model_dir),
        objective,
        make_split(16, 1),
        make_split(8, 2),
        config,
        tmp_path,
        progress=False,
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize(
    "threshold, start", [(2.0, 0), (-1.0, L - 1), (None, None)], ids=["all", "none", "mid"]
)
def test_trainer_starts_the_chain_where_foat_says(model_dirs, tmp_path, threshold, start):
    """Scores come from the first ``foat_samples`` training samples; the chain runs from
    the chosen layer to L-1. ``mid``: a threshold between two real scores."""
    model_dir = model_dirs["bert"]
    probe = make_split(16, 1).batch(slice(0, 10))
    scores = probe_cka(StreamingModel(model_dir), probe.input_ids, probe.attention_mask)
    if threshold is None:
        ranked = sorted(scores)
        threshold = (ranked[-1] + ranked[-2]) / 2  # only the highest score is not below
        start = 0 if scores[0] < threshold else 1

    trainer = run_with_foat(model_dir, tmp_path, threshold)

    assert trainer.foat_scores == pytest.approx(scores, abs=1e-12)
    assert trainer.start_layer == start == choose_start_layer(scores, threshold)
    assert [r.layer for r in trainer.stages] == list(range(start, L))
    layers = {int(name.split(".")[1]) for name in trainer.final_adapters}
    assert layers == set(range(start, L))

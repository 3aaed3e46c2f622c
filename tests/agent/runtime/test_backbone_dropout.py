"""Dropout of the trained blocks (``ChainConfig.backbone_dropout``, ``BertBlock.dropout``).

Prepare: a tiny random BERT (and LLaMA) checkpoint, the chain tests' random splits.
Execute: run block 0 with and without dropout, in train and eval mode; train a chain
with and without ``backbone_dropout``; send the setting through the protocol.
Assert: at 0, or in eval mode, the block computes exactly the dropout-free output;
in training it drops (a different output per draw, the same for the same seed); the
trainer sets it on window blocks only and its validation is unaffected; a llama model
refuses it; ``chainfed simulate --backbone-dropout`` reaches the agents' trainer config.
"""

from __future__ import annotations

import argparse

import pytest
import torch

from chainfed.agent.app.options import SimulationConfig
from chainfed.agent.app.simulation import coordinator_argv
from chainfed.agent.federation.federated_agent import chain_config_from_params
from chainfed.agent.runtime.model import StreamingModel
from chainfed.coordinator.command import add_arguments, coordinator_config
from chainfed.proto.messages import ProtocolError, TrainingParams

from ..training.test_chain import LAYERS, VOCAB, D, fast_config, make_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bert_dir(tiny_models):
    return tiny_models.checkpoint("bert", hidden_size=D, num_hidden_layers=LAYERS, vocab_size=VOCAB)


def block_and_input(bert_dir):
    model = StreamingModel(bert_dir)
    block = model.load_block(0)
    ids = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 5:] = 0
    h = model.load_embeddings()(ids, mask)
    return block, h, model.attention_context(mask)


def test_block_without_dropout_or_in_eval_mode_is_the_plain_block(bert_dir):
    block, h, ctx = block_and_input(bert_dir)
    plain = block.eval()(h, ctx)

    assert torch.equal(block.train()(h, ctx), plain)  # dropout 0 while training
    block.dropout = 0.3
    assert torch.equal(block.eval()(h, ctx), plain)


def test_block_in_training_drops_reproducibly_for_a_seed(bert_dir):
    block, h, ctx = block_and_input(bert_dir)
    plain = block.eval()(h, ctx)
    block.dropout = 0.3
    block.train()

    torch.manual_seed(5)
    first = block(h, ctx)
    second = block(h, ctx)
    torch.manual_seed(5)
    again = block(h, ctx)

    assert not torch.allclose(first, plain)
    assert not torch.allclose(first, second)
    assert torch.equal(first, again)


def test_trainer_drops_in_window_blocks_only_while_training(bert_dir, tmp_path):
    torch.manual_seed(0)
    plain = make_trainer(bert_dir, tmp_path / "a", fast_config(window=LAYERS, mode="e2e"))
    torch.manual_seed(0)
    dropped = make_trainer(
        bert_dir, tmp_path / "b", fast_config(window=LAYERS, mode="e2e", backbone_dropout=0.3)
    )
    for trainer in (plain, dropped):
        trainer.set_start_layer(0)
        trainer.enter_stage(LAYERS - 1)

    assert {b.dropout for b in dropped.window_blocks.values()} == {0.3}
    assert {b.dropout for b in plain.window_blocks.values()} == {0.0}
    assert dropped.evaluate_window() == plain.evaluate_window()
    assert dropped.train_round(1).train_loss != plain.train_round(1).train_loss


def test_backbone_dropout_is_refused_where_it_does_not_apply(tiny_models, tmp_path):
    llama = tiny_models.checkpoint(
        "llama", hidden_size=D, num_hidden_layers=LAYERS, vocab_size=VOCAB
    )
    with pytest.raises(ValueError, match="backbone_dropout is for the bert family"):
        make_trainer(llama, tmp_path, fast_config(backbone_dropout=0.1), lm=True)
    with pytest.raises(ValueError, match=r"backbone_dropout must be in \[0, 1\)"):
        fast_config(backbone_dropout=1.0)
    with pytest.raises(ProtocolError, match=r"backbone_dropout must be in \[0, 1\)"):
        TrainingParams(backbone_dropout=-0.1)


def test_simulate_backbone_dropout_reaches_the_agents_trainer(minilm_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = SimulationConfig(mode="e2e", backbone_dropout=0.1)
    args = parser.parse_args(["--state-dir", "-", "--token", "-", *coordinator_argv(config, 6)])

    params = coordinator_config(args, StreamingModel(minilm_path).spec()).params

    assert params.backbone_dropout == 0.1
    assert chain_config_from_params(params, 6).backbone_dropout == 0.1

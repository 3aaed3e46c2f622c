"""Activation recompute inside the window (``ChainConfig.recompute``): the same training
with less kept for backward.

Prepare: the tiny random checkpoints of ``test_chain`` and its random token splits.
Execute: the same chain twice, recompute on and off, and count window-block forwards.
Assert: identical per-stage losses and final adapters (the recompute runs the same
arithmetic, dropout masks included), and each window block's attention half runs three
times and its feed-forward half twice per training micro-batch with recompute, each once
without; ``e2e`` never recomputes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chainfed.agent.runtime.lora import LoRAConfig
from chainfed.agent.training.chain import ChainTrainer

from .test_chain import LAYERS, VOCAB, D, assert_same_values, fast_config, make_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bert_dir(tiny_models) -> Path:
    return tiny_models.checkpoint("bert", hidden_size=D, num_hidden_layers=LAYERS, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def llama_dir(tiny_models) -> Path:
    return tiny_models.checkpoint(
        "llama", hidden_size=D, num_hidden_layers=LAYERS, vocab_size=VOCAB
    )


def run_chain(model_dir, workdir, *, lm: bool, **overrides) -> ChainTrainer:
    torch.manual_seed(0)  # LoRA dropout draws from the global generator
    trainer = make_trainer(model_dir, workdir, fast_config(**overrides), lm=lm)
    trainer.train()
    return trainer


@pytest.mark.parametrize(
    ("family", "lm", "overrides"),
    [
        ("bert", False, {"gpo": "exact:all"}),
        ("bert", False, {"gpo": "proxy", "lora": LoRAConfig(rank=2, alpha=4.0, dropout=0.2)}),
        ("llama", True, {"gpo": "proxy", "micro_batch": 2, "start_layer": 1}),
        (
            "llama",
            True,
            {"gpo": "proxy", "micro_batch": 2, "lora": LoRAConfig(rank=2, alpha=4.0, dropout=0.2)},
        ),
        ("bert", False, {"mode": "topk", "topk": 3, "baseline_rounds": 1}),
        ("bert", False, {"gpo": "proxy", "backbone_dropout": 0.2}),
    ],
    ids=[
        "bert-exact-foresight",
        "bert-lora-dropout",
        "llama-lm-proxy",
        "llama-lora-dropout",
        "bert-topk",
        "bert-backbone-dropout",
    ],
)
def test_recompute_gives_the_same_losses_and_adapters(
    family, lm, overrides, bert_dir, llama_dir, tmp_path
):
    model_dir = bert_dir if family == "bert" else llama_dir

    on = run_chain(model_dir, tmp_path / "on", lm=lm, recompute=True, **overrides)
    off = run_chain(model_dir, tmp_path / "off", lm=lm, recompute=False, **overrides)

    assert [(s.train_loss, s.val_loss, s.val_metric) for s in on.stages] == [
        (s.train_loss, s.val_loss, s.val_metric) for s in off.stages
    ]
    assert_same_values(on.final_adapters, off.final_adapters)
    for name, param in on.objective.named_parameters():
        assert torch.equal(param, dict(off.objective.named_parameters())[name]), name


@pytest.mark.parametrize(
    ("mode", "recompute", "attention_runs", "ffn_runs"),
    [
        ("chain", True, 3, 2),
        ("chain", False, 1, 1),
        ("e2e", True, 1, 1),
    ],
)
def test_each_window_block_half_runs_again_in_backward_only_with_recompute(
    mode, recompute, attention_runs, ffn_runs, bert_dir, tmp_path
):
    """With recompute, backward runs the attention half twice (once without grad for
    the feed-forward half's input, once with grad) and the feed-forward half once."""
    config = fast_config(mode=mode, recompute=recompute, baseline_rounds=1)
    trainer = make_trainer(bert_dir, tmp_path, config)
    trainer.set_start_layer(0)
    trainer.enter_stage(trainer.L - 1)
    calls = {(layer, half): 0 for layer in trainer.window for half in ("attention", "ffn")}
    for layer in trainer.window:
        block = trainer.window_blocks[layer]
        for half in ("attention", "ffn"):
            run = getattr(block, f"{half}_half")

            def counted(*args, key=(layer, half), run=run):
                calls[key] += 1
                return run(*args)

            setattr(block, f"{half}_half", counted)

    trainer.train_round(steps=3)

    assert trainer.recomputes == (recompute and mode != "e2e")
    assert calls == {
        (layer, half): 3 * (attention_runs if half == "attention" else ffn_runs)
        for layer in trainer.window
        for half in ("attention", "ffn")
    }

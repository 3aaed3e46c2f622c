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

import numpy as np
import pytest
import torch

from chainfed.agent.runtime.lora import LoRAConfig
from chainfed.agent.training.chain import ChainTrainer, _chunk_context, _RecomputedBlock

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
        ("e2e-streamed", True, 3, 2),
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


@pytest.mark.parametrize(
    ("family", "lm", "overrides"),
    [
        ("bert", False, {}),
        ("bert", False, {"lora": LoRAConfig(rank=2, alpha=4.0, dropout=0.2)}),
        ("llama", True, {"micro_batch": 2}),
    ],
    ids=["bert", "bert-lora-dropout", "llama-lm"],
)
def test_e2e_streamed_trains_exactly_as_e2e(family, lm, overrides, bert_dir, llama_dir, tmp_path):
    """Every layer trained from the cached embedding output with every block recomputed:
    the same losses, adapters and head as e2e's, which embeds each batch and keeps all
    activations."""
    model_dir = bert_dir if family == "bert" else llama_dir
    runs = {
        mode: run_chain(
            model_dir, tmp_path / mode, lm=lm, mode=mode, baseline_rounds=2, **overrides
        )
        for mode in ("e2e", "e2e-streamed")
    }

    e2e, streamed = runs["e2e"], runs["e2e-streamed"]
    assert streamed.recomputes and not e2e.recomputes
    assert {name.split(".")[1] for name in e2e.final_adapters} == {str(i) for i in range(LAYERS)}
    assert [(s.train_loss, s.val_loss, s.val_metric) for s in streamed.stages] == [
        (s.train_loss, s.val_loss, s.val_metric) for s in e2e.stages
    ]
    assert_same_values(streamed.final_adapters, e2e.final_adapters)
    for name, param in streamed.objective.named_parameters():
        assert torch.equal(param, dict(e2e.objective.named_parameters())[name]), name


def test_e2e_streamed_without_recompute_is_refused():
    with pytest.raises(ValueError, match="e2e-streamed recomputes every block"):
        fast_config(mode="e2e-streamed", recompute=False)


def adapter_grads(trainer: ChainTrainer) -> dict[str, torch.Tensor]:
    """The window adapters' gradients after one training micro-batch's backward."""
    grads = {}
    for layer in trainer.window:
        for name, param in trainer.window_blocks[layer].named_parameters():
            if param.requires_grad:
                grads[f"{layer}.{name}"] = param.grad.clone()
    return grads


def one_backward(model_dir, workdir, *, lm: bool, **overrides) -> tuple[ChainTrainer, float]:
    """A fresh trainer at the last stage (a full window), one micro-batch forward and
    backward as ``train_round`` runs it; the loss."""
    torch.manual_seed(0)
    config = fast_config(micro_batch=8, lora=LoRAConfig(rank=2, alpha=4.0), **overrides)
    trainer = make_trainer(model_dir, workdir, config, lm=lm)
    trainer.set_start_layer(0)
    trainer.enter_stage(trainer.L - 1)
    for layer in trainer.window:  # B starts at zero: move it off so every gradient is live
        for name, param in trainer.window_blocks[layer].named_parameters():
            if name.endswith("lora_b"):
                torch.nn.init.normal_(param, std=0.1, generator=torch.Generator().manual_seed(1))
    idx = trainer._next_rows()
    batch = trainer.train_data.batch(idx)
    h, _ = trainer._window_forward(trainer._entry_states(trainer.train_data, idx, True), batch)
    loss = trainer.objective.loss(h, batch)
    loss.backward()
    return trainer, loss.item()


@pytest.mark.parametrize(("family", "lm"), [("bert", False), ("llama", True)])
@pytest.mark.parametrize("chunks", [2, 3, 8])
def test_chunked_recompute_matches_one_chunk_up_to_summation_order(
    family, lm, chunks, bert_dir, llama_dir, tmp_path
):
    """Chunks of samples give the same loss and adapter gradients as the whole
    micro-batch, up to float32 rounding: each chunk's block outputs are the same function
    of its samples, and an adapter gradient — a sum over the micro-batch's B·T tokens — is
    summed per chunk and then across chunks. Reordering a float32 sum of n terms moves it
    by at most about n·2⁻²⁴ of the sum of the terms' magnitudes; with n = 8·8 tokens that
    is ~4e-6 relative, so 1e-5 of the largest gradient entry bounds it and a wrong chunk
    (a gradient from the wrong samples, a missing chunk) fails by orders of magnitude."""
    model_dir = bert_dir if family == "bert" else llama_dir

    one, loss_one = one_backward(model_dir, tmp_path / "one", lm=lm, recompute_chunks=1)
    many, loss_many = one_backward(model_dir, tmp_path / "many", lm=lm, recompute_chunks=chunks)

    assert loss_many == pytest.approx(loss_one, rel=1e-6)
    expected, got = adapter_grads(one), adapter_grads(many)
    assert expected.keys() == got.keys()
    for name, grad in expected.items():
        assert grad.abs().max() > 0, name
        atol = 1e-5 * grad.abs().max().item()
        torch.testing.assert_close(got[name], grad, rtol=0, atol=atol, msg=name)


def test_two_chunks_are_exactly_two_plain_chunks_with_dropout(bert_dir, tmp_path):
    """With LoRA dropout each chunk's recompute draws the masks its forward drew: the
    gradients equal, bit for bit, those of plain autograd over the same two chunks run
    one after the other (two addends sum the same in either order)."""
    lora = LoRAConfig(rank=2, alpha=4.0, dropout=0.3)
    config = fast_config(micro_batch=8, lora=lora, recompute_chunks=2)
    trainer = make_trainer(bert_dir, tmp_path, config)
    trainer.set_start_layer(0)
    trainer.enter_stage(0)
    block = trainer.window_blocks[0]
    block.train()
    rows = np.arange(8)
    batch = trainer.train_data.batch(rows)
    h = trainer._entry_states(trainer.train_data, rows, True)
    ctx = trainer.model.attention_context(batch.attention_mask)
    grad_out = torch.randn(h.shape, generator=torch.Generator().manual_seed(3))
    params = [p for p in block.parameters() if p.requires_grad]

    torch.manual_seed(5)
    out = _RecomputedBlock.apply(h, block, ctx, 2, trainer.model.release_pages, *params)
    recomputed = torch.autograd.grad(out, params, grad_out)
    torch.manual_seed(5)
    halves = [
        block(h[piece], _chunk_context(ctx, piece, 8)) for piece in (slice(0, 4), slice(4, 8))
    ]
    plain = torch.autograd.grad(torch.cat(halves), params, grad_out)

    assert torch.equal(out, torch.cat(halves).detach())
    for got, expected in zip(recomputed, plain, strict=True):
        assert torch.equal(got, expected)

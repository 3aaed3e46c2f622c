"""``plan_for_budget``: fit a chain stage into ``--memory-budget`` (agent/budget.py).

Order of sacrifice: micro-batch first (keeping micro_batch × grad_accum ≥ the effective
batch), then the window, then the exact foresight depth; too small a budget raises
``BudgetError`` naming the minimum. Budgets are derived from ``estimate_stage_bytes``
itself, so the tests check the planner's decisions, not the estimate's constants.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from chainfed.agent.errors import ChainFedError
from chainfed.agent.runtime.model_config import ModelConfig
from chainfed.agent.training.budget import (
    BudgetError,
    activation_bytes,
    estimate_stage_bytes,
    plan_for_budget,
)
from chainfed.agent.training.chain import ChainConfig
from chainfed.proto.units import parse_bytes

SEQ = 64
MINILM = ModelConfig.from_hf(
    {
        "model_type": "bert",
        "hidden_size": 384,
        "intermediate_size": 1536,
        "num_hidden_layers": 6,
        "num_attention_heads": 12,
        "vocab_size": 30522,
        "max_position_embeddings": 512,
    }
)
SMOLLM2 = ModelConfig.from_hf(
    {
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
    }
)


def estimate(cfg: ModelConfig, config: ChainConfig, task: str = "classify", **changes) -> int:
    return estimate_stage_bytes(cfg, replace(config, **changes), seq_len=SEQ, task=task)


def plan(cfg: ModelConfig, config: ChainConfig, budget: int, task: str = "classify"):
    return plan_for_budget(cfg, config, budget, seq_len=SEQ, task=task)


def test_estimate_grows_with_micro_batch_window_and_foresight_depth():
    config = ChainConfig(window=2, micro_batch=8, gpo="exact:4")
    base = estimate(SMOLLM2, config)
    assert (
        estimate(SMOLLM2, config, micro_batch=16) > base > estimate(SMOLLM2, config, micro_batch=4)
    )
    assert estimate(SMOLLM2, config, window=3) > base > estimate(SMOLLM2, config, window=1)
    assert base > estimate(SMOLLM2, config, gpo="exact:1")
    assert estimate(SMOLLM2, config, task="lm") > base  # the LM head's weights


def test_a_config_that_fits_is_returned_unchanged():
    config = ChainConfig(window=3, micro_batch=16, grad_accum=2, gpo="proxy")
    assert plan(MINILM, config, estimate(MINILM, config)) == config


@pytest.mark.parametrize("micro_batch, grad_accum", [(16, 1), (16, 3), (12, 2)])
def test_micro_batch_shrinks_first_and_accumulation_keeps_the_effective_batch(
    micro_batch, grad_accum
):
    config = ChainConfig(window=2, micro_batch=micro_batch, grad_accum=grad_accum)
    effective = micro_batch * grad_accum
    smaller = micro_batch // 2  # the planner halves
    budget = estimate(MINILM, config, micro_batch=smaller)
    assert budget < estimate(MINILM, config)

    planned = plan(MINILM, config, budget)

    assert planned.window == 2  # the window is untouched while a smaller batch fits
    assert planned.micro_batch == smaller
    assert planned.micro_batch * planned.grad_accum >= effective
    assert planned.micro_batch * (planned.grad_accum - 1) < effective  # no needless steps
    assert estimate_stage_bytes(MINILM, planned, seq_len=SEQ, task="classify") <= budget


def test_window_shrinks_once_micro_batch_one_does_not_fit():
    config = ChainConfig(window=3, micro_batch=8, gpo="proxy")
    budget = estimate(MINILM, config, window=3, micro_batch=1) - 1
    fitting = [
        m for m in (8, 4, 2, 1) if estimate(MINILM, config, window=2, micro_batch=m) <= budget
    ]

    planned = plan(MINILM, config, budget)

    assert planned.window == 2
    assert planned.micro_batch == max(fitting)  # back to the largest batch that fits
    assert planned.micro_batch * planned.grad_accum >= 8
    assert planned.gpo == "proxy"


def test_exact_foresight_depth_shrinks_last():
    config = ChainConfig(window=2, micro_batch=4, gpo="exact:all")
    budget = estimate(SMOLLM2, config, window=1, micro_batch=1, gpo="exact:4")
    assert budget < estimate(SMOLLM2, config, window=1, micro_batch=1, gpo="exact:8")

    planned = plan(SMOLLM2, config, budget)

    assert (planned.window, planned.micro_batch, planned.gpo) == (1, 1, "exact:4")
    assert planned.grad_accum == 4


def test_too_small_a_budget_names_the_minimum():
    config = ChainConfig(window=2, micro_batch=16)
    minimum = estimate(MINILM, config, window=1, micro_batch=1, grad_accum=16)

    with pytest.raises(BudgetError) as info:
        plan(MINILM, config, minimum - 1)

    message = str(info.value)
    assert isinstance(info.value, ChainFedError)  # the CLI prints it as one line, exit 2
    assert "--memory-budget" in message and "--max-len" in message
    assert "micro-batch 1, window 1" in message
    assert "sequence length 64" in message
    named = parse_bytes(message.split("give --memory-budget ")[1].split(" or more")[0])
    assert abs(named - minimum) <= 0.01 * minimum
    assert plan(MINILM, config, minimum).window == 1


@pytest.mark.parametrize("seq_len", [16, 32])
def test_the_named_minimum_budget_is_enough(seq_len):
    config = ChainConfig(window=2, micro_batch=16)
    with pytest.raises(BudgetError) as info:
        plan_for_budget(MINILM, config, 1000, seq_len=seq_len, task="classify")
    named = info.value.args[0].split("give --memory-budget ")[1].split(" or more")[0]
    plan_for_budget(MINILM, config, parse_bytes(named), seq_len=seq_len, task="classify")


def test_half_precision_halves_weights_and_activations_but_not_the_trainables():
    """bf16 and fp16 count 2 bytes per frozen weight and activation; adapters, proxies
    and their AdamW state stay float32 (the precision policy), so the estimate is more
    than half of float32's and a budget that fits bf16 need not fit float32. (Without
    recompute: the window's activations then dominate, and a smaller micro-batch can
    make float32 fit.)"""
    config = ChainConfig(window=2, micro_batch=16, recompute=False)
    sizes = {
        dtype: estimate_stage_bytes(SMOLLM2, config, seq_len=SEQ, task="lm", dtype=dtype)
        for dtype in (torch.float32, torch.bfloat16, torch.float16)
    }
    assert sizes[torch.bfloat16] == sizes[torch.float16]
    assert sizes[torch.float32] // 2 < sizes[torch.bfloat16] < sizes[torch.float32]
    no_trainables = replace(config, gpo="none", lora=replace(config.lora, rank=1))
    fp32, bf16 = (
        estimate_stage_bytes(SMOLLM2, no_trainables, seq_len=SEQ, task="lm", dtype=dtype)
        for dtype in (torch.float32, torch.bfloat16)
    )
    assert abs(fp32 - 2 * bf16) <= fp32 // 100  # only rank-1 adapters' master copies differ

    budget = sizes[torch.bfloat16]
    fitted = plan_for_budget(SMOLLM2, config, budget, seq_len=SEQ, task="lm", dtype=torch.bfloat16)
    assert fitted == config
    assert plan_for_budget(SMOLLM2, config, budget, seq_len=SEQ, task="lm") != config


def test_recompute_counts_one_block_of_activations_and_the_window_inputs():
    config = ChainConfig(window=3, micro_batch=8, gpo="none")
    states = 8 * SEQ * SMOLLM2.hidden_size * 4  # one (B, T, d) float32 tensor
    activations = activation_bytes(SMOLLM2, 8, SEQ)

    saving = estimate(SMOLLM2, config, recompute=False) - estimate(SMOLLM2, config)

    assert saving == 3 * activations - (3 * states + activations) > 0


def test_recompute_chunks_count_the_largest_chunk_of_the_recomputed_block():
    config = ChainConfig(window=3, micro_batch=8, gpo="none")
    activations = activation_bytes(SMOLLM2, 8, SEQ)

    def saving(chunks: int) -> int:
        return estimate(SMOLLM2, config) - estimate(SMOLLM2, config, recompute_chunks=chunks)

    assert saving(4) == activations - activation_bytes(SMOLLM2, 2, SEQ) > 0
    assert saving(3) == activations - activation_bytes(SMOLLM2, 3, SEQ)  # chunks of 3, 2, 3 samples
    assert saving(64) == activations - activation_bytes(SMOLLM2, 1, SEQ)  # one sample each

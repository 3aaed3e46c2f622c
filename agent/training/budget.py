"""Fit a stage into a memory budget before training starts (``--memory-budget``).

The estimate counts what a chain stage holds above the idle process, per component:

* weights of the Q window blocks (+ one streamed block for ``exact`` foresight) and of
  the head (the LM head for ``lm``; tiny for ``classify``);
* activations autograd keeps per block per token, ≈ (12·d + 4·F) values plus H·T for
  attention probabilities (a conservative count of what SDPA/LayerNorm/GELU save): for
  every window block, or with ``ChainConfig.recompute`` each block's input plus one
  block's activations for the largest of its ``recompute_chunks`` chunks of samples (the
  block being recomputed in backward);
* adapter parameters ×4 (value, gradient, two AdamW moments) and GPO proxies.

Weights and activations count the bytes of the compute dtype (``dtype``: 2 for bf16/fp16),
trainable tensors those of their float32 master weights and optimizer state, as the
precision policy (``chainfed.agent.runtime.precision``) keeps them. All Q window blocks'
weights are counted although with recompute a memory-mapped float checkpoint on the CPU
has one window block's pages resident at a time (``StreamingModel.release_pages``): a
bound that holds on every device and for copied weights too.

``plan_for_budget`` keeps the effective batch (micro-batch × accumulation): it halves the
micro-batch first, then shrinks the window, then the exact foresight depth. If even
micro-batch 1, Q = 1 and no extra foresight do not fit, it raises ``BudgetError`` giving
the minimum that would.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from chainfed.agent.errors import ChainFedError
from chainfed.agent.runtime.model_config import ModelConfig
from chainfed.agent.runtime.precision import MASTER_DTYPE
from chainfed.agent.training.chain import ChainConfig
from chainfed.proto.chain_rules import parse_gpo
from chainfed.proto.units import format_bytes

TRAINABLE_BYTES = 4 * MASTER_DTYPE.itemsize
"""Bytes per trainable value: the value, its gradient and two AdamW moments, float32."""


class BudgetError(ChainFedError):
    """No configuration of the stage fits the given memory budget."""


def block_weight_bytes(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> int:
    """Frozen linear weights of one block in ``dtype``."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    attention = d * cfg.q_size * 2 + d * cfg.kv_size * 2
    mlp = (3 if cfg.family == "llama" else 2) * d * f
    return (attention + mlp) * dtype.itemsize


def activation_bytes(
    cfg: ModelConfig, micro_batch: int, seq_len: int, dtype: torch.dtype = torch.float32
) -> int:
    """Saved activations of one block for one micro-batch, in ``dtype``."""
    per_token = 12 * cfg.hidden_size + 4 * cfg.intermediate_size + cfg.num_heads * seq_len
    return micro_batch * seq_len * per_token * dtype.itemsize


def adapter_bytes(cfg: ModelConfig, rank: int) -> int:
    """One block's adapters: float32 values, gradients and AdamW moments."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    pairs = [(d, cfg.q_size), (d, cfg.kv_size), (d, cfg.kv_size), (cfg.q_size, d), (d, f), (f, d)]
    if cfg.family == "llama":
        pairs.append((d, f))
    return sum(rank * (i + o) for i, o in pairs) * TRAINABLE_BYTES


def estimate_stage_bytes(
    cfg: ModelConfig,
    config: ChainConfig,
    *,
    seq_len: int,
    task: str,
    dtype: torch.dtype = torch.float32,
) -> int:
    """Estimated peak above baseline of one chain stage with ``config`` computing in
    ``dtype``."""
    kind, depth = parse_gpo(config.gpo, cfg.num_layers)
    window, value = config.window, dtype.itemsize
    states = config.micro_batch * seq_len * cfg.hidden_size * value  # one (B, T, d) tensor
    activations = activation_bytes(cfg, config.micro_batch, seq_len, dtype)
    head = cfg.vocab_size * cfg.hidden_size * value if task == "lm" else 0
    total = window * (block_weight_bytes(cfg, dtype) + adapter_bytes(cfg, config.lora.rank))
    largest_chunk = -(-config.micro_batch // config.recompute_chunks)  # samples
    recomputed = activation_bytes(cfg, largest_chunk, seq_len, dtype)
    kept = window * states + recomputed if config.recompute else window * activations
    total += kept + head + states * 4
    if kind == "exact":
        total += block_weight_bytes(cfg, dtype) + activations
        total += min(depth, cfg.num_layers) * states
    elif kind == "proxy":
        total += cfg.num_layers * 2 * cfg.hidden_size * config.proxy_rank * TRAINABLE_BYTES
        total += activations // 4
    return total


def plan_for_budget(
    cfg: ModelConfig,
    config: ChainConfig,
    budget: int,
    *,
    seq_len: int,
    task: str,
    dtype: torch.dtype = torch.float32,
) -> ChainConfig:
    """The largest micro-batch, window and foresight (in that order of sacrifice) that fit."""
    effective = config.micro_batch * config.grad_accum
    kind, depth = parse_gpo(config.gpo, cfg.num_layers)
    depths = (
        [depth]
        if kind != "exact"
        else sorted({depth, *[d for d in (8, 4, 2, 1) if d < depth]}, reverse=True)
    )
    for gpo_depth in depths:
        gpo = config.gpo if kind != "exact" else f"exact:{gpo_depth}"
        for window in range(config.window, 0, -1):
            micro = config.micro_batch
            while micro >= 1:
                candidate = replace(
                    config,
                    micro_batch=micro,
                    grad_accum=max(1, -(-effective // micro)),
                    window=window,
                    gpo=gpo,
                )
                need = estimate_stage_bytes(cfg, candidate, seq_len=seq_len, task=task, dtype=dtype)
                if need <= budget:
                    return candidate
                micro //= 2
    smallest = replace(
        config,
        micro_batch=1,
        grad_accum=effective,
        window=1,
        gpo=config.gpo if kind != "exact" else "exact:1",
    )
    need = estimate_stage_bytes(cfg, smallest, seq_len=seq_len, task=task, dtype=dtype)
    raise BudgetError(
        f"memory budget {format_bytes(budget)} is too small for {cfg.model_type} "
        f"({cfg.num_layers} layers, d={cfg.hidden_size}) at sequence length {seq_len}: "
        f"even micro-batch 1, window 1 needs about {format_bytes(need)} ({need} bytes); "
        f"give --memory-budget {_round_up(need)} or more, or shorten --max-len"
    )


MAX_AUTO_WINDOW = 4
"""Largest window ``--window auto`` picks: past a few layers the co-tuning anchor gains
little and the stage costs grow linearly."""


def largest_window(
    cfg: ModelConfig,
    config: ChainConfig,
    budget: int,
    *,
    seq_len: int,
    task: str,
    dtype: torch.dtype = torch.float32,
) -> int:
    """The largest window Q <= ``MAX_AUTO_WINDOW`` (and <= the layers) whose stage, with
    ``config``'s other settings and computing in ``dtype``, fits ``budget`` bytes at
    ``seq_len`` tokens; 1 when none does (the smallest the chain can run)."""
    for window in range(min(MAX_AUTO_WINDOW, cfg.num_layers), 1, -1):
        candidate = replace(config, window=window)
        need = estimate_stage_bytes(cfg, candidate, seq_len=seq_len, task=task, dtype=dtype)
        if need <= budget:
            return window
    return 1


def _round_up(n: int) -> str:
    """A budget string of at least ``n`` bytes: 2 decimals of MiB or GiB, rounded up."""
    unit, name = (1 << 30, "GiB") if n >= 1 << 30 else (1 << 20, "MiB")
    return f"{math.ceil(n * 100 / unit) / 100:.2f}{name}"

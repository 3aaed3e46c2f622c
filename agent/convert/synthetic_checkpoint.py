"""Random-weight checkpoints with the exact tensor layout of a real config.

Peak memory does not depend on weight values, so memory benchmarks at large shapes
(RoBERTa-large, LLaMA-2-7B) and streaming tests run on files written here instead of
downloaded weights. Tensors are generated and written shard by shard, so writing a
checkpoint never holds more than one shard in memory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from chainfed.agent.runtime import bert, llama
from chainfed.agent.runtime.checkpoint import INDEX_FILE, SINGLE_FILE, TensorSpec
from chainfed.agent.runtime.model_config import ModelConfig


def checkpoint_layout(cfg: ModelConfig) -> list[TensorSpec]:
    """Groups of tensors in model order: embeddings, block 0..L-1, then the head."""
    if cfg.family == "bert":
        groups = [bert.embedding_tensors(cfg, "")]
        groups += [bert.block_tensors(cfg, "", i) for i in range(cfg.num_layers)]
        return groups
    groups = [llama.embedding_tensors(cfg, "model.")]
    groups += [llama.block_tensors(cfg, "model.", i) for i in range(cfg.num_layers)]
    head = llama.head_tensors(cfg, "model.")
    if cfg.tie_word_embeddings:
        head = {k: v for k, v in head.items() if k != "lm_head.weight"}
    groups.append(head)
    return groups


def write_random_checkpoint(
    hf_config: dict[str, Any],
    out_dir: Path,
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int | None = None,
    seed: int = 0,
) -> Path:
    """Write ``config.json`` and random safetensors for ``hf_config`` into ``out_dir``.

    With ``max_shard_bytes`` the tensors are split into shards of at most that size
    (a tensor group — one block — is never split) plus ``model.safetensors.index.json``.
    Norm weights are 1 and other weights N(0, 0.02²), so activations stay finite.
    """
    cfg = ModelConfig.from_hf(hf_config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    element = torch.empty((), dtype=dtype).element_size()

    shards: list[list[TensorSpec]] = [[]]
    shard_bytes = 0
    for group in checkpoint_layout(cfg):
        size = sum(math.prod(shape) for _, shape in group.values()) * element
        if max_shard_bytes and shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(group)
        shard_bytes += size

    weight_map: dict[str, str] = {}
    for number, groups in enumerate(shards, start=1):
        name = (
            SINGLE_FILE
            if len(shards) == 1
            else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        )
        tensors = {}
        for group in groups:
            for ours, (theirs, shape) in group.items():
                tensors[theirs] = _random_tensor(ours, shape, dtype, generator)
                weight_map[theirs] = name
        save_file(tensors, str(out_dir / name), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
    return out_dir


def _random_tensor(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator
) -> torch.Tensor:
    if "norm" in name and name.endswith("weight"):
        return torch.ones(shape, dtype=dtype)
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    return (torch.randn(shape, generator=generator) * 0.02).to(dtype)

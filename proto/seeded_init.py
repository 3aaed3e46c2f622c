"""The starting values every agent, and the coordinator, draw alike from shared seeds.

FFA aggregation (A frozen, B averaged) is exact only if every agent's A of a layer is
the same tensor, and clipping an update needs its delta from the round's start, which
for a tensor entering the window is its seeded initial value. So each draw is written
once, here, and always made on the CPU from a ``torch.Generator`` seeded by the seeds
and names alone, whatever device trains (A in the dtype asked for, the head and proxies
in float32); callers move and cast the result. Nothing here builds a module.

==========================================  ===============================================
``layers.{i}.{module}.lora_a`` (r, in)      kaiming-uniform (a = √5, PEFT's), ``initial_lora_a``
``layers.{i}.{module}.lora_b`` (out, r)     zeros
``objective.head.weight`` (labels, d)       N(0, 0.02²) from ``seed``; bias zeros
``foresight.proxies.{j}.down`` (r, d)       N(0, 0.02²), layers in order from ``seed + 7919``
``foresight.proxies.{j}.up`` (d, r)         zeros
==========================================  ===============================================
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping

import torch
from torch import nn

from chainfed.proto.tensor_names import LORA_A_SUFFIX, LORA_B_SUFFIX, parse_adapter_name

PROXY_SEED_OFFSET = 7919
"""The proxies' generator is seeded ``seed + 7919``, apart from the head's ``seed``."""


def lora_a_generator(seed: int, layer: int, module: str) -> torch.Generator:
    """The CPU generator adapter ``layers.{layer}.{module}`` draws its initial A from."""
    key = (seed * 100_003 + layer) * 1_000_003 + zlib.crc32(module.encode())
    return torch.Generator().manual_seed(key % 2**63)


def initial_lora_a(
    seed: int, layer: int, module: str, shape: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """The initial A (r, in) of adapter ``layers.{layer}.{module}``, on the CPU: a
    kaiming-uniform draw (a = √5, as PEFT's) from ``lora_a_generator``."""
    a = torch.empty(shape, dtype=dtype, device="cpu")
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=lora_a_generator(seed, layer, module))
    return a


def linear_in_features(layer_spec: Mapping[str, tuple[str, tuple[int, ...]]]) -> dict[str, int]:
    """In features of every linear of a block by module name, from the block's checkpoint
    spec (``{our name: (checkpoint name, shape)}``; shapes only, no weights read) — the
    width of each adapter's A."""
    return {
        ours.removesuffix(".weight"): shape[1]
        for ours, (_, shape) in layer_spec.items()
        if ours.endswith(".weight") and len(shape) == 2
    }


def with_seeded_lora_a(
    tensors: Mapping[str, torch.Tensor], seed: int, in_features: Callable[[int, str], int]
) -> dict[str, torch.Tensor]:
    """``tensors`` plus the frozen A of every ``layers.{i}.{module}.lora_b`` that came
    without its ``lora_a``: ``initial_lora_a(seed, i, module)`` of shape (r, in) — r from
    B (out, r), in from ``in_features(i, module)`` — in B's dtype and on B's device,
    placed before its B. An A already present is kept as is."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        parsed = parse_adapter_name(name)
        prefix = name.removesuffix(LORA_B_SUFFIX)
        if parsed is not None and parsed[2] == "lora_b" and prefix + LORA_A_SUFFIX not in tensors:
            layer, module, _ = parsed
            shape = (t.shape[1], in_features(layer, module))
            a = initial_lora_a(seed, layer, module, shape, t.dtype)
            out[prefix + LORA_A_SUFFIX] = a.to(t.device)
        out[name] = t
    return out


def initial_head(hidden_size: int, num_labels: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (labels, d), bias (labels,)) of a classification head, float32 on the CPU."""
    weight = torch.empty(num_labels, hidden_size, device="cpu")
    weight.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(seed))
    return weight, torch.zeros(num_labels, device="cpu")


def initial_proxies(
    hidden_size: int, rank: int, layers: range, seed: int
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{j: (down (r, d), up (d, r))} of the GPO proxies of ``layers``, float32 on the CPU.

    The downs are drawn in layer order from one generator, so a proxy's value depends on
    the first layer of ``layers`` (the start layer + 1) as well as on ``seed``."""
    generator = torch.Generator().manual_seed(seed + PROXY_SEED_OFFSET)
    return {
        j: (
            torch.randn(rank, hidden_size, generator=generator, device="cpu") * 0.02,
            torch.zeros(hidden_size, rank, device="cpu"),
        )
        for j in layers
    }

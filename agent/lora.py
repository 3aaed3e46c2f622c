"""LoRA on a block's linear layers: which layers, how they start, how adapters are saved.

Adapters start from a seed derived from (seed, layer, module name) so every agent of a
federation builds the same initial A for a layer — what FFA aggregation (A frozen, B
averaged) relies on — and so the coordinator can rebuild any adapter's starting value
from its saved name and shape alone (``initial_lora_a``: clipping an update needs its
delta from the round's start). Saved names are ``layers.{i}.{module}.lora_a|lora_b``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

from chainfed.kernels import LoRALinear

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class LoRAConfig:
    """Adapter shape and placement."""

    rank: int = 8
    """Rank r of each adapter."""
    alpha: float = 16.0
    """Scale numerator: the adapter adds (alpha / r) · B A x."""
    dropout: float = 0.0
    """Dropout on the adapter branch input while training."""
    targets: str = "all"
    """``attention`` (q/k/v/o projections) or ``all`` (every linear layer of a block)."""
    train_a: bool = True
    """False freezes A at its seeded init (FFA); only B trains."""
    seed: int = 0
    """Base seed of the per-layer A initialisation."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.targets not in ("attention", "all"):
            raise ValueError(f"LoRA targets must be 'attention' or 'all', got {self.targets!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def target_names(block: nn.Module, targets: str) -> list[str]:
    """Names of the block's linear layers that get adapters."""
    linears = [name for name, m in block.named_children() if isinstance(m, nn.Linear)]
    if targets == "attention":
        return [n for n in linears if n in ATTENTION_TARGETS]
    return linears


def lora_a_generator(seed: int, layer: int, module: str) -> torch.Generator:
    """The CPU generator adapter ``layers.{layer}.{module}`` draws its initial A from."""
    key = (seed * 100_003 + layer) * 1_000_003 + zlib.crc32(module.encode())
    return torch.Generator().manual_seed(key % 2**63)


def initial_lora_a(
    seed: int, layer: int, module: str, shape: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """The A (r, in) that ``add_lora`` gives adapter ``layers.{layer}.{module}`` on CPU:
    ``LoRALinear.reset_parameters``' kaiming-uniform draw from ``lora_a_generator``."""
    a = torch.empty(shape, dtype=dtype)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=lora_a_generator(seed, layer, module))
    return a


def without_lora_a(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` less every ``*.lora_a``: what travels when A is frozen at its seeded init."""
    return {name: t for name, t in tensors.items() if not name.endswith(".lora_a")}


def linear_in_features(layer_spec: Mapping[str, tuple[str, tuple[int, ...]]]) -> dict[str, int]:
    """In features of every linear of a block by module name, from the block's checkpoint
    spec (``StreamingModel.block_tensor_spec``: shapes only, no weights read) — the width
    of each adapter's A."""
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
    B (out, r), in from ``in_features(i, module)`` — in B's dtype, placed before its B.
    An A already present is kept as is."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        parts = name.split(".")
        prefix = name.removesuffix(".lora_b")
        if (
            name.endswith(".lora_b")
            and prefix + ".lora_a" not in tensors
            and len(parts) == 4
            and parts[0] == "layers"
            and parts[1].isdigit()
        ):
            layer, module = int(parts[1]), parts[2]
            shape = (t.shape[1], in_features(layer, module))
            a = initial_lora_a(seed, layer, module, shape, t.dtype)
            out[prefix + ".lora_a"] = a.to(t.device)
        out[name] = t
    return out


def add_lora(block: nn.Module, layer: int, config: LoRAConfig) -> dict[str, LoRALinear]:
    """Wrap the block's target linears in ``LoRALinear`` in place; returns them by name."""
    wrapped = {}
    for name in target_names(block, config.targets):
        module = LoRALinear(
            getattr(block, name),
            config.rank,
            config.alpha,
            config.dropout,
            train_a=config.train_a,
        )
        module.reset_parameters(lora_a_generator(config.seed, layer, name))
        setattr(block, name, module)
        wrapped[name] = module
    return wrapped


def adapter_state(block: nn.Module, layer: int) -> dict[str, torch.Tensor]:
    """Detached copies of the block's adapter tensors under their saved names."""
    state = {}
    for name, module in block.named_children():
        if isinstance(module, LoRALinear):
            for param_name, param in module.adapter_params().items():
                state[f"layers.{layer}.{name}.{param_name}"] = param.detach().clone()
    return state


def load_adapter_state(block: nn.Module, layer: int, state: dict[str, torch.Tensor]) -> None:
    """Copy saved adapter tensors of ``layer`` into the block's ``LoRALinear`` modules."""
    with torch.no_grad():
        for name, module in block.named_children():
            if isinstance(module, LoRALinear):
                for param_name, param in module.adapter_params().items():
                    param.copy_(state[f"layers.{layer}.{name}.{param_name}"])


def trainable_adapter_params(block: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters that receive gradients (B, and A unless frozen)."""
    return [p for p in block.parameters() if p.requires_grad]

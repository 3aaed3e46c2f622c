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

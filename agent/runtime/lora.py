"""LoRA on a block's linear layers: which layers, how they start, how adapters are saved.

Every adapter's A starts as ``chainfed.proto.seeded_init.initial_lora_a`` of (seed,
layer, module name), drawn on the CPU and copied in, so every agent of a federation
builds the same initial A for a layer, whatever its device and compute dtype — what FFA
aggregation (A frozen, B averaged) relies on — and the coordinator rebuilds the same
value from the name and shape alone. A and B are float32 master weights on the block's
device (``precision.MASTER_DTYPE``); ``adapter_state`` hands them out as float32 CPU copies.
Saved names are ``layers.{i}.{module}.lora_a|lora_b`` (``chainfed.proto.tensor_names``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

from chainfed.agent.runtime.model import StreamingModel
from chainfed.agent.runtime.precision import MASTER_DTYPE, host_copy
from chainfed.kernels import Int8Linear, LoRALinear
from chainfed.proto.messages import LORA_TARGETS
from chainfed.proto.seeded_init import initial_lora_a
from chainfed.proto.tensor_names import tensor_owner

TARGET_MODULES = {
    "qv": ("q_proj", "v_proj"),
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
}
"""The modules of each named target set but ``all`` (every linear of the block)."""


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
    """``qv`` (query and value projections), ``attention`` (q/k/v/o projections) or
    ``all`` (every linear layer of a block)."""
    train_a: bool = True
    """False freezes A at its seeded init (FFA); only B trains."""
    seed: int = 0
    """Base seed of the per-layer A initialisation."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.targets not in LORA_TARGETS:
            raise ValueError(
                f"LoRA targets must be one of {', '.join(LORA_TARGETS)}, got {self.targets!r}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


def target_names(block: nn.Module, targets: str) -> list[str]:
    """Names of the block's linear layers that get adapters (float or int8 ones)."""
    linears = [name for name, m in block.named_children() if isinstance(m, (nn.Linear, Int8Linear))]
    if targets == "all":
        return linears
    return [n for n in linears if n in TARGET_MODULES[targets]]


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
            adapter_dtype=MASTER_DTYPE,
        )
        with torch.no_grad():
            a = module.lora_a
            a.copy_(initial_lora_a(config.seed, layer, name, tuple(a.shape), a.dtype))
        setattr(block, name, module)
        wrapped[name] = module
    return wrapped


def adapter_state(block: nn.Module, layer: int) -> dict[str, torch.Tensor]:
    """Float32 CPU copies of the block's adapter tensors under their saved names."""
    state = {}
    for name, module in block.named_children():
        if isinstance(module, LoRALinear):
            for param_name, param in module.adapter_params().items():
                state[f"layers.{layer}.{name}.{param_name}"] = host_copy(param)
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


def load_adapted_block(
    model: StreamingModel, layer: int, adapters: Mapping[str, torch.Tensor], config: LoRAConfig
) -> nn.Module:
    """Frozen block ``layer`` of ``model`` for inference, with its adapter from
    ``adapters`` (``layers.{layer}.*``; none: the base block), in eval mode."""
    block = model.load_block(layer)
    own = {k: v for k, v in adapters.items() if tensor_owner(k) == ("layers", layer)}
    if own:
        add_lora(block, layer, config)
        load_adapter_state(block, layer, own)
    return block.eval()

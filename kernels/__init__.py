"""Fused LoRA linear (Triton forward/backward) and the torch reference it is tested against.

``lora_linear`` is the function, ``LoRALinear`` the module the agent's blocks use; see
``fused_lora`` for the kernels, the gradient derivation and the saving policy.
"""

from chainfed.kernels.fused_lora import (
    MAX_TRITON_RANK,
    LoRALinearFunction,
    lora_linear,
    lora_linear_reference,
    triton_available,
)
from chainfed.kernels.modules import LoRALinear

__all__ = [
    "MAX_TRITON_RANK",
    "LoRALinear",
    "LoRALinearFunction",
    "lora_linear",
    "lora_linear_reference",
    "triton_available",
]

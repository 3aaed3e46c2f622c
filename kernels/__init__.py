"""Fused LoRA linear (Triton forward/backward) and the torch reference it is tested against.

``lora_linear`` is the function, ``LoRALinear`` the module the agent's blocks use; see
``fused_lora`` for the kernels, the gradient derivation and the saving policy, and ``int8``
for int8 frozen weights (``quantize_int8``, ``Int8Linear``).
"""

from chainfed.kernels.fused_lora import (
    MAX_TRITON_RANK,
    LoRALinearFunction,
    lora_linear,
    lora_linear_reference,
    triton_available,
)
from chainfed.kernels.int8 import Int8Linear, dequantize_int8, quantize_int8
from chainfed.kernels.modules import LoRALinear

__all__ = [
    "MAX_TRITON_RANK",
    "Int8Linear",
    "LoRALinear",
    "LoRALinearFunction",
    "dequantize_int8",
    "lora_linear",
    "lora_linear_reference",
    "quantize_int8",
    "triton_available",
]

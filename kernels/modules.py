"""``LoRALinear``: a frozen ``nn.Linear`` plus a LoRA adapter, computed by ``lora_linear``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from chainfed.kernels.fused_lora import lora_linear
from chainfed.kernels.int8 import Int8Linear

__all__ = ["LoRALinear"]


class LoRALinear(nn.Module):
    """``y = base(x) + (alpha / rank) · B A x``, the base frozen, as PEFT's LoRA ``Linear``.

    Parameters: ``lora_a (rank, in_features)``, kaiming-uniform (``a = √5``) like PEFT,
    and ``lora_b (out_features, rank)``, zero, so a fresh adapter leaves ``base`` unchanged.
    Both live on the base weight's device in ``adapter_dtype`` (float32 by default: master
    weights, as PEFT's ``autocast_adapter_dtype``, whatever the base's dtype; ``lora_linear``
    casts them to the input's dtype inside and returns float32 gradients). The base weight
    and bias are set to ``requires_grad=False`` in place.

    ``train_a=False`` is the FFA mode: ``lora_a`` is frozen and backward keeps only the
    rank-r ``x Aᵀ``. A federation's shared seeded A is drawn in one place,
    ``chainfed.proto.seeded_init.initial_lora_a``, and copied in (``add_lora``).

    Dropout (``dropout > 0``, training mode) applies to the adapter branch's input only, as
    in PEFT. The branches then read different inputs, which the fused kernel cannot share,
    so that case runs the unfused torch formula (autograd saves the dropout mask and what
    the matmuls need). Without dropout, or in eval mode, ``forward`` is ``lora_linear``
    (Triton on CUDA, torch elsewhere; see ``chainfed.kernels.fused_lora``).

    ``base`` may be an ``Int8Linear`` (int8 frozen weight, one scale per output channel):
    ``lora_linear`` then dequantises it inside; the adapter is float32 as above either way.
    """

    def __init__(
        self,
        base: nn.Linear | Int8Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        *,
        train_a: bool = True,
        adapter_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.base = base
        self.base.requires_grad_(False)
        self.rank = rank
        self.alpha = alpha
        self.scale = alpha / rank
        self.dropout = dropout
        self.train_a = train_a
        factory = {"device": base.weight.device, "dtype": adapter_dtype}
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_b = nn.Parameter(torch.empty(base.out_features, rank, **factory))
        self.lora_a.requires_grad_(train_a)
        self.reset_parameters()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """PEFT's default init: kaiming-uniform ``lora_a`` drawn on the CPU (from
        ``generator`` if given, a CPU generator, else torch's default one) and copied to the
        parameter's device, so a seed gives the same A on every device; zero ``lora_b``."""
        with torch.no_grad():
            a = torch.empty(self.lora_a.shape, dtype=self.lora_a.dtype, device="cpu")
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            self.lora_a.copy_(a)
            self.lora_b.zero_()

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The adapter's parameters by name (``lora_a`` included even when frozen)."""
        return {"lora_a": self.lora_a, "lora_b": self.lora_b}

    def merged_weight(self) -> torch.Tensor:
        """``W + scale · B A`` (detached) for export, in the base's dtype (an int8 base's
        bias dtype, with ``W`` its dequantised weight). Never used in ``forward``."""
        with torch.no_grad():
            delta = self.lora_b.float() @ self.lora_a.float()  # (out, in)
            if isinstance(self.base, Int8Linear):
                dtype = torch.float32 if self.base.bias is None else self.base.bias.dtype
                weight = self.base.dequantized_weight(torch.float32)
            else:
                dtype, weight = self.base.weight.dtype, self.base.weight.float()
            return (weight + self.scale * delta).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout > 0:
            dropped = F.dropout(x, self.dropout, training=True)
            a, b = self.lora_a.to(x.dtype), self.lora_b.to(x.dtype)  # autograd casts back
            adapter = F.linear(F.linear(dropped, a), b)
            return self.base(x) + self.scale * adapter
        weight_scale = self.base.weight_scale if isinstance(self.base, Int8Linear) else None
        return lora_linear(
            x,
            self.base.weight,
            self.base.bias,
            self.lora_a,
            self.lora_b,
            self.scale,
            train_a=self.train_a,
            weight_scale=weight_scale,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, alpha={self.alpha}, dropout={self.dropout}, "
            f"train_a={self.train_a}"
        )

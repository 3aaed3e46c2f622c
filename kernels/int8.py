"""int8 frozen weights: one scale per output channel, dequantised inside the linear.

Scheme (symmetric, per output channel, absmax)::

    W      (d_out, d_in)  float frozen weight
    s      (d_out,)       float32 scale, s_o = max_i |W_oi| / 127 (1 for an all-zero row)
    W_q    (d_out, d_in)  int8, W_q = round(W / s) clipped to [-127, 127]
    W ≈ s[:, None] · W_q, with |W_oi - s_o · W_q,oi| <= s_o / 2 for every element

So ``x Wᵀ ≈ (x W_qᵀ) · s`` (the scale applies per output column after the reduction over
d_in) and ``g W ≈ (g · s) W_q`` (the gradient pre-scaled per output channel). The Triton
kernel of ``fused_lora`` computes exactly these; the torch path here dequantises one block
of output channels at a time to float32, so the float copy of a weight alive at any moment
is at most ``DEQUANT_BLOCK_BYTES``, never the whole matrix, and nothing float is saved for
backward. Both accumulate in float32 and round once to the compute dtype.

``Int8Linear`` is the frozen module a block's ``nn.Linear`` becomes; ``LoRALinear`` wraps it
like an ``nn.Linear`` and hands ``weight`` (int8) and ``weight_scale`` to ``lora_linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = [
    "DEQUANT_BLOCK_BYTES",
    "Int8Linear",
    "dequantize_int8",
    "dequantized_grad_input",
    "dequantized_linear",
    "quantize_int8",
]

QMAX = 127
"""Largest magnitude of a quantised value: the int8 range is symmetric, -128 is unused."""

DEQUANT_BLOCK_BYTES = 16 << 20
"""Bound on the float32 copy the torch path makes of a weight block (16 MiB): a 4096-wide
row is 16 KiB, so 1024 output channels are dequantised at a time."""


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_q int8 (d_out, d_in), s float32 (d_out,))`` of a float ``weight`` (d_out, d_in).

    Computed in float32 whatever ``weight``'s dtype, on its device. Guarantees, per output
    channel o: ``|W_o,i - s_o · W_q,o,i| <= s_o / 2`` and ``s_o = max_i |W_o,i| / 127``, so
    the largest entry of each row maps to ±127 (the bound up to float32 rounding, a few
    ulps of ``max_i |W_o,i|``); an all-zero row gets ``s_o = 1`` and zeros.
    A non-finite weight is refused (its channel has no meaningful scale).
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(
            f"expected a float (d_out, d_in) weight, got {weight.dtype} {tuple(weight.shape)}"
        )
    w = weight.detach().to(torch.float32)
    if not torch.isfinite(w).all():
        raise ValueError("cannot quantise a weight with inf or NaN entries")
    absmax = w.abs().amax(dim=1)  # (d_out,)
    scale = torch.where(absmax > 0, absmax / QMAX, torch.ones_like(absmax))
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``s[:, None] · W_q`` computed in float32, returned in ``dtype`` (rounded once)."""
    return (q.to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype)


def _rows_per_block(d_in: int) -> int:
    return max(1, DEQUANT_BLOCK_BYTES // (4 * max(d_in, 1)))


def dequantized_linear(
    x2: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x2 Wᵀ + b`` in ``x2``'s dtype for flat ``x2 (M, d_in)``, ``W = s · W_q``.

    ``W`` is dequantised to float32 one block of output channels at a time and the product
    taken in float32 (a half ``x2`` is upcast once), then rounded once to ``x2``'s dtype, as
    the Triton kernel rounds its fp32 accumulator: a half-precision copy of ``W`` would add
    a rounding per weight that the kernel does not make. No autograd graph through ``q``.
    """
    d_out, d_in = q.shape
    rows = _rows_per_block(d_in)
    x32 = x2.to(torch.float32)  # no copy when x2 is float32
    y = torch.empty((x2.shape[0], d_out), device=x2.device, dtype=x2.dtype)  # (M, d_out)
    for r0 in range(0, d_out, rows):
        r1 = min(d_out, r0 + rows)
        w = dequantize_int8(q[r0:r1], scale[r0:r1], torch.float32)  # (rows, d_in)
        y[:, r0:r1] = F.linear(x32, w)  # rounded to x2's dtype here
    return y if bias is None else y.add_(bias)


def dequantized_grad_input(g: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``g W`` in ``g``'s dtype for ``g (M, d_out)``, ``W = s · W_q`` dequantised to float32
    one block of output channels at a time, the blocks' products summed in float32 and
    rounded once (see ``dequantized_linear``)."""
    d_out, d_in = q.shape
    rows = _rows_per_block(d_in)
    g32 = g.to(torch.float32)  # no copy when g is float32
    out = torch.zeros((g.shape[0], d_in), device=g.device, dtype=torch.float32)  # (M, d_in)
    for r0 in range(0, d_out, rows):
        r1 = min(d_out, r0 + rows)
        out.addmm_(g32[:, r0:r1], dequantize_int8(q[r0:r1], scale[r0:r1], torch.float32))
    return out.to(g.dtype)


class _Int8LinearFunction(torch.autograd.Function):
    """``y = x (s·W_q)ᵀ + b``, ``∂L/∂x = g (s·W_q)``; saves only ``W_q`` and ``s`` (by
    reference), never a float copy of the weight; the weight and bias get no gradient."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        q: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        ctx.save_for_backward(q, scale)
        ctx.x_shape = x.shape
        y = dequantized_linear(x.reshape(-1, x.shape[-1]), q, scale, bias)  # (M, d_out)
        return y.reshape(*x.shape[:-1], q.shape[0])

    @staticmethod
    @once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, None, None, None]:
        q, scale = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (M, d_out)
        return dequantized_grad_input(g, q, scale).reshape(ctx.x_shape), None, None, None


class Int8Linear(nn.Module):
    """A frozen linear layer whose weight is int8 with one float32 scale per output channel.

    Buffers ``weight`` (int8, (out_features, in_features)) and ``weight_scale`` (float32,
    (out_features,)); ``bias`` a frozen parameter in the compute dtype, or None. ``forward``
    computes ``x (s·W_q)ᵀ + b`` in ``x``'s dtype (see ``dequantized_linear``); backward gives
    ``x`` its gradient and keeps no float copy of the weight.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer(
            "weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer(
            "weight_scale", torch.empty(out_features, dtype=torch.float32, device=device)
        )
        self.bias = (
            nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
            if bias
            else None
        )

    @classmethod
    def like(cls, linear: nn.Linear) -> Int8Linear:
        """An empty ``Int8Linear`` of ``linear``'s shape, bias and device (``meta`` stays
        ``meta``: the tensors are assigned afterwards)."""
        return cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole float weight ``s · W_q`` in ``dtype`` (for export and tests, not forward)."""
        return dequantize_int8(self.weight, self.weight_scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Int8LinearFunction.apply(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, weights=int8 per output channel"
        )

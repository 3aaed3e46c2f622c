"""What every block of a batch shares: the additive attention mask and RoPE tables.

Built once per batch by ``attention_context`` and passed to each block, so streaming
L blocks does not rebuild masks L times.

Notation: B batch, T sequence, H query heads, Hkv key/value heads, Dh head width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionContext:
    """Per-batch inputs shared by all blocks of one forward pass."""

    mask: torch.Tensor
    """Additive mask broadcastable to (B, H, T, T): 0 where a query may attend, a large
    negative number elsewhere (finite, so a fully masked row never turns into NaN)."""
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    """RoPE (cos, sin), each (T, Dh); None for absolute-position models."""


def padding_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) 1/0 mask -> additive (B, 1, 1, T) on the mask's device: keys that are
    padding are blocked."""
    blocked = attention_mask[:, None, None, :].to(dtype) == 0
    zeros = torch.zeros(blocked.shape, dtype=dtype, device=attention_mask.device)
    return zeros.masked_fill(blocked, torch.finfo(dtype).min)


def causal_padding_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) 1/0 mask -> additive (B, 1, T, T) on the mask's device: no future keys, no
    padding keys."""
    T, device = attention_mask.shape[1], attention_mask.device
    future = torch.ones(T, T, dtype=torch.bool, device=device).triu(1)  # (T, T)
    blocked = future[None, None] | (attention_mask[:, None, None, :] == 0)  # (B, 1, T, T)
    zeros = torch.zeros(blocked.shape, dtype=dtype, device=device)
    return zeros.masked_fill(blocked, torch.finfo(dtype).min)


def rope_inverse_frequencies(
    head_dim: int, theta: float, scaling: dict | None = None
) -> torch.Tensor:
    """(Dh/2,) inverse frequencies on the CPU, with LLaMA-3.1 ``llama3`` or ``linear``
    scaling applied."""
    # float32 on the CPU, as the reference implementation computes it: the same frequencies
    # bit for bit on every device, so parity tests measure the blocks, not rounding of the
    # tables; ``rope_tables`` moves them.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None or scaling["rope_type"] == "default":
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: keep high frequencies, divide low ones by factor, blend in between.
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


def rope_tables(
    seq_len: int, inv_freq: torch.Tensor, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (T, Dh) on ``device``, for positions 0..T-1 (right padding
    assumed). Computed in float32 on the CPU, then moved: the same tables on every device."""
    positions = torch.arange(seq_len, dtype=torch.float32, device="cpu")
    freqs = torch.outer(positions, inv_freq)  # (T, Dh/2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (T, Dh)
    return angles.cos().to(device, dtype), angles.sin().to(device, dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, Dh) by position; the half-split layout HF checkpoints use."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, dropout: float = 0.0
) -> torch.Tensor:
    """Scaled dot-product attention; k/v with fewer heads are shared across query groups;
    ``dropout`` > 0 drops attention probabilities (the caller passes it in training only).

    q (B, H, T, Dh), k/v (B, Hkv, T, Dh) -> (B, T, H*Dh).
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)  # (B, H, T, Dh)
        v = v.repeat_interleave(groups, dim=1)
    # (B, H, T, Dh)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    B, H, T, Dh = out.shape
    return out.transpose(1, 2).reshape(B, T, H * Dh)

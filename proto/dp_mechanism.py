"""The differential-privacy mechanism both ends apply: clipping an update's delta and
adding Gaussian noise (DESIGN.md §5). Accounting (ε, the ledger) stays in the
coordinator; an agent under local DP calls ``local_dp_update`` on its own upload, the
coordinator under central DP clips every upload here and noises their sum.

Notation: x an update's tensors, S the round's starting tensors, C the clip norm, z the
noise multiplier.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping

import torch

from chainfed.proto.tensor_names import LORA_A_SUFFIX


class MissingStartError(ValueError):
    """An update holds a tensor the round's start has no value for."""


def update_norm(tensors: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor]) -> float:
    """‖x − S‖₂ over all tensors together (float64): the size of an update's delta."""
    total = 0.0
    for name, t in tensors.items():
        total += float((t.double() - start[name].to(t.device).double()).pow(2).sum())
    return math.sqrt(total)


def clip_update(
    tensors: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor], max_norm: float
) -> dict[str, torch.Tensor]:
    """S + (x − S) · min(1, C / ‖x − S‖₂): the update's delta from the round's starting
    tensors ``start`` scaled down to L2 norm ≤ ``max_norm`` = C (over all tensors
    together, so the direction is kept). An update within the bound comes back unchanged
    (the same tensor objects). Results keep each tensor's dtype.

    Raises ``MissingStartError`` when ``start`` lacks one of the update's tensors.
    """
    if not max_norm > 0:
        raise ValueError(f"clip norm must be > 0, got {max_norm!r}")
    missing = sorted(set(tensors) - set(start))
    if missing:
        raise MissingStartError(f"no round-start value for {missing[:5]}")
    norm = update_norm(tensors, start)
    if norm <= max_norm:
        return dict(tensors)
    factor = max_norm / norm
    out = {}
    for name, t in tensors.items():
        s = start[name].to(device=t.device, dtype=torch.float64)
        out[name] = (s + (t.double() - s) * factor).to(t.dtype)
    return out


def noise_generator(seed: int | None = None) -> torch.Generator:
    """A CPU generator for DP noise: from the OS's randomness unless a test fixes ``seed``
    (predictable noise protects nothing)."""
    return torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)


def noised_names(tensors: Mapping[str, torch.Tensor], train_a: bool) -> list[str]:
    """The tensors DP noises: all of them, less the frozen seeded ``*.lora_a`` when A does not
    train (they are public constants)."""
    return [n for n in tensors if train_a or not n.endswith(LORA_A_SUFFIX)]


def local_dp_update(
    tensors: Mapping[str, torch.Tensor],
    start: Mapping[str, torch.Tensor],
    clip: float,
    noise_multiplier: float,
    *,
    train_a: bool = True,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """What a local-DP agent uploads: S + clip_C(x − S) + N(0, z²C²) per coordinate."""
    generator = generator or noise_generator()
    clipped = clip_update(tensors, start, clip)
    noised = set(noised_names(tensors, train_a))
    std = noise_multiplier * clip
    out = {}
    for name, t in clipped.items():
        if name in noised:
            noise = torch.randn(t.shape, generator=generator, dtype=torch.float64) * std
            t = (t.double().cpu() + noise).to(device=t.device, dtype=t.dtype)
        out[name] = t
    return out

"""Head-only steps on fixed final features (DESIGN.md §3, Heads).

In the chain one task head serves every stage: in stage l it reads layer l's output,
and it meets the model's final features only in the last stage's rounds. Refitting it
afterwards costs a linear model's training: the pooled final features of every
training row are computed once (a forward pass of the top window, no backward through
any block) and the head alone takes passes of AdamW steps over them.

Guaranteed: the features are not touched (the blocks and adapters stay as they are);
only the head's weight and bias change; the order of rows is drawn from the caller's
seeded generator, so a run repeats bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from chainfed.proto.closed_form_head import head_statistics, solve_head


@dataclass(frozen=True)
class HeadRefit:
    """What a refit did: optimiser steps, rows seen, and the mean training loss of its
    first and last pass."""

    steps: int
    samples: int
    first_pass_loss: float
    last_pass_loss: float


def refit_head(
    head: nn.Linear,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    rng: np.random.Generator,
) -> HeadRefit:
    """``epochs`` passes of AdamW steps on ``head`` alone over ``features (N, d)`` and
    ``labels (N,)``, in micro-batches of ``batch_size`` drawn in a fresh order per pass."""
    if epochs < 1:
        raise ValueError(f"head refit epochs must be >= 1, got {epochs}")
    if features.shape[0] != labels.shape[0] or features.shape[0] == 0:
        raise ValueError(
            f"features {tuple(features.shape)} and labels {tuple(labels.shape)} must have "
            "the same, non-zero number of rows"
        )
    features = features.detach().to(head.weight.device, head.weight.dtype)
    labels = labels.to(head.weight.device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    n, steps, pass_losses = features.shape[0], 0, []
    for _ in range(epochs):
        losses = []
        order = torch.from_numpy(rng.permutation(n))
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size].to(labels.device)
            loss = F.cross_entropy(head(features[idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            steps += 1
        pass_losses.append(float(np.mean(losses)))
    return HeadRefit(steps, n * epochs, pass_losses[0], pass_losses[-1])


def set_closed_form_head(head: nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> None:
    """Set ``head`` to the closed-form head of ``features (N, d)`` and ``labels (N,)``
    (``chainfed.proto.closed_form_head``): on one device, the head a federation's
    ``--closed-form-head`` round solves from its agents' statistics when one agent holds
    all the rows."""
    statistics = head_statistics(features, labels, head.out_features)
    weight, bias = solve_head(statistics)
    with torch.no_grad():
        head.weight.copy_(weight.to(head.weight.device, head.weight.dtype))
        head.bias.copy_(bias.to(head.bias.device, head.bias.dtype))

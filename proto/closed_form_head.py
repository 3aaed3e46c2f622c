"""The task head in closed form, from statistics the agents' rows add up to.

Why: under label skew each agent's head steps pull towards its own classes, and the
average of such heads is far from the head the union of the rows would give; a chain that
starts from a random head shapes its first adapters through that drifting head. A ridge
regression head instead depends on the rows only through two sums,
``Σ x̃ x̃ᵀ`` and ``Σ x̃ yᵀ`` (``x̃`` the pooled feature with a constant 1 appended for the
bias, ``y`` the one-hot label). Each agent uploads them as means over its training rows
(``head_statistics``); the sample-weighted mean of those, which fedavg, ffa and a secure
sum all compute, is the statistics of the union of the rows, so ``solve_head`` gives the
head of all the federation's rows, whatever the split, in one round.

Guaranteed: ``solve_head`` of the weighted mean of several agents' statistics equals
``solve_head`` of one agent holding all their rows (to float64 rounding). The ridge term
is relative (``ridge`` × the mean diagonal of the features' second moment), so one
setting serves models whose hidden states differ in scale. The statistics are float64
so that summing thousands of agents loses nothing a float32 head would notice.

What travels: a ``(d+1) × (d+1)`` and a ``(d+1) × C`` matrix per agent, once. They say more
about an agent's features than a head update does (the second moment of its pooled
features); under secure aggregation the coordinator sees only their sum.
"""

from __future__ import annotations

import argparse

import torch

HEAD_GRAM = "objective.head_stats.gram"
"""``(d+1, d+1)`` float64: mean of ``x̃ x̃ᵀ`` over the agent's training rows."""
HEAD_CROSS = "objective.head_stats.cross"
"""``(d+1, C)`` float64: mean of ``x̃ yᵀ`` over the agent's training rows."""
STATISTICS = (HEAD_GRAM, HEAD_CROSS)

CLOSED_FORM_HEAD_MODES = ("off", "end", "both")
"""When a federation fits its head in closed form (``--closed-form-head``): never; once,
after the chain's last stage, on the final adapters' features (``end``, what the flag alone
means); or also before the first stage, on the base model's features (``both``). In the
demo's federation (benchmarks/README.md, "Closed-form head", 3 seeds) the fit after the
last stage carried the whole gain; the fit before the first stage added nothing measurable
on top of it and costs a round, hence ``end`` by default."""

CLOSED_FORM_FIT_ROUNDS = {"end": "last", "both": "first and last"}
"""Where each mode other than ``off`` puts its fit rounds in a federation, in a report's
words (the demo's and accuracy.py's)."""


def add_closed_form_head_argument(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, help_text: str, default: str = "off"
) -> None:
    """``--closed-form-head [off|end|both]`` with each command's own ``help_text``: one
    declaration of what the flag alone means (``end``) for the coordinator, simulate,
    train and accuracy.py, since simulate hands its value to a coordinator process by
    name."""
    parser.add_argument(
        "--closed-form-head",
        nargs="?",
        const="end",
        default=default,
        choices=CLOSED_FORM_HEAD_MODES,
        help=help_text,
    )


HEAD_RIDGE = 0.3
"""Relative ridge term. On MiniLM's pooled final features of the demo's rows (2,000
tweets, 4 agents, Dirichlet 0.5), the solved head's accuracy on the federation's 600
validation rows, mean of seeds 0-2, was 0.711 / 0.717 / 0.726 / 0.718 / 0.708 at 0.03 /
0.1 / 0.3 / 1 / 3."""

LOGIT_SCALE = 5.0
"""The ridge head predicts the one-hot label (about 0 or 1 per class); cross-entropy
training from it needs logits, so the solved head is multiplied by this. The scale does
not change which class wins. On the same features (seed 0), training cross-entropy of the
scaled head was 0.71 / 0.57 / 0.68 / 1.12 at scales 2 / 5 / 10 / 20."""


def head_statistics(
    features: torch.Tensor, labels: torch.Tensor, num_labels: int
) -> dict[str, torch.Tensor]:
    """``HEAD_GRAM`` and ``HEAD_CROSS`` of ``features (N, d)`` with ``labels (N,)``: means
    over the N rows, float64, on the CPU."""
    if features.ndim != 2 or labels.shape != (features.shape[0],) or features.shape[0] == 0:
        raise ValueError(
            f"features {tuple(features.shape)} and labels {tuple(labels.shape)} must be "
            "(N, d) and (N,) with N > 0"
        )
    if int(labels.min()) < 0 or int(labels.max()) >= num_labels:
        raise ValueError(f"labels must lie in 0..{num_labels - 1}")
    x = features.detach().to("cpu", torch.float64)
    x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
    y = torch.nn.functional.one_hot(labels.to("cpu").long(), num_labels).to(torch.float64)
    n = x.shape[0]
    return {HEAD_GRAM: x.T @ x / n, HEAD_CROSS: x.T @ y / n}


def check_statistics(stats: dict[str, torch.Tensor]) -> tuple[int, int]:
    """``(d, C)`` of well-formed statistics; ``ValueError`` naming what is wrong."""
    if set(stats) != set(STATISTICS):
        raise ValueError(f"head statistics must be exactly {list(STATISTICS)}, got {sorted(stats)}")
    gram, cross = stats[HEAD_GRAM], stats[HEAD_CROSS]
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] < 2:
        raise ValueError(f"{HEAD_GRAM} must be square (d+1, d+1), got {tuple(gram.shape)}")
    if cross.ndim != 2 or cross.shape[0] != gram.shape[0] or cross.shape[1] < 2:
        raise ValueError(
            f"{HEAD_CROSS} must be ({gram.shape[0]}, C >= 2) to match {HEAD_GRAM}, "
            f"got {tuple(cross.shape)}"
        )
    if not (torch.isfinite(gram).all() and torch.isfinite(cross).all()):
        raise ValueError("head statistics must be finite")
    # what any means over rows satisfy: the appended 1's own moment, a symmetric second
    # moment with a non-negative diagonal, label frequencies that sum to 1
    gram64, cross64 = gram.to(torch.float64), cross.to(torch.float64)
    tolerance = 1e-6
    if abs(float(gram64[-1, -1]) - 1.0) > tolerance:
        raise ValueError(f"{HEAD_GRAM}'s last diagonal entry must be 1 (the mean of 1 · 1)")
    if not torch.allclose(gram64, gram64.T, rtol=tolerance, atol=tolerance):
        raise ValueError(f"{HEAD_GRAM} must be symmetric")
    if bool((gram64.diagonal() < 0).any()):
        raise ValueError(f"{HEAD_GRAM} must have a non-negative diagonal")
    frequencies = cross64[-1]
    if bool((frequencies < -tolerance).any()) or abs(float(frequencies.sum()) - 1.0) > tolerance:
        raise ValueError(f"{HEAD_CROSS}'s last row must be label frequencies summing to 1")
    return gram.shape[0] - 1, cross.shape[1]


def solve_head(
    stats: dict[str, torch.Tensor], *, ridge: float = HEAD_RIDGE, scale: float = LOGIT_SCALE
) -> tuple[torch.Tensor, torch.Tensor]:
    """The head ``(weight (C, d), bias (C,))``, float32, that ridge regression of the
    one-hot labels on the features gives for ``stats``, times ``scale``. The bias column
    is not penalised."""
    d, _ = check_statistics(stats)
    gram = stats[HEAD_GRAM].to(torch.float64)
    cross = stats[HEAD_CROSS].to(torch.float64)
    penalty = torch.zeros(d + 1, dtype=torch.float64)
    penalty[:d] = ridge * gram.diagonal()[:d].mean().clamp_min(torch.finfo(torch.float64).tiny)
    solution = torch.linalg.solve(gram + torch.diag(penalty), cross)  # (d+1, C)
    weight = (scale * solution[:d].T).to(torch.float32).contiguous()
    bias = (scale * solution[d]).to(torch.float32).contiguous()
    return weight, bias

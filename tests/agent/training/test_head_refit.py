"""Head-only refit on fixed final features: ``refit_head``.

Prepare: separable random features. Execute: ``refit_head``. Assert: the loss falls,
the features are untouched, the run repeats, bad input is refused. Through the trainer:
test_chain.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from chainfed.agent.training.head_refit import refit_head


def separable(n: int = 96, d: int = 8, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, classes, (n,), generator=generator)
    centres = 3 * torch.randn(classes, d, generator=generator)
    return centres[labels] + torch.randn(n, d, generator=generator), labels


def refit(head: nn.Linear, features, labels, epochs: int = 5):
    return refit_head(
        head, features, labels, epochs=epochs, batch_size=16, lr=1e-2, weight_decay=0.0,
        rng=np.random.default_rng(0),
    )  # fmt: skip


def test_refit_lowers_the_loss_and_repeats_bit_for_bit():
    features, labels = separable()
    heads = [nn.Linear(8, 3) for _ in range(2)]
    heads[1].load_state_dict(heads[0].state_dict())
    before = features.clone()

    results = [refit(head, features, labels) for head in heads]

    assert results[0] == results[1]
    assert results[0].steps == 5 * 6 and results[0].samples == 5 * 96
    assert results[0].last_pass_loss < 0.5 * results[0].first_pass_loss
    assert torch.equal(heads[0].weight, heads[1].weight)
    assert torch.equal(features, before)


@pytest.mark.parametrize(
    ("epochs", "rows", "message"), [(0, 96, "epochs must be >= 1"), (1, 0, "same, non-zero")]
)
def test_refit_refuses_bad_input(epochs, rows, message):
    features, labels = separable()
    with pytest.raises(ValueError, match=message):
        refit(nn.Linear(8, 3), features[:rows], labels[:rows], epochs=epochs)

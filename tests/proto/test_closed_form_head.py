"""The closed-form head: statistics that add up across agents, and the head they give."""

from __future__ import annotations

import pytest
import torch

from chainfed.proto.closed_form_head import (
    HEAD_CROSS,
    HEAD_GRAM,
    check_statistics,
    head_statistics,
    solve_head,
)


def skewed_agents(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Three agents of 3-class data with class-dependent means, each holding mostly one
    class (the label skew under which averaged SGD heads drift)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(3, 6, generator=g) * 2
    agents = []
    for sizes in ((40, 3, 2), (1, 55, 4), (5, 0, 25)):
        labels = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
        features = means[labels] + torch.randn(len(labels), 6, generator=g)
        agents.append((features, labels))
    return agents


NEGATE_FEATURES = torch.tensor([99.0] * 6 + [0.0], dtype=torch.float64)
"""Subtracted from the diagonal: every feature's second moment below 0, the 1's kept."""


def weighted_mean(stats: list[dict], rows: list[int]) -> dict:
    total = sum(rows)
    return {k: sum(n * s[k] for n, s in zip(rows, stats, strict=True)) / total for k in stats[0]}


def test_the_weighted_mean_of_agents_statistics_is_the_union_s():
    agents = skewed_agents()
    stats = [head_statistics(x, y, 3) for x, y in agents]
    union = head_statistics(torch.cat([x for x, _ in agents]), torch.cat([y for _, y in agents]), 3)

    mean = weighted_mean(stats, [len(y) for _, y in agents])

    for name in (HEAD_GRAM, HEAD_CROSS):
        assert mean[name].dtype == torch.float64
        torch.testing.assert_close(mean[name], union[name], rtol=1e-12, atol=1e-12)
    for got, want in zip(solve_head(mean), solve_head(union), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_solved_head_separates_what_each_agent_alone_cannot():
    agents = skewed_agents(1)
    x = torch.cat([x for x, _ in agents])
    y = torch.cat([y for _, y in agents])
    stats = weighted_mean(
        [head_statistics(a, b, 3) for a, b in agents], [len(b) for _, b in agents]
    )

    weight, bias = solve_head(stats)

    assert weight.shape == (3, 6) and bias.shape == (3,) and weight.dtype == torch.float32
    accuracy = ((x @ weight.T + bias).argmax(-1) == y).float().mean()
    assert accuracy > 0.9
    only_own = solve_head(head_statistics(*agents[2], 3))  # an agent without class 1
    assert ((x @ only_own[0].T + only_own[1]).argmax(-1) == 1).sum() == 0


def test_the_ridge_term_is_relative_to_the_features_scale():
    x, y = skewed_agents(2)[1]
    weight, bias = solve_head(head_statistics(x, y, 3), ridge=1.0)
    scaled_w, scaled_b = solve_head(head_statistics(100 * x, y, 3), ridge=1.0)

    torch.testing.assert_close(scaled_w * 100, weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scaled_b, bias, rtol=1e-4, atol=1e-5)


def test_the_scale_multiplies_the_head_and_keeps_its_decisions():
    x, y = skewed_agents(3)[0]
    stats = head_statistics(x, y, 3)
    w1, b1 = solve_head(stats, scale=1.0)
    w5, b5 = solve_head(stats, scale=5.0)

    torch.testing.assert_close(w5, 5 * w1)
    torch.testing.assert_close(b5, 5 * b1)
    assert torch.equal((x @ w1.T + b1).argmax(-1), (x @ w5.T + b5).argmax(-1))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: {HEAD_GRAM: s[HEAD_GRAM]}, "must be exactly"),
        (lambda s: {**s, "objective.head.weight": s[HEAD_CROSS]}, "must be exactly"),
        (lambda s: {**s, HEAD_GRAM: s[HEAD_GRAM][:, :-1]}, "must be square"),
        (lambda s: {**s, HEAD_CROSS: s[HEAD_CROSS][:-1]}, "to match"),
        (lambda s: {**s, HEAD_CROSS: s[HEAD_CROSS][:, :1]}, "C >= 2"),
        (lambda s: {**s, HEAD_GRAM: s[HEAD_GRAM] * float("nan")}, "finite"),
        (lambda s: {**s, HEAD_GRAM: s[HEAD_GRAM] * 2}, "mean of 1"),
        (lambda s: {**s, HEAD_GRAM: s[HEAD_GRAM] + torch.triu(torch.ones(7, 7), 1)}, "symmetric"),
        (lambda s: {**s, HEAD_GRAM: s[HEAD_GRAM] - torch.diag(NEGATE_FEATURES)}, "non-neg"),
        (lambda s: {**s, HEAD_CROSS: s[HEAD_CROSS] * 3}, "summing to 1"),
    ],
)
def test_malformed_statistics_are_named(change, message):
    x, y = skewed_agents()[0]
    stats = head_statistics(x, y, 3)
    assert check_statistics(stats) == (6, 3)

    with pytest.raises(ValueError, match=message):
        solve_head(change(stats))


def test_rows_and_labels_that_do_not_fit_are_refused():
    x, y = skewed_agents()[0]
    with pytest.raises(ValueError, match="labels must lie in 0..1"):
        head_statistics(x, y, 2)
    with pytest.raises(ValueError, match="N > 0"):
        head_statistics(x[:0], y[:0], 3)
    with pytest.raises(ValueError, match=r"\(N, d\) and \(N,\)"):
        head_statistics(x, y[:-1], 3)

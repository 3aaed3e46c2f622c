"""trimmed-mean / median against the direct formulas, their Byzantine bounds, and
``clip_update`` (the delta from the round's start scaled to the norm bound)."""

import math

import numpy as np
import pytest
import torch

from chainfed.coordinator.aggregation import (
    AggregationError,
    WeightedUpdate,
    aggregate,
    aggregate_median,
    aggregate_trimmed_mean,
)
from chainfed.proto.dp_mechanism import MissingStartError, clip_update, update_norm

SHAPES = {
    "layers.1.q_proj.lora_a": (2, 6),
    "layers.1.q_proj.lora_b": (5, 2),
    "objective.head.weight": (3, 5),
    "objective.head.bias": (3,),
}


def _updates(k: int, *, seed: int = 0, dtype=torch.float64, scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    samples = [int(n) for n in torch.randint(1, 100, (k,), generator=gen)]
    return [
        WeightedUpdate(
            {
                n: (torch.randn(s, generator=gen, dtype=torch.float64) * scale).to(dtype)
                for n, s in SHAPES.items()
            },
            samples[i],
            f"agent-{i}",
        )
        for i in range(k)
    ]


def _stack(updates, name) -> np.ndarray:
    return np.stack([u.tensors[name].double().numpy() for u in updates])  # (K, *shape)


@pytest.mark.parametrize(("k", "trim"), [(5, 0.2), (10, 0.2), (7, 0.3), (4, 0.1), (6, 0.0)])
def test_trimmed_mean_is_the_direct_formula(k, trim):
    updates = _updates(k, seed=k)
    got = aggregate_trimmed_mean(updates, trim=trim)
    cut = int(np.floor(trim * k))
    for name in SHAPES:
        values = np.sort(_stack(updates, name), axis=0)
        want = values[cut : k - cut].mean(axis=0)
        np.testing.assert_allclose(got[name].numpy(), want, rtol=0, atol=1e-12)


def test_trimmed_mean_without_trimming_is_the_unweighted_mean():
    updates = _updates(6)
    got = aggregate("trimmed-mean", updates, trim=0.0)
    for name in SHAPES:
        np.testing.assert_allclose(
            got[name].numpy(), _stack(updates, name).mean(axis=0), rtol=0, atol=1e-12
        )


@pytest.mark.parametrize("k", [1, 2, 5, 8])
def test_median_is_numpys_median(k):
    updates = _updates(k, seed=10 + k)
    got = aggregate("median", updates)
    for name in SHAPES:
        np.testing.assert_allclose(
            got[name].numpy(), np.median(_stack(updates, name), axis=0), rtol=0, atol=1e-12
        )


@pytest.mark.parametrize("strategy", ["trimmed-mean", "median"])
def test_robust_strategies_stay_within_the_honest_values(strategy):
    """2 of 10 agents send ×−10 and ×10 of a large update: every coordinate of the result
    stays inside the honest agents' range, while the plain mean leaves it."""
    honest = _updates(8, seed=3)
    attackers = _updates(2, seed=4, scale=50.0)
    attackers[0].tensors.update({n: t * -10 for n, t in attackers[0].tensors.items()})
    attackers[1].tensors.update({n: t * 10 for n, t in attackers[1].tensors.items()})
    updates = [
        *honest,
        *[WeightedUpdate(a.tensors, a.samples, f"bad-{i}") for i, a in enumerate(attackers)],
    ]

    got = aggregate(strategy, updates)
    plain = aggregate("fedavg", updates)
    left_range = False
    for name in SHAPES:
        lo = _stack(honest, name).min(axis=0)
        hi = _stack(honest, name).max(axis=0)
        assert (got[name].numpy() >= lo - 1e-12).all() and (got[name].numpy() <= hi + 1e-12).all()
        left_range |= bool(((plain[name].numpy() < lo) | (plain[name].numpy() > hi)).any())
    assert left_range


@pytest.mark.parametrize("strategy", ["trimmed-mean", "median"])
def test_robust_strategies_aggregate_the_deltas(strategy):
    """Translation-equivariant: f(S + δ_k) = S + f(δ_k), so the coordinator needs no S."""
    deltas = _updates(7, seed=5)
    start = _updates(1, seed=6)[0].tensors
    shifted = [
        WeightedUpdate({n: start[n] + t for n, t in u.tensors.items()}, u.samples, u.agent_id)
        for u in deltas
    ]
    got, of_deltas = aggregate(strategy, shifted), aggregate(strategy, deltas)
    for name in SHAPES:
        torch.testing.assert_close(got[name], start[name] + of_deltas[name], rtol=0, atol=1e-12)


def test_robust_strategies_keep_dtype_and_ignore_sample_counts():
    updates = _updates(5, dtype=torch.float32)
    reweighted = [
        WeightedUpdate(u.tensors, 1 + 1000 * i, u.agent_id) for i, u in enumerate(updates)
    ]
    for fn in (aggregate_median, aggregate_trimmed_mean):
        got = fn(updates)
        assert all(got[n].dtype == torch.float32 for n in SHAPES)
        again = fn(reweighted)
        assert all(torch.equal(got[n], again[n]) for n in SHAPES)


@pytest.mark.parametrize("trim", [-0.1, 0.5, 0.7, True, "0.2"])
def test_trimmed_mean_rejects_a_bad_fraction(trim):
    with pytest.raises(ValueError, match="trim"):
        aggregate_trimmed_mean(_updates(3), trim=trim)


@pytest.mark.parametrize("strategy", ["trimmed-mean", "median"])
def test_robust_strategies_validate_the_round(strategy):
    updates = _updates(3)
    updates[1].tensors["objective.head.bias"][1] = float("nan")
    with pytest.raises(AggregationError, match="agent-1.*non-finite"):
        aggregate(strategy, updates)


def test_clip_update_scales_the_delta_to_the_bound():
    start = _updates(1, seed=1)[0].tensors
    update = _updates(1, seed=2, scale=3.0)[0].tensors
    norm = math.sqrt(sum(float((update[n] - start[n]).pow(2).sum()) for n in SHAPES))
    bound = norm / 4

    clipped = clip_update(update, start, bound)

    assert update_norm(update, start) == pytest.approx(norm, rel=1e-12)
    assert update_norm(clipped, start) == pytest.approx(bound, rel=1e-12)
    for n in SHAPES:  # same direction, a quarter of the length
        torch.testing.assert_close(clipped[n] - start[n], (update[n] - start[n]) / 4)


def test_clip_update_leaves_a_small_update_alone_and_needs_every_start():
    start = _updates(1, seed=1)[0].tensors
    update = _updates(1, seed=2)[0].tensors
    same = clip_update(update, start, update_norm(update, start) * 1.01)
    assert all(same[n] is update[n] for n in SHAPES)
    with pytest.raises(MissingStartError, match="objective.head.bias"):
        clip_update(update, {n: t for n, t in start.items() if "bias" not in n}, 1.0)
    with pytest.raises(ValueError, match="clip norm"):
        clip_update(update, start, 0.0)

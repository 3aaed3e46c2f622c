"""fedavg / ffa / svd against direct computations, Eckart–Young, and every validation error."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chainfed.coordinator.aggregation import (
    STRATEGIES,
    AggregationError,
    WeightedUpdate,
    adapter_prefixes,
    aggregate,
    aggregate_fedavg,
    aggregate_ffa,
    aggregate_svd,
    merge_delta,
    validate_updates,
)

PREFIXES = ("layers.3.q_proj", "layers.4.down_proj")
HEAD = {
    "objective.head.weight": (3, 8),
    "objective.head.bias": (3,),
    "foresight.proxies.5.up": (8, 2),
}


def _updates(
    k: int,
    *,
    out: int = 8,
    inp: int = 6,
    r: int = 2,
    shared_a: bool = False,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    samples: list[int] | None = None,
) -> list[WeightedUpdate]:
    """K updates with two adapter pairs (A (r, inp), B (out, r)) and head/proxy tensors."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    a_shared = {p: randn(r, inp) for p in PREFIXES}
    samples = samples or [int(n) for n in torch.randint(1, 500, (k,), generator=gen)]
    updates = []
    for i in range(k):
        tensors = {}
        for p in PREFIXES:
            tensors[f"{p}.lora_a"] = a_shared[p].clone() if shared_a else randn(r, inp)
            tensors[f"{p}.lora_b"] = randn(out, r)
        tensors.update({name: randn(*shape) for name, shape in HEAD.items()})
        updates.append(WeightedUpdate(tensors, samples[i], f"agent-{i}"))
    return updates


def _direct_mean(updates: list[WeightedUpdate], name: str) -> torch.Tensor:
    """Σ n_k x_k / Σ n_k, float64, written out the obvious way."""
    total = sum(u.samples for u in updates)
    return sum(u.samples * u.tensors[name].double() for u in updates) / total


def _mean_product(updates: list[WeightedUpdate], prefix: str) -> torch.Tensor:
    """Σ n_k B_k A_k / Σ n_k, float64 (out, in)."""
    total = sum(u.samples for u in updates)
    return (
        sum(
            u.samples
            * (u.tensors[f"{prefix}.lora_b"].double() @ u.tensors[f"{prefix}.lora_a"].double())
            for u in updates
        )
        / total
    )


def _assert_head_is_weighted_mean(got: dict, updates: list[WeightedUpdate], atol: float) -> None:
    for name in HEAD:
        assert got[name].dtype == updates[0].tensors[name].dtype
        torch.testing.assert_close(
            got[name].double(), _direct_mean(updates, name), rtol=0, atol=atol
        )


# ---------------------------------------------------------------------------------
# fedavg
# ---------------------------------------------------------------------------------


def test_fedavg_is_the_sample_weighted_mean_of_every_tensor():
    updates = _updates(4)

    got = aggregate_fedavg(updates)

    assert list(got) == list(updates[0].tensors)
    for name in updates[0].tensors:
        assert got[name].dtype == torch.float64
        torch.testing.assert_close(got[name], _direct_mean(updates, name), rtol=0, atol=1e-12)


def test_fedavg_product_is_not_the_mean_product_when_a_differs():
    updates = _updates(3)

    delta = merge_delta(aggregate_fedavg(updates))

    for p in PREFIXES:
        assert (delta[p] - _mean_product(updates, p)).abs().max() > 1e-3


def test_fedavg_single_update_is_identity_and_inputs_are_untouched():
    updates = _updates(1, dtype=torch.float32)
    before = {k: v.clone() for k, v in updates[0].tensors.items()}

    got = aggregate_fedavg(updates)
    for name, t in before.items():
        assert torch.equal(got[name], t)
    for t in got.values():
        t.add_(1.0)  # results never alias the inputs

    for name, t in before.items():
        assert torch.equal(updates[0].tensors[name], t)


# ---------------------------------------------------------------------------------
# ffa
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-13), (torch.float32, 1e-6)])
def test_ffa_yields_exactly_the_weighted_mean_of_b_times_a(dtype, rtol):
    updates = _updates(5, shared_a=True, dtype=dtype)

    got = aggregate_ffa(updates)

    for p in PREFIXES:
        assert torch.equal(got[f"{p}.lora_a"], updates[0].tensors[f"{p}.lora_a"])
        assert got[f"{p}.lora_b"].dtype == dtype
        want = _mean_product(updates, p)
        err = (merge_delta(got)[p] - want).abs().max()
        assert err <= rtol * want.abs().max(), (p, err)
    _assert_head_is_weighted_mean(got, updates, atol=1e-12 if dtype == torch.float64 else 1e-6)


def test_ffa_rejects_an_a_that_differs_by_one_ulp():
    updates = _updates(3, shared_a=True, dtype=torch.float32)
    name = f"{PREFIXES[1]}.lora_a"
    a = updates[2].tensors[name]
    a[0, 0] = torch.nextafter(a[0, 0], torch.tensor(float("inf")))

    with pytest.raises(AggregationError, match=rf"{name}.*'agent-2'.*'agent-0'"):
        aggregate_ffa(updates)


def test_ffa_rejects_independent_a():
    with pytest.raises(AggregationError, match="shared seed"):
        aggregate_ffa(_updates(2))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ffa_of_b_alone_is_bit_for_bit_the_ffa_of_the_pairs(dtype):
    """Agents of an ffa federation send B without its (frozen, seeded) A: every result
    tensor is the one the pairs give, bit for bit, and no A appears."""
    updates = _updates(4, shared_a=True, dtype=dtype)
    b_alone = [
        WeightedUpdate(
            {k: v for k, v in u.tensors.items() if not k.endswith(".lora_a")}, u.samples, u.agent_id
        )
        for u in updates
    ]

    got = aggregate_ffa(b_alone, b_only=True)

    want = aggregate_ffa(updates)
    assert list(got) == [k for k in want if not k.endswith(".lora_a")]
    for name, tensor in got.items():
        assert tensor.dtype == want[name].dtype and torch.equal(tensor, want[name]), name
    with pytest.raises(AggregationError, match="has no 'layers.3.q_proj.lora_a'"):
        aggregate_ffa(b_alone)  # without b_only a lone B is an error, as before
    lone_a = [WeightedUpdate({"layers.3.q_proj.lora_a": torch.ones(2, 6)}, 1, "agent-0")]
    with pytest.raises(AggregationError, match="has no 'layers.3.q_proj.lora_b'"):
        aggregate_ffa(lone_a, b_only=True)


# ---------------------------------------------------------------------------------
# svd
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "shared_a", "rank"),
    [
        (1, False, None),  # one product of rank r
        (4, True, None),  # Σ w_k B_k A = B̄ A: rank r
        (3, False, 6),  # rank = K·r ≥ rank of any mean of K rank-2 products
    ],
)
def test_svd_reproduces_the_weighted_mean_of_b_times_a_when_its_rank_allows(k, shared_a, rank):
    updates = _updates(k, r=2, shared_a=shared_a)

    got = aggregate_svd(updates, rank=rank)

    r_out = rank or 2
    for p in PREFIXES:
        assert got[f"{p}.lora_a"].shape == (r_out, 6)
        assert got[f"{p}.lora_b"].shape == (8, r_out)
        want = _mean_product(updates, p)
        torch.testing.assert_close(merge_delta(got)[p], want, rtol=0, atol=1e-12)
    _assert_head_is_weighted_mean(got, updates, atol=1e-12)


def test_svd_is_the_best_rank_r_approximation_otherwise():
    updates = _updates(4, out=10, inp=9, r=2)

    got = aggregate_svd(updates)

    for p in PREFIXES:
        mean = _mean_product(updates, p)
        s = torch.linalg.svdvals(mean)
        assert s[2] > 1e-3 * s[0]  # the mean really has rank > r
        err = mean - merge_delta(got)[p]
        # Eckart–Young: ‖ΔW − ΔW_r‖₂ = σ_{r+1}, ‖ΔW − ΔW_r‖_F = (Σ_{i>r} σ_i²)^½
        torch.testing.assert_close(torch.linalg.matrix_norm(err, 2), s[2], rtol=1e-10, atol=0)
        torch.testing.assert_close(
            torch.linalg.matrix_norm(err), s[2:].square().sum().sqrt(), rtol=1e-10, atol=0
        )


def test_svd_splits_singular_values_evenly():
    updates = _updates(3, r=3)

    got = aggregate_svd(updates)

    for p in PREFIXES:
        a, b = got[f"{p}.lora_a"], got[f"{p}.lora_b"]
        s = torch.linalg.svdvals(_mean_product(updates, p))[:3]
        # B = U_r S_r^½, A = S_r^½ V_rᵀ  ⇒  BᵀB = A Aᵀ = diag(S_r)
        torch.testing.assert_close(b.T @ b, torch.diag(s), rtol=0, atol=1e-12)
        torch.testing.assert_close(a @ a.T, torch.diag(s), rtol=0, atol=1e-12)


def test_svd_computes_in_float64_and_returns_the_input_dtype():
    updates = _updates(3, shared_a=True, dtype=torch.float32)

    got = aggregate_svd(updates)

    assert {t.dtype for t in got.values()} == {torch.float32}
    for p in PREFIXES:
        want = _mean_product(updates, p)
        assert (merge_delta(got)[p] - want).abs().max() <= 1e-6 * want.abs().max()


def test_svd_keeps_null_directions_trainable():
    # ΔW = 0 (every B zero, as at a fresh adapter): B stays zero, A must not collapse to 0.
    updates = _updates(3)
    for u in updates:
        for p in PREFIXES:
            u.tensors[f"{p}.lora_b"].zero_()

    got = aggregate_svd(updates)

    for p in PREFIXES:
        assert torch.equal(got[f"{p}.lora_b"], torch.zeros(8, 2, dtype=torch.float64))
        torch.testing.assert_close(
            got[f"{p}.lora_a"], _direct_mean(updates, f"{p}.lora_a"), rtol=0, atol=1e-12
        )


def test_svd_rank_above_the_matrix_size_pads_exactly():
    updates = _updates(3, out=3, inp=4, r=2)

    got = aggregate_svd(updates, rank=5)

    for p in PREFIXES:
        assert got[f"{p}.lora_b"].shape == (3, 5) and got[f"{p}.lora_a"].shape == (5, 4)
        torch.testing.assert_close(
            merge_delta(got)[p], _mean_product(updates, p), rtol=0, atol=1e-12
        )
        assert (got[f"{p}.lora_a"].abs().sum(1) > 0).all()


@pytest.mark.parametrize("rank", [0, -1, 1.5, True])
def test_svd_rejects_a_bad_rank(rank):
    with pytest.raises(ValueError, match="rank"):
        aggregate_svd(_updates(2), rank=rank)


# ---------------------------------------------------------------------------------
# Properties over random K, shapes and weights
# ---------------------------------------------------------------------------------

rounds = st.fixed_dictionaries(
    {
        "k": st.integers(1, 6),
        "out": st.integers(1, 12),
        "inp": st.integers(1, 12),
        "r": st.integers(1, 4),
        "seed": st.integers(0, 2**31 - 1),
        "samples": st.lists(st.integers(1, 10_000), min_size=6, max_size=6),
    }
)
prop_settings = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _round(p: dict, shared_a: bool = False) -> list[WeightedUpdate]:
    return _updates(
        p["k"], out=p["out"], inp=p["inp"], r=p["r"], shared_a=shared_a, seed=p["seed"],
        samples=p["samples"][: p["k"]],
    )  # fmt: skip


@prop_settings
@given(rounds)
def test_property_fedavg_is_the_weighted_mean(p):
    updates = _round(p)
    got = aggregate_fedavg(updates)
    for name in updates[0].tensors:
        torch.testing.assert_close(got[name], _direct_mean(updates, name), rtol=0, atol=1e-12)


@prop_settings
@given(rounds)
def test_property_ffa_is_the_mean_product(p):
    updates = _round(p, shared_a=True)
    delta = merge_delta(aggregate_ffa(updates))
    for prefix in PREFIXES:
        torch.testing.assert_close(
            delta[prefix], _mean_product(updates, prefix), rtol=0, atol=1e-12
        )


@prop_settings
@given(rounds)
def test_property_svd_exact_at_rank_k_times_r(p):
    updates = _round(p)
    delta = merge_delta(aggregate_svd(updates, rank=p["k"] * p["r"]))
    for prefix in PREFIXES:
        torch.testing.assert_close(
            delta[prefix], _mean_product(updates, prefix), rtol=0, atol=1e-11
        )


@prop_settings
@given(rounds)
def test_property_svd_default_rank_meets_eckart_young(p):
    updates = _round(p)
    got = aggregate_svd(updates)
    for prefix in PREFIXES:
        mean = _mean_product(updates, prefix)
        s = torch.linalg.svdvals(mean)
        tail = s[p["r"] :]
        err = mean - merge_delta(got)[prefix]
        want = tail[0] if tail.numel() else torch.tensor(0.0, dtype=torch.float64)
        tol = 1e-10 * s[0]
        assert abs(torch.linalg.matrix_norm(err, 2) - want) <= tol
        assert got[f"{prefix}.lora_b"].shape == (p["out"], p["r"])


@prop_settings
@given(rounds, st.integers(2, 50), st.randoms(use_true_random=False))
def test_property_invariant_to_update_order_and_sample_scale(p, factor, rnd):
    updates = _round(p)
    shuffled = [WeightedUpdate(u.tensors, u.samples * factor, u.agent_id) for u in updates]
    rnd.shuffle(shuffled)
    for strategy in ("fedavg", "svd"):
        want, got = aggregate(strategy, updates), aggregate(strategy, shuffled)
        for prefix, delta in merge_delta(got).items():
            torch.testing.assert_close(delta, merge_delta(want)[prefix], rtol=0, atol=1e-11)
        for name in HEAD:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------
# Dispatch, helpers
# ---------------------------------------------------------------------------------


def test_aggregate_dispatches_by_name_and_passes_keywords():
    updates = _updates(3, shared_a=True)
    for name, fn in STRATEGIES.items():
        want = fn(updates)
        got = aggregate(name, updates)
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert aggregate("svd", updates, rank=4)[f"{PREFIXES[0]}.lora_a"].shape == (4, 6)


def test_aggregate_unknown_strategy_lists_the_strategies():
    with pytest.raises(ValueError, match="'krum'.*fedavg, ffa, svd, trimmed-mean, median"):
        aggregate("krum", _updates(1))


def test_merge_delta_and_adapter_prefixes():
    u = _updates(1)[0]
    assert adapter_prefixes(u.tensors) == sorted(PREFIXES)
    delta = merge_delta(u.tensors)
    assert set(delta) == set(PREFIXES)
    p = PREFIXES[0]
    assert torch.equal(delta[p], u.tensors[f"{p}.lora_b"] @ u.tensors[f"{p}.lora_a"])


# ---------------------------------------------------------------------------------
# Validation: every strategy, before any arithmetic
# ---------------------------------------------------------------------------------


def _with(updates, index, **changes):
    """Copy of ``updates`` where update ``index`` has ``tensors`` edits / other fields."""
    u = updates[index]
    tensors = dict(u.tensors)
    for name, value in changes.pop("tensors", {}).items():
        if value is None:
            del tensors[name]
        else:
            tensors[name] = value
    fields = {"tensors": tensors, "samples": u.samples, "agent_id": u.agent_id, **changes}
    return [*updates[:index], WeightedUpdate(**fields), *updates[index + 1 :]]


A0, B0 = f"{PREFIXES[0]}.lora_a", f"{PREFIXES[0]}.lora_b"
BAD_ROUNDS = {
    "empty": (lambda us: [], "no updates"),
    "zero samples": (lambda us: _with(us, 1, samples=0), r"'agent-1'.*positive int, got 0"),
    "negative samples": (lambda us: _with(us, 0, samples=-3), r"'agent-0'.*got -3"),
    "float samples": (lambda us: _with(us, 1, samples=2.5), r"'agent-1'.*got 2.5"),
    "bool samples": (lambda us: _with(us, 1, samples=True), r"'agent-1'.*got True"),
    "duplicate agent": (lambda us: _with(us, 1, agent_id="agent-0"), r"'agent-0'.*more than one"),
    "missing tensor": (
        lambda us: _with(us, 1, tensors={"objective.head.bias": None}),
        r"'agent-1'.*missing \['objective.head.bias'\]",
    ),
    "extra tensor": (
        lambda us: _with(us, 2, tensors={"objective.extra": torch.zeros(2, dtype=torch.float64)}),
        r"'agent-2'.*extra \['objective.extra'\]",
    ),
    "shape": (
        lambda us: _with(us, 1, tensors={B0: torch.zeros(9, 2, dtype=torch.float64)}),
        rf"'agent-1' tensor '{B0}': float64 \(9, 2\) differs from float64 \(8, 2\)"
        " of agent 'agent-0'",
    ),
    "dtype": (
        lambda us: _with(us, 2, tensors={B0: torch.zeros(8, 2, dtype=torch.float32)}),
        rf"'agent-2' tensor '{B0}': float32 \(8, 2\) differs from float64",
    ),
    "integer tensor": (
        lambda us: [
            _with(us, 0, tensors={"objective.steps": torch.tensor(3)})[0],
            *_with(us[1:], 0, tensors={"objective.steps": torch.tensor(3)}),
        ],
        r"'agent-0' tensor 'objective.steps'.*not floating point",
    ),
    "nan": (
        lambda us: _with(
            us,
            1,
            tensors={"objective.head.bias": torch.full((3,), float("nan"), dtype=torch.float64)},
        ),
        r"'agent-1' tensor 'objective.head.bias': non-finite",
    ),
    "inf": (
        lambda us: _with(
            us,
            2,
            tensors={A0: us[2].tensors[A0].clone().index_fill_(1, torch.tensor([0]), float("inf"))},
        ),
        rf"'agent-2' tensor '{A0}': non-finite",
    ),
    "lora_a without lora_b": (
        lambda us: [_with(us, 0, tensors={B0: None})[0]],
        rf"'{A0}' has no '{B0}'",
    ),
    "lora_b without lora_a": (
        lambda us: [_with(us, 0, tensors={A0: None})[0]],
        rf"'{B0}' has no '{A0}'",
    ),
    "rank mismatch in a pair": (
        lambda us: [_with(us, 0, tensors={B0: torch.zeros(8, 3, dtype=torch.float64)})[0]],
        rf"adapter '{PREFIXES[0]}'.*\(2, 6\) and \(8, 3\)",
    ),
    "1-D factor": (
        lambda us: [_with(us, 0, tensors={A0: torch.zeros(2, dtype=torch.float64)})[0]],
        rf"adapter '{PREFIXES[0]}'",
    ),
    "empty factor": (
        lambda us: [
            _with(
                us,
                0,
                tensors={
                    A0: torch.zeros(0, 6, dtype=torch.float64),
                    B0: torch.zeros(8, 0, dtype=torch.float64),
                },
            )[0]
        ],
        rf"adapter '{PREFIXES[0]}'",
    ),  # fmt: skip
}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("case", sorted(BAD_ROUNDS))
def test_every_strategy_rejects_an_inconsistent_round(strategy, case):
    make, message = BAD_ROUNDS[case]
    updates = make(_updates(3, shared_a=True))

    with pytest.raises(AggregationError, match=message):
        aggregate(strategy, updates)


def test_validate_updates_accepts_a_consistent_round():
    validate_updates(_updates(3))

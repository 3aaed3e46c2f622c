"""Aggregation of one round's updates: pure arithmetic, no I/O, no state (DESIGN.md §5).

An update is what one agent uploads after a round: the window's trainable tensors by
name plus the number of samples it trained on. Names follow ``chainfed.agent.runtime.lora``:

* adapter pairs ``layers.{i}.{module}.lora_a`` (r, in) and ``….lora_b`` (out, r); the
  adapter adds ``scale · B A x`` with ``scale = alpha / r`` fixed by the run's
  ``LoRAConfig``, so everything here works on the unscaled product ``ΔW = B A``;
* every other tensor (``objective.*`` task head, ``foresight.*`` GPO proxies, …) is a
  plain tensor. GPO proxies are low-rank too, but with a non-linearity between their
  factors, so the mean of their products means nothing: they are plain tensors.

Notation: K updates, agent k trained on n_k samples, weight w_k = n_k / Σ_j n_j.

Strategies (``aggregate(strategy, updates)``)::

    fedavg   A ← Σ w_k A_k            B ← Σ w_k B_k
             the product of means, (Σ w_k B_k)(Σ w_k A_k), is NOT the mean of the
             products Σ w_k B_k A_k: the cross terms B_j A_k (j ≠ k) leak in. It is the
             classic baseline, exact only when all A_k (or all B_k) are equal.
    ffa      A ← A (shared: frozen from one seed, checked bit-identical)
             B ← Σ w_k B_k            ⇒ B A = Σ w_k B_k A, the mean product, exactly
             with ``b_only`` updates may carry B alone (A stays with the agents,
             rebuilt from the seed: chainfed's ffa federations never send it)
    svd      ΔW ← Σ w_k B_k A_k       (the mean product, exact, float64)
             ΔW = U S Vᵀ → B ← U_r S_r^½,  A ← S_r^½ V_rᵀ

Plain tensors get ``Σ w_k x_k`` under these three.

Robust strategies (coordinate-wise, every tensor alike, unweighted)::

    trimmed-mean   per coordinate: sort the K values, drop ⌊trim·K⌋ from each end,
                   mean of the rest (trim ∈ [0, 0.5), default 0.2)
    median         per coordinate: the middle value (mean of the two middle values
                   for even K)

They ignore the sample counts (an attacker chooses its own) and need no round start:
both statistics are translation-equivariant per coordinate (see ``_coordinatewise``).

Norm clipping (``chainfed.proto.dp_mechanism.clip_update``) is not translation-
equivariant: it scales the delta x_k − S to L2 norm ≤ C over all of the update's tensors
together, so it needs S (see ``chainfed.coordinator.round_start`` for how the
coordinator knows S, including adapters that enter the window from the shared seeded
initialisation).

Precision: sums run in float64 and results come back in the updates' dtype on the
device of the first update. Validation (``validate_updates``) runs before any
arithmetic under every strategy and raises ``AggregationError`` naming the agent and
the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from chainfed.proto.tensor_names import LORA_A_SUFFIX, LORA_B_SUFFIX


class AggregationError(ValueError):
    """A round's updates cannot be aggregated as given (message names agent and tensor)."""


@dataclass(frozen=True)
class WeightedUpdate:
    """One agent's upload for a round."""

    tensors: dict[str, torch.Tensor]
    """Trainable tensors by name: adapter pairs ``*.lora_a`` / ``*.lora_b`` and plain tensors."""
    samples: int
    """Training samples behind the update; its aggregation weight (must be > 0)."""
    agent_id: str
    """Who sent it; named in every error."""


# -- names ----------------------------------------------------------------------------


def adapter_prefixes(
    names: Sequence[str] | Mapping[str, object], *, b_only: bool = False
) -> list[str]:
    """Prefixes ``p`` for which ``p.lora_a`` and ``p.lora_b`` are both present, in name order.

    Raises ``AggregationError`` for a ``lora_a`` without its ``lora_b`` or the reverse;
    with ``b_only`` (FFA: A never sent) a ``lora_b`` may come alone, as a plain tensor.
    """
    names = set(names)
    prefixes = []
    for name in sorted(names):
        if name.endswith(LORA_A_SUFFIX):
            prefix = name.removesuffix(LORA_A_SUFFIX)
            if prefix + LORA_B_SUFFIX not in names:
                raise AggregationError(f"tensor {name!r} has no {prefix + LORA_B_SUFFIX!r}")
            prefixes.append(prefix)
        elif name.endswith(LORA_B_SUFFIX):
            prefix = name.removesuffix(LORA_B_SUFFIX)
            if prefix + LORA_A_SUFFIX not in names and not b_only:
                raise AggregationError(f"tensor {name!r} has no {prefix + LORA_A_SUFFIX!r}")
    return prefixes


def merge_delta(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{prefix: B @ A}`` (float64, (out, in), unscaled) for every adapter pair in ``tensors``.

    For tests and reports: e.g. ``merge_delta(aggregate_ffa(us))`` against the weighted
    mean of ``merge_delta(u.tensors)``. Plain tensors are ignored.
    """
    return {
        p: tensors[p + LORA_B_SUFFIX].double() @ tensors[p + LORA_A_SUFFIX].double()
        for p in adapter_prefixes(tensors)
    }


# -- validation -----------------------------------------------------------------------


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}"


def validate_updates(updates: Sequence[WeightedUpdate], *, b_only: bool = False) -> None:
    """Check a round's updates are mutually consistent; raise ``AggregationError`` if not.

    At least one update; distinct agent ids; ``samples`` a positive int; every update has
    the first update's tensor names, and per name the same shape and dtype; every tensor
    floating point with finite values; adapters come in pairs of non-empty 2-D tensors
    A (r, in) / B (out, r) with one r — or, with ``b_only``, also as B alone.
    """
    if not updates:
        raise AggregationError("no updates to aggregate")
    seen: set[str] = set()
    for u in updates:
        if u.agent_id in seen:
            raise AggregationError(f"agent {u.agent_id!r} sent more than one update")
        seen.add(u.agent_id)
        if isinstance(u.samples, bool) or not isinstance(u.samples, int) or u.samples <= 0:
            raise AggregationError(
                f"agent {u.agent_id!r}: samples must be a positive int, got {u.samples!r}"
            )

    ref = updates[0]
    for name, t in ref.tensors.items():
        if not t.dtype.is_floating_point:
            raise AggregationError(
                f"agent {ref.agent_id!r} tensor {name!r}: {_describe(t)} is not floating point"
            )
    for u in updates[1:]:
        missing = sorted(set(ref.tensors) - set(u.tensors))
        extra = sorted(set(u.tensors) - set(ref.tensors))
        if missing or extra:
            raise AggregationError(
                f"agent {u.agent_id!r}: tensor names differ from agent {ref.agent_id!r}"
                f" (missing {missing}, extra {extra})"
            )
        for name, want in ref.tensors.items():
            got = u.tensors[name]
            if got.shape != want.shape or got.dtype != want.dtype:
                raise AggregationError(
                    f"agent {u.agent_id!r} tensor {name!r}: {_describe(got)} differs from"
                    f" {_describe(want)} of agent {ref.agent_id!r}"
                )
    for u in updates:
        for name, t in u.tensors.items():
            if not bool(torch.isfinite(t).all()):
                raise AggregationError(f"agent {u.agent_id!r} tensor {name!r}: non-finite values")

    for prefix in adapter_prefixes(ref.tensors, b_only=b_only):
        a, b = ref.tensors[prefix + LORA_A_SUFFIX], ref.tensors[prefix + LORA_B_SUFFIX]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or 0 in (*a.shape, *b.shape):
            raise AggregationError(
                f"agent {ref.agent_id!r} adapter {prefix!r}: want lora_a (r, in) and"
                f" lora_b (out, r), got {tuple(a.shape)} and {tuple(b.shape)}"
            )


# -- arithmetic -----------------------------------------------------------------------


def _weights(updates: Sequence[WeightedUpdate]) -> list[float]:
    total = sum(u.samples for u in updates)
    return [u.samples / total for u in updates]


def _weighted_mean(
    updates: Sequence[WeightedUpdate], weights: Sequence[float], name: str
) -> torch.Tensor:
    """Σ w_k x_k in float64, on the first update's device."""
    first = updates[0].tensors[name]
    acc = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
    for u, w in zip(updates, weights, strict=True):
        acc.add_(u.tensors[name].to(device=first.device, dtype=torch.float64), alpha=w)
    return acc


def _aggregate(
    updates: Sequence[WeightedUpdate],
    adapter_rule: Callable[[Sequence[WeightedUpdate], Sequence[float], str], tuple],
    *,
    b_only: bool = False,
) -> dict[str, torch.Tensor]:
    """Validate, apply ``adapter_rule`` per adapter prefix → (A, B), weighted mean elsewhere
    (a lone B of ``b_only`` updates included)."""
    updates = list(updates)
    validate_updates(updates, b_only=b_only)
    weights = _weights(updates)
    ref = updates[0].tensors
    out: dict[str, torch.Tensor] = {}
    for prefix in adapter_prefixes(ref, b_only=b_only):
        a, b = adapter_rule(updates, weights, prefix)
        out[prefix + LORA_A_SUFFIX] = a
        out[prefix + LORA_B_SUFFIX] = b
    for name, t in ref.items():
        if name not in out:
            out[name] = _weighted_mean(updates, weights, name).to(t.dtype)
    return {name: out[name] for name in ref}  # the first update's order


def _fedavg_pair(updates, weights, prefix):
    a_name, b_name = prefix + LORA_A_SUFFIX, prefix + LORA_B_SUFFIX
    dtype = updates[0].tensors[a_name].dtype
    return (
        _weighted_mean(updates, weights, a_name).to(dtype),
        _weighted_mean(updates, weights, b_name).to(dtype),
    )


def aggregate_fedavg(updates: Sequence[WeightedUpdate]) -> dict[str, torch.Tensor]:
    """Sample-weighted mean of every tensor, A and B of an adapter separately.

    Note (Σ w_k B_k)(Σ w_k A_k) ≠ Σ w_k B_k A_k in general: the merged update picks up
    cross terms B_j A_k. Use ``ffa`` or ``svd`` for the exact mean of the products.
    """
    return _aggregate(updates, _fedavg_pair)


def _ffa_pair(updates, weights, prefix):
    a_name, b_name = prefix + LORA_A_SUFFIX, prefix + LORA_B_SUFFIX
    ref = updates[0]
    a = ref.tensors[a_name]
    for u in updates[1:]:
        if not torch.equal(u.tensors[a_name].to(a.device), a):
            diff = (u.tensors[a_name].to(a.device).double() - a.double()).abs().max().item()
            raise AggregationError(
                f"ffa: tensor {a_name!r} of agent {u.agent_id!r} differs from agent"
                f" {ref.agent_id!r}'s (max |ΔA| = {diff:.3g}); FFA needs A frozen from one"
                " shared seed on every agent"
            )
    return a.clone(), _weighted_mean(updates, weights, b_name).to(a.dtype)


def aggregate_ffa(
    updates: Sequence[WeightedUpdate], *, b_only: bool = False
) -> dict[str, torch.Tensor]:
    """FFA: every agent's A must be bit-identical (frozen, shared seed); keep it, average B.

    Then ``B̄ A = Σ w_k B_k A`` — the weighted mean of the products, exactly (up to
    rounding B̄ to the input dtype). Raises ``AggregationError`` naming the tensor and
    both agents when an A differs at all (the tolerance is zero: a frozen A cannot drift).
    With ``b_only`` the updates may carry B without its A (every agent keeps the seeded A
    and never sends it); such a B gets B̄ alone: the same B̄, bit for bit, as with the A.
    """
    return _aggregate(updates, _ffa_pair, b_only=b_only)


def _svd_pair(updates, weights, prefix, rank):
    """The mean of K rank-r products has rank ≤ K·r, so the rank-r
    re-factorisation reproduces ΔW exactly only when rank(ΔW) ≤ r (K = 1, all A_k equal, all
    B_k equal, or a requested ``rank`` ≥ K·r); otherwise it is the best rank-r approximation
    (Eckart–Young: spectral-norm error σ_{r+1}, Frobenius error (Σ_{i>r} σ_i²)^½). The
    singular values are split evenly, ``S^½`` to each side, so neither factor dominates the
    next round's gradients. ΔW (out × in) is never formed: with ``B_cat = [w_1 B_1 … w_K B_K]``
    (out × Kr) and ``A_cat = [A_1; …; A_K]`` (Kr × in), ΔW = B_cat A_cat, and two thin QRs
    reduce the SVD to one of a Kr × Kr matrix::

        B_cat = Q_b R_b,  A_catᵀ = Q_a R_a
        ΔW = Q_b (R_b R_aᵀ) Q_aᵀ,  R_b R_aᵀ = U' S V'ᵀ  ⇒  U = Q_b U',  Vᵀ = V'ᵀ Q_aᵀ

    A direction whose singular value is numerically zero (ΔW of rank below r, ΔW = 0, or a
    ``rank`` above min(out, in)) gets a zero column of B — the product stays exact — and the
    row of the weighted mean A in that slot (row ``i mod r`` of Σ w_k A_k) instead of a zero
    row: with both factors zero a direction receives no gradient and would be dead for the
    rest of the chain. Note that after ``svd`` A is no longer the seeded initialisation, so
    ``ffa`` cannot follow ``svd`` within one adapter's life.
    """
    a_name, b_name = prefix + LORA_A_SUFFIX, prefix + LORA_B_SUFFIX
    ref_a = updates[0].tensors[a_name]
    dtype, device = ref_a.dtype, ref_a.device
    r_in, d_in = ref_a.shape  # (r, in)
    d_out = updates[0].tensors[b_name].shape[0]
    r = r_in if rank is None else rank

    f64 = {"dtype": torch.float64, "device": device}
    b_cat = torch.cat(
        [u.tensors[b_name].to(**f64) * w for u, w in zip(updates, weights, strict=True)], 1
    )
    a_cat = torch.cat([u.tensors[a_name].to(**f64) for u in updates], 0)  # (Kr, in)
    q_b, r_b = torch.linalg.qr(b_cat)  # (out, p), (p, Kr)
    q_a, r_a = torch.linalg.qr(a_cat.T)  # (in, q), (q, Kr)
    u_s, s, vh_s = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)  # (p, s) (s,) (s, q)
    u = q_b @ u_s  # (out, s)
    vh = vh_s @ q_a.T  # (s, in)

    t = min(r, s.numel())
    root = s[:t].sqrt()
    b = torch.zeros(d_out, r, **f64)
    a = torch.zeros(r, d_in, **f64)
    b[:, :t] = u[:, :t] * root  # (out, t)
    a[:t] = root[:, None] * vh[:t]  # (t, in)

    # Numerically null directions (and slots beyond min(out, in)): zero B column, keep a
    # trainable A row from the weighted mean of the agents' A.
    tol = (s[0] * max(d_out, d_in) * torch.finfo(torch.float64).eps) if s.numel() else 0.0
    null = [i for i in range(r) if i >= t or s[i] <= tol]
    if null:
        a_mean = _weighted_mean(updates, weights, a_name)  # (r_in, in)
        for i in null:
            b[:, i] = 0.0
            a[i] = a_mean[i % r_in]
    return a.to(dtype), b.to(dtype)


def aggregate_svd(
    updates: Sequence[WeightedUpdate], *, rank: int | None = None
) -> dict[str, torch.Tensor]:
    """Average the products ΔW_k = B_k A_k exactly (weighted), re-factor to rank ``rank``.

    ``rank`` defaults to each adapter's own rank r, so the result loads back into the
    agents' modules (their ``scale = alpha / r`` is unchanged; a different ``rank``
    returns factors of the same ΔW and is for analysis). The result is exact when
    rank(ΔW) ≤ ``rank`` and otherwise the best rank-``rank`` approximation of ΔW
    (Eckart–Young); see the module docstring for the S^½ split and null directions.
    Plain tensors: weighted mean.
    """
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"svd rank must be a positive int or None, got {rank!r}")
    return _aggregate(updates, lambda us, ws, p: _svd_pair(us, ws, p, rank))


def _stacked(updates: Sequence[WeightedUpdate], name: str) -> torch.Tensor:
    """The K values of tensor ``name`` as one float64 tensor (K, *shape), sorted along K."""
    first = updates[0].tensors[name]
    stack = torch.stack(
        [u.tensors[name].to(device=first.device, dtype=torch.float64) for u in updates]
    )
    return stack.sort(dim=0).values


def _coordinatewise(
    updates: Sequence[WeightedUpdate], statistic: Callable[[torch.Tensor], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Validate, then ``statistic`` of each tensor's sorted (K, *shape) stack.

    The robust statistics ignore sample counts: an attacker chooses its own, and a weight it can
    inflate would undo the robustness. What they aggregate is the update's *delta* from the
    round's starting tensors — and they may be applied to the uploaded tensors directly,
    because every agent of a round starts from the same tensors S and both statistics are
    translation-equivariant per coordinate: median(S + δ_k) = S + median(δ_k), likewise
    for the trimmed mean. The coordinator therefore needs no starting state for them. An
    adapter pair is treated factor by factor, A and B separately, like ``fedavg`` (the same
    caveat on cross terms holds; with A frozen (FFA) all A_k are equal and the result is
    the robust statistic of the B_k, exact in the product B A).
    """
    updates = list(updates)
    validate_updates(updates)
    return {
        name: statistic(_stacked(updates, name)).to(t.dtype)
        for name, t in updates[0].tensors.items()
    }


def aggregate_trimmed_mean(
    updates: Sequence[WeightedUpdate], *, trim: float = 0.2
) -> dict[str, torch.Tensor]:
    """Coordinate-wise trimmed mean: drop the ⌊trim·K⌋ largest and smallest values of each
    coordinate, average the rest (unweighted). ``trim = 0`` is the plain unweighted mean.

    With at most ⌊trim·K⌋ arbitrary (Byzantine) updates, every coordinate of the result
    lies between the smallest and the largest honest value of that coordinate.
    """
    if isinstance(trim, bool) or not isinstance(trim, int | float) or not 0 <= trim < 0.5:
        raise ValueError(f"trimmed-mean trim must be in [0, 0.5), got {trim!r}")
    k = len(updates)
    cut = math.floor(trim * k)
    return _coordinatewise(updates, lambda s: s[cut : k - cut].mean(dim=0))


def aggregate_median(updates: Sequence[WeightedUpdate]) -> dict[str, torch.Tensor]:
    """Coordinate-wise median (unweighted); for even K the mean of the two middle values.

    With fewer than K/2 arbitrary updates every coordinate stays between honest values.
    """
    k = len(updates)
    return _coordinatewise(updates, lambda s: (s[(k - 1) // 2] + s[k // 2]) / 2)


STRATEGIES: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "fedavg": aggregate_fedavg,
    "ffa": aggregate_ffa,
    "svd": aggregate_svd,
    "trimmed-mean": aggregate_trimmed_mean,
    "median": aggregate_median,
}
"""Aggregation strategies by name (DESIGN.md §5)."""


def aggregate(
    strategy: str, updates: Sequence[WeightedUpdate], **kwargs: object
) -> dict[str, torch.Tensor]:
    """Aggregate ``updates`` with the named strategy; ``kwargs`` go to it (``svd``: ``rank``,
    ``trimmed-mean``: ``trim``, ``ffa``: ``b_only``)."""
    try:
        fn = STRATEGIES[strategy]
    except KeyError:
        raise ValueError(
            f"unknown aggregation strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}"
        ) from None
    return fn(updates, **kwargs)

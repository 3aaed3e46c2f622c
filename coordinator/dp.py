"""Client-level differential privacy for the chain: DP-FedAvg and its privacy accounting.

One round's release is a Gaussian mechanism over agents (McMahan et al., "Learning
Differentially Private Recurrent Language Models", ICLR 2018). Each agent's update delta
Δ_k = x_k − S from the round's start S (``chainfed.coordinator.round_start``), taken over
all of its uploaded tensors together, is clipped to L2 norm C, so adding or removing one
agent moves the sum of the clipped deltas by at most C. Noise N(0, (z·C)²) per coordinate
then makes the round (C, z)-Gaussian::

    central   coordinator: S + (Σ_k clip_C(Δ_k) + N(0, z²C²·I)) / n      (n updates)
    local     agent k:     S + clip_C(Δ_k) + N(0, z²C²·I), then the configured strategy

Under ``central`` the aggregate is unweighted (every agent counts 1/n: sample counts would
change the sensitivity) and the strategy must be linear in the deltas (``fedavg`` or
``ffa``). A frozen A (``lora_train_a = False``) is never noised: it is a seeded constant
that carries no data, and FFA needs it bit-identical on every agent.

Accounting (``PrivacyLedger``): Rényi DP composed over rounds with the ``dp-accounting``
package's ``RdpAccountant`` and converted to (ε, δ) for the configured δ.

* central: a round samples agents_per_round of the registered agents; it is accounted as
  a Poisson-subsampled Gaussian with q = agents_per_round / registered (q = 1 when every
  agent trains every round). The coordinator's sampling is a fixed-size draw, which the
  Poisson analysis approximates (the usual practice of DP-FedAvg deployments).
* local: the coordinator sees who took part, so there is no amplification by sampling:
  each round is a plain Gaussian (q = 1) for every agent, an upper bound for any agent.

A round is charged when its release happens: central when it is aggregated, local when any
agent uploaded a noised update for it (even if the round is then re-run below quorum).
The ledger is a list of (z, q, rounds) that ``state_store`` persists, so the ε spent survives a
coordinator restart.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from chainfed.proto.dp_mechanism import clip_update, noise_generator, noised_names

DP_MODES = ("central", "local")


@dataclass(frozen=True)
class DPConfig:
    """Client-level DP of one federation (the ``--dp-*`` flags)."""

    noise_multiplier: float
    """z: noise std is z · C per coordinate."""
    clip: float
    """C: L2 bound of each agent's update delta."""
    delta: float = 1e-5
    """δ of the reported (ε, δ)."""
    mode: str = "central"
    """``central`` (coordinator noises the sum) or ``local`` (each agent noises its own)."""
    epsilon_budget: float | None = None
    """Stop the chain before a round would take ε above this; None = no limit."""

    def __post_init__(self) -> None:
        if self.mode not in DP_MODES:
            raise ValueError(f"dp mode must be one of {', '.join(DP_MODES)}; got {self.mode!r}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"dp noise multiplier must be > 0, got {self.noise_multiplier}")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"dp clip must be > 0, got {self.clip}")
        if not 0 < self.delta < 1:
            raise ValueError(f"dp delta must be in (0, 1), got {self.delta}")
        if self.epsilon_budget is not None and not self.epsilon_budget > 0:
            raise ValueError(f"dp epsilon budget must be > 0, got {self.epsilon_budget}")


def epsilon_for(rounds: Sequence[tuple[float, float, int]], delta: float) -> float:
    """ε after composing ``rounds`` = [(z, q, count), …]: ``count`` rounds of the
    q-Poisson-subsampled Gaussian with noise multiplier z (q ≥ 1: not subsampled), at δ
    (``dp-accounting``'s RDP accountant, its default orders). 0 for no rounds.

    Memoised: the coordinator asks for the same ledger at every status query."""
    return _epsilon(tuple((float(z), float(q), int(n)) for z, q, n in rounds), float(delta))


@functools.lru_cache(maxsize=1024)
def _epsilon(rounds: tuple[tuple[float, float, int], ...], delta: float) -> float:
    # imported here: agents use this module for local DP and never account (the package
    # pulls in absl and dm-tree, ~0.7 s of import on a small device)
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    accountant = rdp_privacy_accountant.RdpAccountant()
    for z, q, count in rounds:
        if count <= 0:
            continue
        gaussian = dp_accounting.GaussianDpEvent(z)
        event = gaussian if q >= 1 else dp_accounting.PoissonSampledDpEvent(q, gaussian)
        accountant.compose(event, count)
    return float(accountant.get_epsilon(delta))


def noise_multiplier_for(
    target_epsilon: float, sampling_rate: float, rounds: int, delta: float
) -> float:
    """The smallest z (to 0.1 %) whose ε after ``rounds`` rounds at rate q is ≤ the target."""
    if not target_epsilon > 0 or rounds < 1:
        raise ValueError("need a target epsilon > 0 and rounds >= 1")
    lo, hi = 1e-2, 1.0
    while epsilon_for([(hi, sampling_rate, rounds)], delta) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ValueError(f"no noise multiplier reaches epsilon {target_epsilon}")
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        if epsilon_for([(mid, sampling_rate, rounds)], delta) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


@dataclass
class PrivacyLedger:
    """Rounds charged so far as (noise multiplier z, sampling rate q, rounds), in charge
    order: a coordinator restarted with other ``--dp-*`` flags still accounts its past
    rounds at the z they were run with."""

    delta: float
    """δ that ε is reported at."""
    rounds: list[tuple[float, float, int]] = field(default_factory=list)

    def charge(self, noise_multiplier: float, sampling_rate: float) -> None:
        """Record one released round."""
        key = (noise_multiplier, sampling_rate)
        if self.rounds and self.rounds[-1][:2] == key:
            self.rounds[-1] = (*key, self.rounds[-1][2] + 1)
        else:
            self.rounds.append((*key, 1))

    def epsilon(self) -> float:
        """ε spent so far."""
        return epsilon_for(self.rounds, self.delta)

    def epsilon_of_one_round(self, noise_multiplier: float, sampling_rate: float) -> float:
        """ε of one such round alone (its cost without composition)."""
        return epsilon_for([(noise_multiplier, sampling_rate, 1)], self.delta)

    def epsilon_after_next(self, noise_multiplier: float, sampling_rate: float) -> float:
        """ε if one more such round were charged."""
        ahead = PrivacyLedger(self.delta, list(self.rounds))
        ahead.charge(noise_multiplier, sampling_rate)
        return ahead.epsilon()

    def to_list(self) -> list[list[float]]:
        """JSON form: [[z, q, rounds], …]."""
        return [[z, q, n] for z, q, n in self.rounds]

    @classmethod
    def from_list(cls, delta: float, rounds: Sequence[Sequence[float]]) -> PrivacyLedger:
        return cls(delta, [(float(z), float(q), int(n)) for z, q, n in rounds])


def central_dp_mean(
    updates: Sequence[Mapping[str, torch.Tensor]],
    start: Mapping[str, torch.Tensor],
    config: DPConfig,
    *,
    train_a: bool = True,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """S + (Σ_k clip_C(x_k − S) + N(0, z²C²)) / n per tensor, in each tensor's dtype.

    ``updates`` are the round's uploads (validated); ``start`` is S. The sum and noise are
    float64. With ``train_a`` False the ``*.lora_a`` tensors are frozen seeded constants:
    they come back as S exactly, neither averaged nor noised.
    """
    if not updates:
        raise ValueError("no updates to aggregate")
    generator = generator or noise_generator()
    n = len(updates)
    clipped = [clip_update(u, start, config.clip) for u in updates]
    noised = set(noised_names(updates[0], train_a))
    std = config.noise_multiplier * config.clip
    out = {}
    for name, ref in updates[0].items():
        if name not in noised:
            out[name] = start[name].to(device=ref.device, dtype=ref.dtype).clone()
            continue
        s = start[name].to(dtype=torch.float64).cpu()
        total = torch.zeros(ref.shape, dtype=torch.float64)
        for c in clipped:
            total += c[name].double().cpu() - s
        total += torch.randn(ref.shape, generator=generator, dtype=torch.float64) * std
        out[name] = (s + total / n).to(device=ref.device, dtype=ref.dtype)
    return out
